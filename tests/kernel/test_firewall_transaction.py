"""The host's firewall transaction in a real kernel: revert arming, confirm and persistence under the
lock, payload checks of direct calls, and re-loading after the distribution's ``flush ruleset``.

Each scenario of ``transaction_agent.py`` runs in its own network namespace (``unshare --net``) with
the host's state, boot files and loader in a temporary directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import normalize_nft

pytestmark = pytest.mark.kernel

AGENT = Path(__file__).with_name("transaction_agent.py")


def scenario(name, tmp_path, *tools):
    require("unshare", "nft", *tools)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(["unshare", "--net", sys.executable, str(AGENT), name, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{name} failed: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_a_slow_record_write_does_not_disarm_the_revert(tmp_path):
    """The revert process started before its record landed used to exit as 'confirmed' at its first tick."""
    found = scenario("slow_record", tmp_path)
    assert 'comment "lock"' in found["locked"], "the locking ruleset never went live"
    assert found["reverted"], "the revert never ran: it disarmed itself before the record was written"
    assert found["after_deadline"] is not None and 'comment "open"' in found["after_deadline"]


def test_interleaved_runs_leave_boot_equal_to_live(tmp_path):
    found = scenario("interleaved", tmp_path)
    assert found["states"] == ["confirmed", "confirmed"]
    assert found["boot"] == found["live"], "a slower confirm persisted its ruleset after a later run's"


def test_a_persistence_error_after_confirm_is_no_refused_confirmation(tmp_path):
    found = scenario("persistence_error", tmp_path)
    reply = found["reply"]
    assert "escaped" not in reply, reply
    assert reply["state"] == "confirmed" and reply["failed"] is True and "Not a directory" in reply["persistence_error"]
    assert reply["msg"].startswith("the ruleset is live and confirmed, but persisting it for boot failed: ")
    assert not found["pending"], "the confirmed change would still revert"
    assert 'comment "open"' in " ".join(found["live"])


def test_direct_calls_cannot_steer_iptables_beyond_our_chains(tmp_path):
    found = scenario("hostile_iptables", tmp_path, "iptables-restore", "iptables-save")
    assert not found["marker"], "a jump ran a shell command"
    assert "refused ruleset.jumps[0]" in found["found"]["jumps"]
    assert "refused ruleset.ipv4 line 5 (text after COMMIT)" in found["found"]["payload"]
    assert "refused ruleset.ipv4 line 4 (appends to a chain that is not ours)" in found["found"]["chain"]
    assert found["unchanged"], "iptables changed"


def test_direct_calls_cannot_write_other_nftables_tables(tmp_path):
    found = scenario("hostile_nft", tmp_path)
    assert "table inet f2b-table" in found["tables"], "another table was deleted"
    assert found["found"].startswith("refused ruleset line 9 (only table inet portguard may be written)")
    assert found["ours"] is None


def test_reload_after_debians_flush_ruleset_restores_our_table(tmp_path):
    found = scenario("debian_reload", tmp_path)
    assert found["loaded"] and found["flushed"] is None
    drift = found["drift"]
    assert drift["table_missing"].startswith("table inet portguard is missing from the live ruleset although "
                                             "portguard applied it: something flushed it")
    assert drift["table_missing"].endswith(": a real run restores it")
    assert drift["diff"]["before_header"] == "live nftables (missing)" and drift["changed"] is True
    assert 'comment "open"' in found["reloaded"]
    assert normalize_nft(found["reloaded"])[0] == "table inet portguard {"
    assert "table inet filter" in found["tables"], "Debian's own table is gone"
