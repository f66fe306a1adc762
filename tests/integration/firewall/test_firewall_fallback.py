"""portguard.hardening.firewall, iptables backend, on a host without ipset and after ipset arrives.

The lab image has ipset, so test_firewall.py runs the iptables backend with its whitelist in ipsets.
Here the ``ipset`` command is taken away from one container: the backend falls back to one rule per
source (with a warning) and converges; once ``ipset`` is back, the next run moves the whitelist into
sets and removes the per-source rules; both states are stable on a second run. Uses the lab of
test_firewall.py (same network, image and helpers). Needs what test_firewall.py needs.
"""

import pytest
from test_firewall import foreign_tables, lab, podman_host, write_inventory  # noqa: F401 pylint: disable=unused-import

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULE = "-A PORTGUARD-IN -s 198.51.100.0/24 -p udp -m udp --dport 53"
SET_RULE = "-A PORTGUARD-IN -m set --match-set portguard-in4 src,dst -j ACCEPT"
ELEMENT = "add portguard-in4 198.51.100.0/24,udp:53"
# the real tool, and the logging shim test_firewall.py puts first on PATH
IPSET = ("/usr/sbin/ipset", "/usr/local/sbin/ipset")


def test_without_ipset_rules_then_sets_once_installed(lab, tmp_path):  # noqa: F811 - the imported fixture
    box = lab.container("pgit-ipset-arrives", "172.30.91.42")
    try:
        box.sh("; ".join(f"mv {path} {path}.off" for path in IPSET))
        inventory = write_inventory(tmp_path / "hosts.yml", podman_host(lab, box, "iptables"))

        first = lab.playbook(inventory).ok(box.name)
        assert first["changed"] is True and first["iptables_whitelist"] == "rules"
        assert any("falls back to one rule per source" in warning for warning in first.get("warnings", []))
        live = box.ours("iptables")
        assert RULE in live and SET_RULE not in live
        assert box.sh("cat /etc/portguard/ruleset.ipset /etc/portguard/sets") == ""
        assert lab.playbook(inventory).ok(box.name)["changed"] is False

        box.sh("; ".join(f"mv {path}.off {path}" for path in IPSET))
        moved = lab.playbook(inventory).ok(box.name)
        assert moved["changed"] is True and moved["iptables_whitelist"] == "ipset"
        assert not moved.get("warnings")
        assert f"ipv4 {RULE}" in moved["diff"]["before"] and f"ipv4 {SET_RULE}" in moved["diff"]["after"]
        live = box.ours("iptables")
        assert SET_RULE in live and ELEMENT in live and RULE not in live
        assert "create portguard-in4-new" in box.sh("cat /etc/portguard/ruleset.ipset")
        assert lab.playbook(inventory).ok(box.name)["changed"] is False
        assert foreign_tables(box) == box.foreign_before
    finally:
        box.remove()
