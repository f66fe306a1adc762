"""portguard.hardening.firewall on a host whose distribution firewall flushes everything when it loads.

Debian's nftables package installs /etc/nftables.conf starting with ``flush ruleset``; once
nftables.service is enabled, its every load removes our table. These containers run no systemd, so
the service is enabled the way ``systemctl enable`` does it (the wants symlink) and "loaded" by running
its ExecStart command by hand. The run warns about it, a check-mode run then says that our table is
missing because something flushed it (not a generic diff), and the next real run restores it. Uses
the lab of test_firewall.py (same network, image and helpers).
"""

import pytest
from test_firewall import lab, podman_host, write_inventory  # noqa: F401 pylint: disable=unused-import

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WANTS = "/etc/systemd/system/sysinit.target.wants/nftables.service"
WARNING = "nftables.service is enabled and /etc/nftables.conf starts with 'flush ruleset'"


def test_enabled_flushing_unit_is_warned_about_and_a_flushed_table_reported(lab, tmp_path):  # noqa: F811
    box = lab.container("pgit-flush-risk", network=True, foreign=False)
    try:
        assert box.sh("grep -x 'flush ruleset' /etc/nftables.conf").strip() == "flush ruleset", \
            "the image's nftables package no longer ships Debian's default /etc/nftables.conf"
        inventory = write_inventory(tmp_path / "hosts.yml", podman_host(lab, box, "nftables"))
        quiet = lab.playbook(inventory).ok(box.name)
        assert quiet["state"] == "confirmed"
        assert not any("nftables.service" in warning for warning in quiet.get("warnings", []))

        box.sh(f"mkdir -p {WANTS.rsplit('/', 1)[0]} && ln -s /lib/systemd/system/nftables.service {WANTS}")
        warned = lab.playbook(inventory).ok(box.name)
        assert warned["changed"] is False
        assert any(WARNING in warning for warning in warned.get("warnings", [])), warned.get("warnings")

        box.sh("/usr/sbin/nft -f /etc/nftables.conf")  # nftables.service's ExecStart / ExecReload
        assert box.ours("nftables") == ""
        check = lab.playbook(inventory, check=True).ok(box.name)
        assert check["changed"] is True
        assert check["table_missing"].startswith(
            "table inet portguard is missing from the live ruleset although portguard applied it: something flushed it")
        assert check["diff"]["before_header"] == "live nftables (missing)"
        assert box.ours("nftables") == ""
        repaired = lab.playbook(inventory).ok(box.name)
        assert repaired["changed"] is True and repaired["state"] == "confirmed"
        assert "table inet portguard" in box.ours("nftables")
        assert lab.playbook(inventory).ok(box.name)["changed"] is False
    finally:
        box.remove()
