"""The host's firewall transaction without a kernel: revert identity, repeated confirm, removal, input checks.

A stand-in backend (no nft, no iptables) drives ``firewall_host.Host`` with real files and real processes;
the module's ``run_phase`` is called the way Ansible would, with ruleset values a direct caller could send.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from support.fakes import FakeModule

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import PayloadRefused
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import (
    check_iptables_payload,
    check_jumps,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import check_nft_payload
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall import transaction as firewall_host
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import check_ruleset
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.persist import unit_text
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.transaction import Host
from ansible_collections.portguard.hardening.plugins.module_utils.host.processes import start_time
from ansible_collections.portguard.hardening.plugins.module_utils.host.run import HostError
from ansible_collections.portguard.hardening.plugins.modules import firewall as firewall_module


class StandInBackend:
    """Reports a difference on every apply; its steps write marker files instead of touching a kernel."""

    name = "nftables"

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path

    def validate(self, ruleset):
        pass

    def live(self):
        return None

    def compare(self, ruleset):
        return [], [ruleset]

    def apply_steps(self, ruleset):
        return [[["sh", "-c", f"echo {ruleset} >> {self.tmp_path}/applied"], None]]

    def restore_steps(self, snapshot):
        return [[["sh", "-c", f"echo reverted >> {self.tmp_path}/reverted"], None]]

    def persist_files(self, ruleset, fallback):
        return {"ruleset.nft": ruleset, "fallback.nft": fallback}

    def loader(self, persist_dir):
        return f"#!/bin/sh\nnft -f {persist_dir}/ruleset.nft\n"


def make_host(tmp_path, persist_dir=None):
    return Host(state_dir=str(tmp_path / "run"), persist_dir=str(persist_dir or tmp_path / "etc"),
                unit_path=str(tmp_path / "unit" / "portguard.service"), loader_path=str(tmp_path / "sbin" / "load"))


@pytest.fixture
def stranger():
    """A process that is not a revert process: it must never be signalled."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def write_pending(host, **record):
    with open(os.path.join(host.state_dir, "pending.json"), "w") as handle:
        json.dump({"token": "t1", "deadline": time.time() + 60, "timeout": 60, "restore": [], **record}, handle)


def test_confirm_never_signals_a_stranger_with_the_recorded_pid(tmp_path, stranger):
    host = make_host(tmp_path)
    # the revert process died and its pid went to another process (another start time)
    write_pending(host, pid=stranger.pid, start="1")
    assert host.confirm("t1") == {"state": "confirmed"}
    time.sleep(0.2)
    assert stranger.poll() is None, "confirm sent SIGTERM to a process that is not the revert process"


def test_a_record_whose_pid_is_a_stranger_is_stale_and_reverted(tmp_path, stranger):
    host = make_host(tmp_path)
    restore = [[["sh", "-c", f"echo reverted > {tmp_path}/reverted"], None]]
    write_pending(host, pid=stranger.pid, start="1", restore=restore)
    started = time.monotonic()
    result = host.apply(StandInBackend(tmp_path), "b", check_mode=True, arm=False, timeout=1)
    assert time.monotonic() - started < 5, "the run waited for a stranger as if it were the revert process"
    assert "a real run reverts it" in result["stale_change"]
    assert os.path.exists(os.path.join(host.state_dir, "pending.json"))  # check mode writes nothing
    result = host.apply(StandInBackend(tmp_path), "b", check_mode=False, arm=False, timeout=1)
    assert result["stale_change"].endswith("reverted")
    assert (tmp_path / "reverted").read_text() == "reverted\n"
    assert stranger.poll() is None


def test_a_record_long_past_its_deadline_is_stale_even_with_its_revert_process_alive(tmp_path):
    host = make_host(tmp_path)
    # a live process with the identity the record names (pid, start time, token on its command line)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "t1"])
    try:
        time.sleep(0.1)
        write_pending(host, pid=proc.pid, start=start_time(proc.pid),
                      deadline=time.time() - firewall_host.STALE_GRACE - 1)
        result = host.apply(StandInBackend(tmp_path), "b", check_mode=False, arm=False, timeout=1)
        assert result["stale_change"].endswith("reverted")
        assert proc.wait(timeout=5) == -15, "the late revert process was not stopped"
    finally:
        proc.kill()


def test_a_repeated_confirm_answers_confirmed_and_persists_only_the_latest(tmp_path):
    host, backend = make_host(tmp_path), StandInBackend(tmp_path)
    persist = {"backend": backend, "ruleset": "a", "fallback": "f", "systemd": False, "state": "present"}
    # apply records what its confirm persists: the ruleset is not sent a second time
    first = host.apply(backend, "a", check_mode=False, arm=True, timeout=30, persist=persist)
    assert host.confirm(first["token"], persist=True)["state"] == "confirmed"
    # the reply was lost: the controller confirms again
    again = host.confirm(first["token"], persist=True)
    assert again["state"] == "confirmed" and again["repeated"] is True
    assert host.status(first["token"]) == {"state": "confirmed"}
    second = host.apply(backend, "b", check_mode=False, arm=True, timeout=30, persist=dict(persist, ruleset="b"))
    assert host.confirm(second["token"], persist=True)["persistence"]["changed"] is True
    late = host.confirm(first["token"], persist=True)  # an old token's retry does not overwrite the boot files
    assert late["state"] == "confirmed" and late["persistence"]["changed"] is False
    assert (tmp_path / "etc" / "ruleset.nft").read_text() == "b"
    with pytest.raises(HostError, match="nothing to confirm"):
        host.confirm("0" * 32)


def test_a_persistence_error_after_confirm_is_reported_as_such(tmp_path):
    (tmp_path / "file").write_text("")
    host, backend = make_host(tmp_path, persist_dir=tmp_path / "file" / "portguard"), StandInBackend(tmp_path)
    token = host.apply(backend, "a", check_mode=False, arm=True, timeout=30,
                       persist={"backend": backend, "ruleset": "a", "fallback": "f", "systemd": False,
                                "state": "present"})["token"]
    result = host.confirm(token, persist=True)
    assert result["state"] == "confirmed" and "Not a directory" in result["persistence_error"]
    assert not os.path.exists(os.path.join(host.state_dir, "pending.json"))
    assert firewall_module.persisted(result, "the ruleset is live and confirmed")["msg"].startswith(
        "the ruleset is live and confirmed, but persisting it for boot failed: ")


def test_absent_removes_only_our_files(tmp_path):
    host = make_host(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("ruleset.nft", "fallback.nft", "jumps"):
        (etc / name).write_text("ours")
    (etc / "README.admin").write_text("an admin's note")
    (etc / "archive").mkdir()
    (etc / "archive" / "old.nft").write_text("kept")
    result = host.persist(None, None, None, check_mode=False, systemd=False, state="absent")
    assert result["changed"] is True
    assert sorted(p.name for p in etc.iterdir()) == ["README.admin", "archive"]
    assert (etc / "archive" / "old.nft").read_text() == "kept"
    (etc / "README.admin").unlink()
    (etc / "archive" / "old.nft").unlink()
    (etc / "archive").rmdir()
    (etc / "ruleset.nft").write_text("ours")
    host.persist(None, None, None, check_mode=False, systemd=False, state="absent")
    assert not etc.exists(), "our directory, empty once our files are gone, was left"


def test_boot_unit_runs_after_the_distribution_firewall_and_again_when_it_reloads():
    unit = unit_text("/usr/local/sbin/portguard-load")
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("WantedBy"))
    for key in ("After", "PartOf", "ReloadPropagatedFrom"):
        assert {"nftables.service", "netfilter-persistent.service", "ufw.service"} <= set(lines[key].split()), key
    assert "network-pre.target" in lines["Before"].split()
    assert lines["ExecStart"] == lines["ExecReload"] == "/usr/local/sbin/portguard-load"
    # firewalld starts after sysinit.target, which waits for us: After=firewalld.service would be a cycle
    assert "firewalld" not in unit


PARAMS = {"phase": "apply", "backend": "nftables", "state": "present", "rollback_timeout": 30,
          "arm_rollback": True, "persist": True, "token": None}
GOOD_IPV4 = "*filter\n:PORTGUARD-IN - [0:0]\n-A PORTGUARD-IN -i lo -j ACCEPT\nCOMMIT\n"
GOOD = {"ipv4": GOOD_IPV4, "ipv6": GOOD_IPV4, "jumps": [["INPUT", "PORTGUARD-IN"]], "ipset": "", "sets": []}


@pytest.fixture
def module_on_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(firewall_module, "Host", lambda: make_host(tmp_path))
    monkeypatch.setattr(firewall_module, "detect", lambda: {"systemd": False, "legacy_rules": 0,
                                                            "iptables_variant": "nf_tables"})
    monkeypatch.setattr(firewall_module, "flush_risks", lambda backend, facts: [], raising=False)
    return FakeModule()


@pytest.mark.parametrize(("backend", "ruleset", "problem"), [
    ("nftables", ["table inet portguard {}"], "ruleset must be the rendered nftables text (a string), not list"),
    ("nftables", {"ipv4": ""}, "ruleset must be the rendered nftables text (a string), not dict"),
    ("iptables", "*filter\nCOMMIT\n", "ruleset must be a dict with ipv4, ipv6 and jumps"),
    ("iptables", {"ipv4": GOOD_IPV4, "ipv6": GOOD_IPV4}, "missing keys ['jumps']"),
    ("iptables", dict(GOOD, ipv4=["-A INPUT -j ACCEPT"]), "ruleset.ipv4 must be a string, not list"),
    ("iptables", dict(GOOD, jumps="INPUT PORTGUARD-IN"), "ruleset.jumps must be a list"),
])
def test_a_ruleset_of_the_wrong_type_is_a_clear_error(module_on_tmp, backend, ruleset, problem):
    fallback = "table inet portguard {}\n" if backend == "nftables" else GOOD
    params = dict(PARAMS, backend=backend, ruleset=ruleset, fallback=fallback)
    with pytest.raises(PortguardError) as refused:
        firewall_module.run_phase(module_on_tmp, params)
    assert problem in str(refused.value)
    with pytest.raises(PortguardError, match="fallback must be"):
        firewall_module.run_phase(module_on_tmp, dict(params, ruleset=fallback, fallback=42))


@pytest.mark.parametrize(("jumps", "problem"), [
    ([["INPUT", "PORTGUARD-IN; touch /tmp/pwned"]], "refused ruleset.jumps[0]"),
    ([["INPUT", "DOCKER"]], "refused ruleset.jumps[0]"),
    ([["FORWARD", "PORTGUARD-IN"]], "refused ruleset.jumps[0]"),
    ([["INPUT", "PORTGUARD-IN", "x"]], "refused ruleset.jumps[0]"),
    ([["INPUT", "PORTGUARD-IN"], ["INPUT", "PORTGUARD-IN"]], "listed twice"),
])
def test_jumps_are_whitelisted(jumps, problem):
    with pytest.raises(PayloadRefused, match=problem.replace("[", r"\[").replace("]", r"\]")):
        check_jumps(jumps, "ruleset.jumps")


@pytest.mark.parametrize(("line", "problem"), [
    ("-A INPUT -j ACCEPT", "appends to a chain that is not ours"),
    ("-A PORTGUARD-IN -j DOCKER", "jumps to 'DOCKER'"),
    ("-A PORTGUARD-IN -g PORTGUARD-OUT", "-g is not allowed"),
    ("-A PORTGUARD-IN -t nat -j ACCEPT", "-t is not allowed"),
    ("-A PORTGUARD-IN -m set --match-set f2b-sshd src -j ACCEPT", "matches set 'f2b-sshd'"),
    (":DOCKER-USER - [0:0]", "declares a chain that is not ours"),
    (":INPUT ACCEPT [0:0]", "declares a chain that is not ours"),
    ("-F INPUT", "not a line portguard renders"),
    ("-A PORTGUARD-IN -m comment --comment \"x -j ACCEPT", "unparsable"),
    ("COMMIT\n*nat\n-A POSTROUTING -j ACCEPT", "text after COMMIT"),
])
def test_iptables_payload_touches_only_our_chains(line, problem):
    payload = GOOD_IPV4.replace("COMMIT\n", line + "\nCOMMIT\n")
    with pytest.raises(PayloadRefused, match=f"refused ruleset.ipv4 line .*{problem[:20]}".replace("[", r"\[")):
        check_iptables_payload(payload, "ruleset.ipv4")


def test_iptables_payload_must_be_one_filter_table():
    with pytest.raises(PayloadRefused, match="must start with \\*filter"):
        check_iptables_payload("*nat\n-A POSTROUTING -j ACCEPT\nCOMMIT\n", "ruleset.ipv4")
    with pytest.raises(PayloadRefused, match="does not end with COMMIT"):
        check_iptables_payload("*filter\n:PORTGUARD-IN - [0:0]\n", "ruleset.ipv4")


def test_rendered_iptables_rulesets_pass_the_host_checks(example_policy, example_hosts):
    from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables

    for host in example_hosts:
        for ipset in (True, False):
            check_ruleset("iptables", render_iptables(example_policy.host(host), ipset=ipset).as_dict(), "ruleset")
        check_ruleset("iptables", render_iptables(example_policy.host(host).management_only()).as_dict(), "fallback")


def test_rendered_nftables_rulesets_pass_the_host_checks(example_policy, example_hosts):
    from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables

    for host in example_hosts:
        check_ruleset("nftables", render_nftables(example_policy.host(host)), "ruleset")
        check_ruleset("nftables", render_nftables(example_policy.host(host).management_only()), "fallback")


NFT_OURS = "table inet portguard\ndelete table inet portguard\ntable inet portguard {\n  chain input {\n" \
           '    type filter hook input priority filter; policy accept;\n    iif "lo" accept comment "x"\n  }\n}\n'


@pytest.mark.parametrize(("extra", "problem"), [
    ("flush ruleset", "only table inet portguard may be written"),
    ("delete table inet f2b-table", "only table inet portguard may be written"),
    ("table inet portguard; flush ruleset", "only table inet portguard may be written"),
    ('include "/etc/nftables.conf"', "include is not allowed"),
    ("}", "unbalanced braces"),
])
def test_nftables_payload_touches_only_our_table(extra, problem):
    with pytest.raises(PayloadRefused, match=f"refused ruleset line .*{problem}"):
        check_nft_payload(NFT_OURS + extra + "\n", "ruleset")


def test_a_quoted_brace_cannot_move_the_top_level():
    # nft ignores a brace inside a string: the "{" must not make the next line count as inside our table
    tricked = NFT_OURS.replace('comment "x"', 'comment "{"') + "flush ruleset\n"
    with pytest.raises(PayloadRefused, match="line 9 .*only table inet portguard"):
        check_nft_payload(tricked, "ruleset")


@pytest.mark.parametrize("tricked", [
    # a string that runs across lines (nft's lexer allows it) holds a brace, then one closes it again
    NFT_OURS.replace('comment "x"', 'comment "{\n"') + "flush ruleset\n"
    + 'table inet portguard {\n chain c {\n iif "lo" accept comment "}\n"\n }\n}\n',
    # a quote inside a comment starts no string
    NFT_OURS + '# "\nflush ruleset\n# "\n',
])
def test_strings_and_comments_are_read_as_nft_reads_them(tricked):
    with pytest.raises(PayloadRefused, match="only table inet portguard may be written"):
        check_nft_payload(tricked, "ruleset")
