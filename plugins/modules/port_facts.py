# Copyright: portguard maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: port_facts
short_description: Gather the listening TCP and UDP sockets of a Linux host, with their processes
version_added: 0.1.0
description:
  - Reads the listening sockets of the host straight from the kernel, with netlink C(NETLINK_SOCK_DIAG),
    or from C(/proc/net/tcp), C(/proc/net/tcp6), C(/proc/net/udp) and C(/proc/net/udp6) where the
    kernel refuses netlink. No external command (C(ss), C(netstat), C(ps)) runs.
  - Maps each socket to the processes that hold it open with one pass over C(/proc/[pid]/fd).
  - TCP sockets count when they are in state LISTEN. UDP sockets count when they are bound and not
    connected (what C(ss -uln) shows as C(UNCONN)); connected UDP sockets talk to one peer only and
    are left out.
  - IPv4 and IPv6. A v4-mapped IPv6 address keeps its form (C(::ffff:127.0.0.1)) and is flagged.
  - Reports the network namespace the module runs in. Processes of containers on the host that
    listen in their own network namespaces are not reported.
author:
  - portguard maintainers (@portguard)
requirements:
  - Linux with C(/proc).
options:
  protocols:
    description:
      - Which protocols to report.
    type: list
    elements: str
    choices: [tcp, udp]
    default: [tcp, udp]
  include_process:
    description:
      - Find the processes that hold each socket and report their pid, name, command line and user.
      - Without it, O(include_process=false) skips the scan of C(/proc/[pid]/fd), and C(user) is the
        user that created the socket.
      - Run as root to see the processes of other users; an unprivileged run reports its own only.
    type: bool
    default: true
extends_documentation_fragment:
  - portguard.hardening.attributes
  - portguard.hardening.attributes.read_only
  - portguard.hardening.attributes.facts
notes:
  - A socket that no process of the module's pid namespace holds (for example one passed to a process in
    another pid namespace) is reported with C(pid), C(name) and C(cmdline) null.
  - The listener list is sorted by protocol, family, port, address, interface and inode, so two runs on an
    unchanged host return the same facts.
seealso:
  - module: community.general.listen_ports_facts
    description: Gathers the same from C(ss) or C(netstat) and runs C(ps) once per socket.
"""

EXAMPLES = r"""
- name: Gather listening sockets
  portguard.hardening.port_facts:

- name: List what listens on all addresses
  ansible.builtin.debug:
    msg: >-
      {{ ansible_facts.portguard_listeners
         | selectattr('scope', 'equalto', 'wildcard')
         | map(attribute='port') | unique | list }}

- name: Gather TCP listeners only, without process details
  portguard.hardening.port_facts:
    protocols: [tcp]
    include_process: false
"""

RETURN = r"""
ansible_facts:
  description: Facts to add to ansible_facts.
  returned: always
  type: complex
  contains:
    portguard_listeners:
      description: The listening sockets, one item per socket.
      returned: always
      type: list
      elements: dict
      sample:
        - protocol: tcp
          family: ipv4
          address: 0.0.0.0
          port: 22
          scope: wildcard
          v4_mapped: false
          v6only: null
          interface: null
          inode: 20934
          pid: 812
          pids: [812]
          name: sshd
          cmdline: "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"
          uid: 0
          user: root
      contains:
        protocol:
          description: V(tcp) or V(udp).
          type: str
        family:
          description: V(ipv4) or V(ipv6).
          type: str
        address:
          description: The local address the socket is bound to, V(0.0.0.0) or V(::) for any.
          type: str
        port:
          description: The local port.
          type: int
        scope:
          description:
            - V(wildcard) (any address), V(loopback) or V(specific).
            - A v4-mapped address takes the scope of the IPv4 address it maps.
          type: str
        v4_mapped:
          description: Whether the address is an IPv4 address mapped into IPv6 (V(::ffff:a.b.c.d)).
          type: bool
        v6only:
          description:
            - For IPv6 sockets, whether the socket refuses IPv4 (C(IPV6_V6ONLY)); V(false) on V(::) means
              it also accepts IPv4 on every address.
            - Null for IPv4 sockets and when read from C(/proc/net), which does not say.
          type: bool
        interface:
          description: The interface the socket is bound to (C(SO_BINDTODEVICE)), else null. Always null when read from C(/proc/net).
          type: str
        inode:
          description: The socket's inode number.
          type: int
        pid:
          description: The lowest pid among the processes that hold the socket, or null.
          type: int
        pids:
          description: Every pid that holds the socket (a forking server shares it with its workers), sorted.
          type: list
          elements: int
        name:
          description:
            - The process name (C(/proc/[pid]/comm)) of RV(ansible_facts.portguard_listeners[].pid), or null.
            - Display-safe and exact - the process's user chose it, so every character that does not print is an
              escape (C(\x1b) for a control byte or a byte that is not UTF-8, C(\u202e) for a bidi override),
              and a backslash is doubled.
          type: str
        cmdline:
          description: The command line of that process, arguments separated by spaces, display-safe as
            RV(ansible_facts.portguard_listeners[].name), or null.
          type: str
        uid:
          description: The effective uid of that process; without a process, the uid that created the socket.
          type: int
        user:
          description: The login name for RV(ansible_facts.portguard_listeners[].uid), or the number when it has none.
          type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    PortguardError,
)
from ansible_collections.portguard.hardening.plugins.module_utils.host.listeners import (
    collect_listeners,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "protocols": {"type": "list", "elements": "str", "choices": ["tcp", "udp"],
                          "default": ["tcp", "udp"]},
            "include_process": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    try:
        found = collect_listeners(module.params["protocols"], module.params["include_process"])
    except PortguardError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, ansible_facts={"portguard_listeners": found})


if __name__ == "__main__":
    main()
