#!/usr/bin/python
# Copyright: portguard.hardening contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: firewall
short_description: Apply a portguard ruleset atomically, with confirm-or-revert and persistence
version_added: 0.1.0
description:
  - Host side of the C(portguard.hardening.firewall) action. The action plugin compiles the catalog
    on the controller, renders this host's ruleset and calls this module with it; call the action
    (the same name), not the module alone.
  - With C(iptables), the whitelist lives in ipsets (C(portguard-in4), C(portguard-in6), and C(-out4)/C(-out6)
    with egress) where the host has the C(ipset) tool and kernel support, loaded before the chains that
    reference them; other hosts get one rule per source.
  - Validates the ruleset on the host (C(nft -c -f) or C(iptables-restore --test)), compares it
    structurally with the live table C(inet portguard) (or the C(PORTGUARD-IN)/C(PORTGUARD-OUT) chains)
    and applies it only when it differs, in one transaction. Other tables and chains are never touched.
  - Before applying, arms a revert to the previous ruleset that fires after O(rollback_timeout) seconds
    unless the controller confirms over a fresh connection.
  - After confirmation, writes the ruleset to C(/etc/portguard/) and, where systemd runs, installs
    C(portguard.service), ordered before C(network-pre.target), which loads it at boot or falls back
    to the management-only ruleset if it fails to load.
author:
  - portguard maintainers (@portguard)
extends_documentation_fragment:
  - portguard.hardening.attributes
attributes:
  check_mode:
    support: full
    details: Reports whether the live ruleset differs, with a rule-level diff; writes nothing.
  diff_mode:
    support: full
    details: The diff compares the live and the rendered rules, counters left out.
options:
  phase:
    description:
      - Set by the action plugin. C(inspect) reports the host's backends, C(apply) validates, diffs and
        applies, C(confirm) disarms the revert and persists what C(apply) recorded (the ruleset is sent once),
        C(status) reports what happened to a change.
    type: str
    choices: [inspect, apply, confirm, status]
    default: apply
  backend:
    description: The backend the ruleset was rendered for.
    type: str
    choices: [nftables, iptables]
    default: nftables
  ruleset:
    description:
      - The rendered ruleset; text for C(nftables), a dict with C(ipv4), C(ipv6) and C(jumps) for C(iptables),
        plus C(ipset) (an C(ipset restore) payload, empty for one rule per source) and C(sets) (the sets it fills).
    type: raw
  fallback:
    description: The management-only ruleset loaded at boot if O(ruleset) fails to load. Same form as O(ruleset).
    type: raw
  state:
    description:
      - C(present) applies the ruleset; C(absent) removes our table or chains and persisted files.
      - C(absent) compiles no catalog (a broken catalog never blocks the removal); it reads only the host's
        C(portguard_backend) and C(portguard_rollback_timeout).
    type: str
    choices: [present, absent]
    default: present
  rollback_timeout:
    description:
      - Seconds before an unconfirmed change reverts, 5 to 3600 (the bounds of C(portguard_rollback_timeout)).
      - The action defaults to the host's C(portguard_rollback_timeout) (30 when unset); a value out of bounds
        or not an integer is refused before any host is touched.
    type: int
    default: 30
  confirm:
    description:
      - Action argument. Arm the revert before applying and confirm over a fresh connection; C(false) leaves a
        change unguarded (nothing reverts a lockout).
      - On a network connection (ssh, paramiko, winrm, psrp), C(false) is refused unless O(controller_addresses)
        is given, so that the lockout check protects addresses that were stated, not guessed.
      - Strings such as C("false") (from C(-e)) are read as booleans.
    type: bool
    default: true
  controller_addresses:
    description:
      - Action argument. The addresses the host sees the controller connect from; the ruleset lets them in on
        the connection's port and the action refuses a ruleset that would not.
      - A list of IP addresses; a string (even one address) or an entry that is not an IP address is refused.
        An empty list is refused on a network connection (it would turn the lockout check off).
      - By default, on a network connection, the address the host saw (C(SSH_CONNECTION) of the module's process
        or, under become, of its ancestors) and the controller's own source address towards the host.
      - The port is the connection's effective port (C(ansible_port), C(ansible_ssh_port), C(remote_port) in
        C(ansible.cfg), else C(Port) from the ssh client's configuration, as C(ssh -G) resolves it).
      - Connections that use no network (podman, local) have no controller address to allow.
    type: list
    elements: str
  arm_rollback:
    description: Arm the revert before applying. The action plugin turns it off only when it cannot confirm.
    type: bool
    default: true
  persist:
    description: Write the ruleset for boot and install the boot unit (where systemd runs).
    type: bool
    default: true
  token:
    description: The change to confirm or ask about (returned by C(apply)).
    type: str
  host_facts:
    description:
      - Set by the action plugin to what phase C(inspect) reported (RV(host_facts)), so that C(apply) does not
        detect the host again; detected when not given.
    type: dict
    suboptions:
      nft:
        description: The C(nft) tool is installed.
        type: bool
      nft_usable:
        description: C(nft list tables) works.
        type: bool
      iptables:
        description: C(iptables-restore) and C(ip6tables-restore) are installed.
        type: bool
      iptables_variant:
        description: C(nf_tables), C(legacy), or empty without C(iptables).
        type: str
      ipset:
        description: The C(ipset) tool and the kernel's ip_set are usable.
        type: bool
      systemd:
        description: systemd runs (the boot unit is installed).
        type: bool
      legacy_rules:
        description: Rules in the legacy iptables, which filter alongside nftables.
        type: int
      controller_address:
        description: The client address of C(SSH_CONNECTION) of the module's process or its ancestors.
        type: str
notes:
  - Runs as root. State lives in C(/run/portguard/) (gone at reboot, so nothing stale survives one).
  - Concurrent runs on one host are serialized; a run waits while another awaits its confirmation.
seealso:
  - module: portguard.hardening.port_facts
"""

EXAMPLES = r"""
# Normally used through the action (same name), which renders the ruleset from the catalog:
- name: Enforce the catalog on every host
  portguard.hardening.firewall:
    rollback_timeout: 30

- name: Remove the portguard table and boot unit
  portguard.hardening.firewall:
    state: absent
"""

RETURN = r"""
backend:
  description: The backend used.
  returned: always
  type: str
  sample: nftables
diff:
  description:
    - The live rules (C(before)) and the rendered ones (C(after)), one rule per line, counters left out;
      C(--diff) shows them as a unified diff.
  returned: phase apply
  type: dict
  contains:
    before:
      description: The live rules of our table or chains; empty when there are none.
      type: str
    after:
      description: The rendered rules; empty for C(state=absent).
      type: str
    before_header:
      description: C(live <backend>) and whether the live rules are ours, missing (flushed) or absent.
      type: str
    after_header:
      description: C(rendered <backend>).
      type: str
token:
  description: Identifies an applied change awaiting confirmation; null when nothing was applied.
  returned: phase apply
  type: str
persistence:
  description: What was written for boot, and whether a boot unit is installed.
  returned: phase apply or confirm
  type: dict
  sample: {"changed": false, "unit": "no boot unit installed: systemd is not running on this host"}
host_facts:
  description: Backends available (C(ipset) tells whether ipsets are usable), systemd, legacy iptables rule
    count, the SSH client address.
  returned: phase inspect
  type: dict
stale_change:
  description:
    - Set when an earlier change was left unconfirmed by a revert process that died (or has not acted 30 s
      past its deadline). A real run reverts it before comparing (and reports a change); check mode only
      reports it.
  returned: when such a change was found
  type: str
table_missing:
  description: Our table (or chains) is gone from the live ruleset although portguard applied it, so something
    flushed it; a real run restores it.
  returned: when so
  type: str
persistence_error:
  description:
    - Persisting for boot failed. The live ruleset stands (and, in phase C(confirm), is confirmed); only the
      boot files or the boot unit are not as they should be. The task fails with this message.
  returned: when persisting failed
  type: str
repeated:
  description: The token was already confirmed (a repeated confirm after a lost reply); still C(state=confirmed).
  returned: phase confirm, when so
  type: bool
state:
  description: For C(status) and C(confirm), C(confirmed), C(pending), C(reverted) or C(unknown).
  returned: phase status or confirm
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import BACKENDS, check_ruleset
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.detect import check_conflicts, detect
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.persist import flush_risks
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.transaction import Host

HOST_FACTS = {"nft": "bool", "nft_usable": "bool", "iptables": "bool", "iptables_variant": "str", "ipset": "bool",
              "systemd": "bool", "legacy_rules": "int", "controller_address": "str"}


def run_phase(module, params):
    host = Host()
    phase = params["phase"]
    if phase == "inspect":
        return {"changed": False, "host_facts": detect()}
    if phase == "status":
        return {"changed": False, **host.status(params["token"])}
    if phase == "confirm":
        # what apply recorded is persisted: the ruleset is not sent again
        confirmed = host.confirm(params["token"], params["persist"])
        return persisted({"changed": True, "backend": params["backend"], **confirmed}, "the ruleset is live and confirmed")
    backend = BACKENDS[params["backend"]]()
    facts = params.get("host_facts") or detect()
    if params["state"] == "present":
        if params["ruleset"] is None or params["fallback"] is None:
            module.fail_json(msg="ruleset and fallback are required with state=present; use the action plugin")
        # The module can be called directly: what it loads as root is checked here too, not only rendered safely.
        check_ruleset(backend.name, params["ruleset"], "ruleset")
        check_ruleset(backend.name, params["fallback"], "fallback")
    persist = {"backend": backend, "ruleset": params["ruleset"], "fallback": params["fallback"],
               "systemd": bool(facts["systemd"]), "state": params["state"]} if params["persist"] else None
    if params["state"] == "present":
        check_conflicts(backend.name, facts)
        for risk in flush_risks(backend.name, facts):
            module.warn(f"{risk}. The boot unit loads ours after it and again when it reloads or restarts; "
                        "a manual reload of its files removes ours until the next run (docs/firewall.md, Boot order).")
    result = host.apply(backend, params["ruleset"], check_mode=module.check_mode, arm=params["arm_rollback"],
                        timeout=params["rollback_timeout"], state=params["state"], persist=persist)
    return persisted(result, "the live ruleset is as the catalog says")


def persisted(result, live):
    """A persistence error fails the task as what it is: the live rules stand, the boot files do not."""
    if result.get("persistence_error"):
        result["failed"] = True
        result["msg"] = f"{live}, but persisting it for boot failed: {result['persistence_error']}"
    return result


def main():
    module = AnsibleModule(
        argument_spec={
            "phase": {"type": "str", "choices": ["inspect", "apply", "confirm", "status"], "default": "apply"},
            "backend": {"type": "str", "choices": ["nftables", "iptables"], "default": "nftables"},
            "ruleset": {"type": "raw"},
            "fallback": {"type": "raw"},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "rollback_timeout": {"type": "int", "default": 30},
            # arguments of the action (documented above); the module receives them only when called alone
            "confirm": {"type": "bool", "default": True},
            "controller_addresses": {"type": "list", "elements": "str"},
            "arm_rollback": {"type": "bool", "default": True},
            "persist": {"type": "bool", "default": True},
            "token": {"type": "str", "no_log": False},
            "host_facts": {"type": "dict", "options": {name: {"type": kind} for name, kind in HOST_FACTS.items()}},
        },
        required_if=[("phase", "confirm", ["token"]), ("phase", "status", ["token"])],
        supports_check_mode=True,
    )
    try:
        result = run_phase(module, module.params)
    except PortguardError as exc:
        module.fail_json(msg=str(exc), changed=False)
    if result.get("failed"):
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
