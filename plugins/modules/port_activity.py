#!/usr/bin/python
# Copyright: portguard.hardening contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: port_activity
short_description: Read the counters and the deny log lines of the portguard table or chains
version_added: 0.1.0
description:
  - Reads the deny counters (C(denied_in), C(denied_out)), the counters of the rate-limited log rules and the
    per-entry hit counters of the C(inet portguard) table, or of the C(PORTGUARD-IN)/C(PORTGUARD-OUT) chains
    with the iptables backend.
  - With O(logs=true), also reads the log lines of denied packets from C(/dev/kmsg), else from journald's kernel
    log, and returns them grouped by direction, source, destination, protocol and port, with the number of lines
    and the first and last time seen. Only lines newer than O(since) are read.
  - Says when the table was last replaced (an apply or a revert), which resets its counters.
  - The C(portguard.hardening.report) role turns this into the activity report; see docs/report.md.
author:
  - portguard maintainers (@portguard)
extends_documentation_fragment:
  - portguard.hardening.attributes
  - portguard.hardening.attributes.read_only
options:
  logs:
    description:
      - Read the log lines of denied packets as well.
      - A container without C(/dev/kmsg) and without journald returns C(log.readable=false) and the reason.
    type: bool
    default: false
  log_prefix:
    description: The prefix of our log lines (C(portguard_log_prefix)).
    type: str
    default: "portguard-deny: "
  addresses:
    description:
      - The host's own addresses. The kernel log is shared by every network namespace of a machine, so a line
        counts only when its destination (inbound) or source (outbound) is one of these. Empty keeps every line.
    type: list
    elements: str
    default: []
  since:
    description:
      - The C(log.cursor) a previous run returned; only newer lines are read. A cursor of another boot is ignored.
    type: dict
"""

EXAMPLES = r"""
- name: Read the deny counters
  portguard.hardening.port_activity:
  register: activity

- name: Read counters and the deny log lines since the last run
  portguard.hardening.port_activity:
    logs: true
    addresses: "{{ portguard_addresses }}"
    since: "{{ previous_cursor | default(omit) }}"
  register: activity
"""

RETURN = r"""
counters:
  description:
    - The backend, the deny counters and log rule counters (packets; C(logged_*) counts the lines the kernel was
      asked to write) and one entry per whitelist element with its hits.
  returned: always
  type: dict
  sample: {"backend": "nftables", "denied_in": 12, "denied_out": null, "logged_in": 7, "logged_out": null,
           "elements": [{"set": "in4_tcp", "addresses": "10.99.0.0/24", "ports": "22", "packets": 3, "bytes": 180,
                         "comment": "management/ssh: Remote administration"}]}
now:
  description: The host's time (seconds since the epoch).
  returned: always
  type: float
boot_id:
  description: The kernel's boot id; a log cursor is valid only within one boot.
  returned: always
  type: str
replaced:
  description: When the table or chains were last replaced by an apply or a revert (their counters restart then).
  returned: always
  type: dict
  sample: {"at": 1764170000.5, "event": "applied"}
log:
  description:
    - C(source) (C(kmsg), C(journal) or C(none)), C(readable), C(reason) when not readable, C(cursor) for the next
      run, C(lines) read, C(lost) when lines were overwritten before they were read, and C(groups) of denied
      packets (C(direction), C(src), C(dst), C(proto), C(port), C(count), C(first), C(last)).
  returned: when O(logs=true)
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.portguard.hardening.plugins.module_utils.host.activity import read_activity


def main():
    module = AnsibleModule(
        argument_spec={
            "logs": {"type": "bool", "default": False},
            "log_prefix": {"type": "str", "default": "portguard-deny: "},
            "addresses": {"type": "list", "elements": "str", "default": []},
            "since": {"type": "dict"},
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        result = read_activity(read_logs=params["logs"], prefix=params["log_prefix"], addresses=params["addresses"],
                               since=params["since"])
    except (OSError, ValueError) as exc:
        module.fail_json(msg=f"cannot read the portguard activity: {exc}")
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
