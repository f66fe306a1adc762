#!/usr/bin/python
# Copyright: portguard.hardening contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: port_activity
short_description: Read the counters of the portguard table or chains
version_added: 0.1.0
description:
  - Reads the deny counters (C(denied_in), C(denied_out)) and the per-entry hit counters of the
    C(inet portguard) table, or of the C(PORTGUARD-IN)/C(PORTGUARD-OUT) chains with the iptables backend.
author:
  - portguard maintainers (@portguard)
attributes:
  check_mode:
    support: full
    description: Only reads.
  diff_mode:
    support: none
  platform:
    platforms: posix
options: {}
"""

EXAMPLES = r"""
- name: Read the deny counters
  portguard.hardening.port_activity:
  register: activity
"""

RETURN = r"""
counters:
  description: The backend, the deny counters (packets) and one entry per whitelist element with its hits.
  returned: always
  type: dict
  sample: {"backend": "nftables", "denied_in": 12, "denied_out": null,
           "elements": [{"set": "in4_tcp", "addresses": "10.99.0.0/24", "ports": "22", "packets": 3, "bytes": 180,
                         "comment": "management/ssh: Remote administration"}]}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.portguard.hardening.plugins.module_utils.activity import read_counters


def main():
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    module.exit_json(changed=False, counters=read_counters())


if __name__ == "__main__":
    main()
