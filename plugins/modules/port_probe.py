#!/usr/bin/python
# Copyright: portguard.hardening contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: port_probe
short_description: Probe many TCP/UDP ports concurrently and tell open, closed and filtered apart
version_added: 0.1.0
description:
  - Runs on a probe host and tries every target with a new connection (TCP handshake, or a UDP
    datagram expecting an echo), many at once, each with its own timeout counted from the moment
    its packet was sent.
  - C(open) means the handshake completed or the UDP payload was echoed; C(closed) a TCP reset or
    ICMP port unreachable; C(filtered) an ICMP administratively prohibited (C(reason=rejected))
    or no answer in time (C(reason=timeout)).
  - Before an attempt counts as filtered its socket is checked once more, so a busy prober can be
    slow but never reports an answered port as filtered.
author:
  - portguard maintainers (@portguard)
extends_documentation_fragment:
  - portguard.hardening.attributes
  - portguard.hardening.attributes.read_only
options:
  targets:
    description: What to probe.
    type: list
    elements: dict
    required: true
    suboptions:
      address:
        description: IPv4 or IPv6 address.
        type: str
        required: true
      port:
        description: Port, 1-65535.
        type: int
        required: true
      proto:
        description: Protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
      source:
        description: Source address for this target (default, O(source)).
        type: str
  ports:
    description:
      - Extra TCP ports to probe on every address of O(sweep_addresses), as ranges like C(1-65535).
      - One call probes at most 131072 targets (O(targets) plus O(sweep_addresses) times these ports), a
        full sweep of two addresses; a larger request fails before anything is sent.
    type: list
    elements: str
    default: []
  sweep_addresses:
    description: Addresses to probe on every port of O(ports).
    type: list
    elements: str
    default: []
  timeout:
    description: Seconds each attempt waits for an answer.
    type: float
    default: 1.0
  concurrency:
    description: Attempts in flight at once; 0 picks a value from the CPU count and the open-file limit.
    type: int
    default: 0
  source:
    description: Source address to send from (default, the routing table decides).
    type: str
"""

EXAMPLES = r"""
- name: Can app1 reach postgres on db1, and is redis on db1 filtered?
  portguard.hardening.port_probe:
    targets:
      - {address: 172.30.89.31, port: 5432, proto: tcp}
      - {address: 172.30.89.31, port: 6379, proto: tcp}
      - {address: "fd89:7067::31", port: 53, proto: udp}
    timeout: 1
  register: probe

- name: Sweep every TCP port of one host
  portguard.hardening.port_probe:
    targets: []
    sweep_addresses: [172.30.89.31]
    ports: ["1-65535"]
    timeout: 0.5
"""

RETURN = r"""
results:
  description: One entry per target, in the order given (targets first, then the sweep).
  returned: always
  type: list
  elements: dict
  sample: [{"address": "172.30.89.31", "port": 5432, "proto": "tcp", "state": "open", "reason": "handshake",
            "rtt_ms": 0.21}]
summary:
  description: Count of results per state.
  returned: always
  type: dict
  sample: {"open": 1, "closed": 0, "filtered": 2}
elapsed:
  description: Seconds the probing took.
  returned: always
  type: float
"""

import ipaddress
import itertools
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import parse_ports
from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import MAX_TARGETS, ProbeError, probe_ports


def build_targets(params):
    """The targets, then the sweep, as a lazy iterable; refused before anything is built when there are too many."""
    targets = []
    for item in params["targets"]:
        source = item["source"] or params["source"]
        targets.append((str(ipaddress.ip_address(item["address"])), item["port"], item["proto"], source))
    ranges = []
    for index, spec in enumerate(params["ports"]):
        ranges.extend(parse_ports(spec, f"ports[{index}]"))
    addresses = [str(ipaddress.ip_address(address)) for address in params["sweep_addresses"]]
    swept = sum(high - low + 1 for low, high in ranges)
    count = len(targets) + len(addresses) * swept
    if count > MAX_TARGETS:
        raise ProbeError(f"{count} targets ({len(targets)} targets + {len(addresses)} sweep_addresses x {swept} ports) "
                         f"is more than the {MAX_TARGETS} one call may probe: split them over several tasks")
    sweep = ((address, port, "tcp", params["source"])
             for address in addresses for low, high in ranges for port in range(low, high + 1))
    return itertools.chain(targets, sweep)


def main():
    module = AnsibleModule(
        argument_spec={
            "targets": {"type": "list", "elements": "dict", "required": True, "options": {
                "address": {"type": "str", "required": True},
                "port": {"type": "int", "required": True},
                "proto": {"type": "str", "choices": ["tcp", "udp"], "default": "tcp"},
                "source": {"type": "str"},
            }},
            "ports": {"type": "list", "elements": "str", "default": []},
            "sweep_addresses": {"type": "list", "elements": "str", "default": []},
            "timeout": {"type": "float", "default": 1.0},
            "concurrency": {"type": "int", "default": 0},
            "source": {"type": "str"},
        },
        supports_check_mode=True,
    )
    try:
        targets = build_targets(module.params)
    except ProbeError as exc:
        module.fail_json(msg=f"cannot probe: {exc}")
    except (ValueError, PortguardError) as exc:
        module.fail_json(msg=f"bad target: {exc}")
    started = time.monotonic()
    try:
        results = probe_ports(targets, timeout=module.params["timeout"],
                              concurrency=module.params["concurrency"] or None)
    except ProbeError as exc:
        module.fail_json(msg=f"cannot probe: {exc}")
    summary = {"open": 0, "closed": 0, "filtered": 0}
    for result in results:
        summary[result["state"]] += 1
    module.exit_json(changed=False, results=results, summary=summary, elapsed=round(time.monotonic() - started, 3))


if __name__ == "__main__":
    main()
