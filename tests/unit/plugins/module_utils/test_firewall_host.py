"""The host's iptables backend without a kernel: set normalization, payload checks, step order, loader."""

import datetime
import re
import subprocess

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import SETS, PayloadRefused
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.ipset import (
    check_ipset_payload,
    normalize_ipset,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall import backends as firewall_backends
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import (
    IptablesBackend,
    live_lines,
)

SERVICES = {"ssh": {"port": 22}, "https": {"port": 443}, "workers": {"port": "8000-8002"}}
FLOWS = [{"name": "web", "from": "office", "to": "web1", "services": ["https", "workers"]}]
# What `ipset save portguard-in4` prints after the payload of policy_for(FLOWS, SERVICES) was swapped in.
SAVED = """create portguard-in4 hash:net,port family inet hashsize 1024 maxelem 65536 counters comment bucketsize 12 initval 0x1f
add portguard-in4 10.20.0.0/16,tcp:8001 packets 3 bytes 180 comment "web/workers"
add portguard-in4 10.99.0.0/24,tcp:22 packets 0 bytes 0 comment "management/ssh"
add portguard-in4 10.20.0.0/16,tcp:443 packets 0 bytes 0 comment "web/https"
add portguard-in4 10.20.0.0/16,tcp:8000 packets 0 bytes 0 comment "web/workers"
add portguard-in4 10.20.0.0/16,tcp:8002 packets 0 bytes 0 comment "web/workers"
create portguard-in6 hash:net,port family inet6 hashsize 1024 maxelem 65536 counters comment bucketsize 12 initval 0x2
add portguard-in6 2001:db8:99::/64,tcp:22 packets 0 bytes 0 comment "management/ssh"
"""


def policy_for(flows, services, **host_settings):
    catalog = {
        "portguard_networks": {"office": ["10.20.0.0/16"], "admins": ["10.99.0.0/24", "2001:db8:99::/64"]},
        "portguard_services": services,
        "portguard_flows": flows,
        "portguard_management": {"from": "admins", "services": ["ssh"]},
    }
    hostvars = {"web1": {"portguard_addresses": ["10.0.1.1", "2001:db8:1::1"], **host_settings}}
    return compile_catalog(catalog, {"all": ["web1"]}, hostvars, today=datetime.date(2026, 11, 26)).host("web1")


@pytest.fixture
def ruleset():
    return render_iptables(policy_for(FLOWS, SERVICES), ipset=True).as_dict()


def test_saved_sets_compare_equal_to_the_rendered_payload(ruleset):
    assert normalize_ipset(SAVED) == normalize_ipset(ruleset["ipset"], rendered=True)
    assert normalize_ipset(SAVED)[:2] == [
        "create portguard-in4 hash:net,port family inet maxelem 65536 counters comment",
        'add portguard-in4 10.20.0.0/16,tcp:443 comment "web/https"',
    ]


def test_set_drift_shows_in_the_comparison(ruleset):
    rendered = normalize_ipset(ruleset["ipset"], rendered=True)
    extra = SAVED + "add portguard-in4 203.0.113.0/24,tcp:22 packets 0 bytes 0\n"
    assert set(normalize_ipset(extra)) - set(rendered) == {"add portguard-in4 203.0.113.0/24,tcp:22"}
    missing = SAVED.replace('add portguard-in4 10.20.0.0/16,tcp:8001 packets 3 bytes 180 comment "web/workers"\n', "")
    assert set(rendered) - set(normalize_ipset(missing)) == {'add portguard-in4 10.20.0.0/16,tcp:8001 comment "web/workers"'}
    # a leftover -new set of an interrupted apply is not ours to hide
    assert "create portguard-in4-new hash:net,port family inet6 maxelem 65536 counters comment" in normalize_ipset(
        SAVED.replace("portguard-in6", "portguard-in4-new"))


def test_rendered_payloads_pass_the_host_check(example_policy, example_hosts):
    for host in example_hosts:
        rendered = render_iptables(example_policy.host(host), ipset=True).as_dict()
        check_ipset_payload(rendered["ipset"], [tuple(s) for s in rendered["sets"]])
    check_ipset_payload("", [])


@pytest.mark.parametrize("line", [
    "create docker-hosts-new hash:net,port family inet hashsize 64 maxelem 65536 counters comment",
    "flush portguard-in4",
    "destroy portguard-in4",
    "swap portguard-in4-new portguard-in6",
    "add portguard-in4-new 10.0.0.0/8,tcp:22 comment \"x\" -exist",
    "add portguard-in4-new 10.0.0.0/8,icmp:ping comment \"x\"",
    "add portguard-in4-new 10.0.0.0/8,tcp:22 comment \"a\" comment \"b\"",
])
def test_host_refuses_foreign_sets_and_other_commands(ruleset, line):
    with pytest.raises(PayloadRefused, match="refused ipset payload line"):
        check_ipset_payload(ruleset["ipset"] + line + "\n", [tuple(s) for s in ruleset["sets"]])


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("10.20.0.0/16,tcp:443", "0.0.0.0/0,tcp:443", "a /0"),
    ("10.20.0.0/16,tcp:443", "10.20.0.1/16,tcp:443", "has host bits set"),
    ("10.20.0.0/16,tcp:443", "2001:db8::/32,tcp:443", "another family"),
    ("10.20.0.0/16,tcp:443", "10.20.0.0/16,tcp:70000", "port out of range"),
    ("10.20.0.0/16,tcp:443", "10.20.0.0/16,tcp:9-8", "port out of range"),
    ("10.20.0.0/16,tcp:443", "10.99.0.0/24,tcp:22", "duplicate element"),
    ('comment "web/https"', 'comment "' + "é" * 128 + '"', "comment over 255 bytes"),
    ("maxelem 65536", "maxelem 3", "more elements than maxelem 3"),
    ("swap portguard-in4-new portguard-in4\n", "", "destroy before swap"),
    ("create portguard-in6-new hash:net,port family inet6", "create portguard-in6-new hash:net,port family inet",
     "is not listed with family inet"),
])
def test_host_refuses_what_the_kernel_would(ruleset, old, new, problem):
    payload = ruleset["ipset"].replace(old, new, 1)
    assert payload != ruleset["ipset"]
    with pytest.raises(PayloadRefused, match=re.escape(problem)):
        check_ipset_payload(payload, [tuple(s) for s in ruleset["sets"]])


def test_host_refuses_a_payload_that_leaves_a_listed_set_out(ruleset):
    with pytest.raises(PayloadRefused, match="exactly the listed sets"):
        check_ipset_payload(ruleset["ipset"], [*map(tuple, ruleset["sets"]), ("portguard-out4", "inet")])


def test_validation_writes_nothing_and_tests_set_rules_once_the_sets_exist(ruleset, monkeypatch):
    calls = []

    def fake_run(argv, data=None, check=True):
        calls.append((argv, data))
        stdout = "portguard-in4\n" if argv[:2] == ["ipset", "list"] else ""
        return subprocess.CompletedProcess(argv, 0, stdout, "")

    monkeypatch.setattr(firewall_backends, "run", fake_run)
    monkeypatch.setattr(firewall_backends.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    IptablesBackend().validate(ruleset)
    assert {argv[0] for argv, _data in calls} == {"ipset", "iptables-restore", "ip6tables-restore"}
    assert all(argv[:2] == ["ipset", "list"] or argv[1:] == ["--test", "--noflush"] for argv, _data in calls)
    tested = {argv[0]: data for argv, data in calls if argv[0].endswith("-restore")}
    # portguard-in4 exists: its rule is tested; portguard-in6 does not yet: its rule is left out
    assert "--match-set portguard-in4 src,dst" in tested["iptables-restore"]
    assert "--match-set" not in tested["ip6tables-restore"]
    assert tested["ip6tables-restore"].splitlines() == [
        line for line in ruleset["ipv6"].splitlines() if "--match-set" not in line]


@pytest.mark.parametrize("sets", [[("docker", "inet")], [("portguard-in4", "inet6")], [("portguard-in4; reboot", "inet")]])
def test_host_refuses_other_set_names_and_families(sets):
    with pytest.raises(PayloadRefused, match="not one of portguard's own sets"):
        check_ipset_payload("", sets)


def commands(steps):
    return [" ".join(argv) if argv[0] != "sh" else f"sh: {argv[2].splitlines()[0]}" for argv, _data in steps]


def test_apply_order_sets_then_rules_then_stale_chains_and_sets(ruleset):
    steps = IptablesBackend().apply_steps(ruleset)
    names = commands(steps)
    assert names[0].startswith("sh: ipset destroy portguard-in4-new 2>/dev/null; ipset list -n portguard-in4")
    assert "ipset create portguard-in6 hash:net,port family inet6 counters comment" in steps[0][0][2]
    assert names[1] == "ipset restore" and steps[1][1] == ruleset["ipset"]
    assert names[2] == "iptables-restore --noflush" and names[4] == "ip6tables-restore --noflush"
    assert names.index("iptables-restore --noflush") > names.index("ipset restore")
    # egress off: PORTGUARD-OUT (if an earlier run made it) goes, then the out sets nothing references
    assert any("PORTGUARD-OUT" in argv[2] and "-X PORTGUARD-OUT" in argv[2] for argv, _data in steps[6:8])
    destroy = steps[-1][0][2]
    assert "portguard-out4 portguard-out4-new portguard-out6" in destroy and "portguard-in4 " not in destroy


def test_fallback_variant_destroys_every_set_of_an_earlier_run():
    plain = render_iptables(policy_for(FLOWS, SERVICES)).as_dict()
    steps = IptablesBackend().apply_steps(plain)
    assert commands(steps)[0] == "iptables-restore --noflush"
    assert "ipset" not in " ".join(commands(steps)[:-1])
    for name in SETS:
        assert f" {name} " in steps[-1][0][2]


def test_revert_removes_ours_then_restores_sets_before_rules():
    snapshot = {"ipv4": "*filter\n:PORTGUARD-IN - [0:0]\n-A INPUT -j PORTGUARD-IN\n"
                        "-A PORTGUARD-IN -m set --match-set portguard-in4 src,dst -j ACCEPT\nCOMMIT\n",
                "ipv6": "", "ipset": SAVED}
    names = commands(IptablesBackend().restore_steps(snapshot))
    restore = names.index("ipset restore")
    assert all(name.startswith("sh: while ") for name in names[:restore - 1])
    assert names[restore - 1] == "sh: command -v ipset >/dev/null 2>&1 || exit 0"
    assert names[restore + 1:] == ["iptables-restore --noflush", "iptables -I INPUT 1 -j PORTGUARD-IN",
                                   "ip6tables-restore --noflush"]
    absent = commands(IptablesBackend().restore_steps(None))
    assert "ipset restore" not in absent and absent[-1].startswith("sh: command -v ipset")


def test_destroy_script_and_loader_are_valid_shell(ruleset):
    backend = IptablesBackend()
    for argv, _data in backend.apply_steps(ruleset) + backend.restore_steps(None):
        if argv[0] == "sh":
            subprocess.run(["sh", "-n", "-c", argv[2]], check=True)
    subprocess.run(["sh", "-n", "-c", backend.loader()], check=True)
    assert backend.loader().index("ipset restore") < backend.loader().index("iptables-restore")


def test_persisted_files_always_carry_the_set_files(ruleset):
    fallback = render_iptables(policy_for(FLOWS, SERVICES).management_only()).as_dict()
    files = IptablesBackend().persist_files(ruleset, fallback)
    assert files["ruleset.ipset"] == ruleset["ipset"]
    assert files["sets"] == "portguard-in4 inet\nportguard-in6 inet6\n"
    plain = IptablesBackend().persist_files(fallback, fallback)
    assert plain["ruleset.ipset"] == "" and plain["sets"] == ""


def test_absent_diff_lists_sets_too():
    lines = live_lines({"ipv4": "-A INPUT -j PORTGUARD-IN\n", "ipv6": "", "ipset": SAVED})
    assert "ipv4 -A INPUT -j PORTGUARD-IN" in lines
    assert 'ipset add portguard-in6 2001:db8:99::/64,tcp:22 comment "management/ssh"' in lines
