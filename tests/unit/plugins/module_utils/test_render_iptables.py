"""iptables renderer: golden files of examples/inventory and the renderer's contract."""

import datetime
import re

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import SET_COMMENT_BYTES
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.ipset import SET_MAXELEM, SET_PORT_SPAN
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import (
    COMMENT_BYTES,
    MULTIPORT_SLOTS,
    render_iptables,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

TODAY = datetime.date(2026, 11, 26)


def test_golden_iptables(example_policy, example_hosts, golden):
    for host in example_hosts:
        ruleset = render_iptables(example_policy.host(host))
        golden(f"{host}.ipv4.rules", ruleset.ipv4)
        golden(f"{host}.ipv6.rules", ruleset.ipv6)


def test_golden_iptables_ipset(example_policy, example_hosts, golden):
    for host in example_hosts:
        ruleset = render_iptables(example_policy.host(host), ipset=True)
        golden(f"{host}.ipset", ruleset.ipset)
        golden(f"{host}.ipset.ipv4.rules", ruleset.ipv4)
        golden(f"{host}.ipset.ipv6.rules", ruleset.ipv6)


def policy_for(flows=None, services=None, **host_settings):
    catalog = {
        "portguard_networks": {"office": ["10.20.0.0/16"], "admins": ["10.99.0.0/24", "2001:db8:99::/64"]},
        "portguard_services": services or {
            "ssh": {"port": 22, "purpose": "Remote administration", "owner": "platform"},
            "https": {"port": 443, "purpose": "Public web traffic", "owner": "web"},
            "dns": {"port": 53, "proto": ["tcp", "udp"], "purpose": "DNS", "owner": "platform"},
        },
        "portguard_flows": flows or [{"name": "office-web", "from": "office", "to": "web1", "services": ["https"]}],
        "portguard_management": {"from": "admins", "services": ["ssh"]},
    }
    hostvars = {
        "web1": {"portguard_addresses": ["10.0.1.1", "2001:db8:1::1"], **host_settings},
        "db1": {"portguard_addresses": ["10.0.2.1", "10.0.2.2"]},
    }
    return compile_catalog(catalog, {"all": ["web1", "db1"]}, hostvars, today=TODAY).host("web1")


def accepts(payload):
    return [line for line in payload.splitlines() if line.endswith("-j ACCEPT") and "--dport" in line]


def test_owns_only_its_chains_and_both_families_are_always_rendered():
    ruleset = render_iptables(policy_for())
    assert ruleset.jumps == (("INPUT", "PORTGUARD-IN"),)
    for payload in (ruleset.ipv4, ruleset.ipv6):
        lines = payload.splitlines()
        assert lines[1:3] == ["*filter", ":PORTGUARD-IN - [0:0]"]
        assert lines[-1] == "COMMIT"
        assert all(line.startswith(("#", "*", ":PORTGUARD-", "-A PORTGUARD-", "COMMIT")) for line in lines)
        assert "-F" not in payload.split() and "-X" not in payload.split()
    # office has no IPv6 network: only the management entry is whitelisted for IPv6.
    assert [line.split(" -m comment")[0] for line in accepts(ruleset.ipv6)] == [
        "-A PORTGUARD-IN -s 2001:db8:99::/64 -p tcp -m tcp --dport 22"]
    assert ruleset.as_dict()["jumps"] == [["INPUT", "PORTGUARD-IN"]]


@pytest.mark.parametrize(("settings", "ipv4", "ipv6"), [
    ({}, "-j REJECT --reject-with icmp-admin-prohibited", "-j REJECT --reject-with icmp6-adm-prohibited"),
    ({"portguard_deny": "drop"}, "-j DROP", "-j DROP"),
    ({"portguard_mode": "audit"}, "-j ACCEPT", "-j ACCEPT"),
])
def test_default_verdict(settings, ipv4, ipv6):
    ruleset = render_iptables(policy_for(**settings))
    for payload, verdict in ((ruleset.ipv4, ipv4), (ruleset.ipv6, ipv6)):
        lines = payload.splitlines()
        assert lines[-2] == f"-A PORTGUARD-IN -m comment --comment denied_in {verdict}"
        assert lines[-3].startswith("-A PORTGUARD-IN -m limit --limit 10/min -j LOG")


def test_address_forms_as_iptables_save_prints_them():
    flows = [
        {"name": "pub", "from": "any", "to": "web1", "services": ["https"]},
        {"name": "db", "from": "db1", "to": "web1", "services": ["dns"]},
    ]
    ruleset = render_iptables(policy_for(flows))
    rules = [line.split(" -m comment")[0] for line in accepts(ruleset.ipv4)]
    assert "-A PORTGUARD-IN -p tcp -m tcp --dport 443" in rules  # any: no -s 0.0.0.0/0
    assert "-A PORTGUARD-IN -p udp -m iprange --src-range 10.0.2.1-10.0.2.2 -m udp --dport 53" in rules
    assert "-A PORTGUARD-IN -p tcp -m tcp --dport 443" in [line.split(" -m comment")[0] for line in accepts(ruleset.ipv6)]


def test_egress_chain():
    flows = [{"name": "to-db", "from": "web1", "to": "db1", "services": ["dns"]}]
    ruleset = render_iptables(policy_for(flows, portguard_egress=True))
    assert ruleset.jumps == (("INPUT", "PORTGUARD-IN"), ("OUTPUT", "PORTGUARD-OUT"))
    assert ":PORTGUARD-OUT - [0:0]" in ruleset.ipv4.splitlines()
    assert ('-A PORTGUARD-OUT -p udp -m iprange --dst-range 10.0.2.1-10.0.2.2 -m udp --dport 53 '
            '-m comment --comment "to-db/dns: DNS" -j ACCEPT') in ruleset.ipv4.splitlines()
    assert "-A PORTGUARD-OUT -m comment --comment denied_out -j REJECT --reject-with icmp6-adm-prohibited" in ruleset.ipv6


def test_ports_of_one_source_are_grouped_in_multiport_chunks():
    services = {"ssh": {"port": 22}, "many": {"port": [*range(1000, 1040, 2), "2000-2010", "3000-3010"]}}
    flows = [{"name": "many", "from": "office", "to": "web1", "services": ["many"]}]
    rules = [line for line in accepts(render_iptables(policy_for(flows, services)).ipv4) if "10.20.0.0/16" in line]
    slots = []
    for rule in rules:
        ports = re.search(r"--dports? (\S+)", rule).group(1).split(",")
        slots.append(sum(2 if ":" in port else 1 for port in ports))
        assert ("-m multiport --dports" in rule) == (len(ports) > 1)
    assert all(used <= MULTIPORT_SLOTS for used in slots)
    assert sum(slots) == 20 + 2 * 2
    assert len(rules) == 2


def test_comment_is_cut_at_256_bytes_never_mid_character():
    services = {"ssh": {"port": 22},
                **{f"s{index}": {"port": 100 + index, "purpose": "Überwachung €" * 3} for index in range(8)}}
    flows = [{"name": "flüsse", "from": "office", "to": "web1", "services": [f"s{index}" for index in range(8)]}]
    rules = accepts(render_iptables(policy_for(flows, services)).ipv4)
    comment = re.search(r'--comment "([^"]*)"', next(rule for rule in rules if "10.20.0.0/16" in rule)).group(1)
    full = "; ".join(f"flüsse/s{index}: {'Überwachung €' * 3}" for index in range(8))
    assert len(full.encode()) > COMMENT_BYTES
    assert full.startswith(comment)
    assert COMMENT_BYTES - 3 <= len(comment.encode()) <= COMMENT_BYTES


def test_no_ping():
    ruleset = render_iptables(policy_for(portguard_allow_ping=False))
    assert "--icmp-type 8 " not in ruleset.ipv4
    assert "--icmpv6-type 128 " not in ruleset.ipv6
    assert "--icmp-type 3 -j ACCEPT" in ruleset.ipv4


# The ipset variant -----------------------------------------------------------------------------


def set_lines(ruleset, verb="add"):
    return [line for line in ruleset.ipset.splitlines() if line.startswith(f"{verb} ")]


def test_ipset_variant_one_set_rule_per_chain_same_prelude_and_verdict():
    plain, sets = render_iptables(policy_for()), render_iptables(policy_for(), ipset=True)
    assert plain.ipset == "" and plain.sets == () and plain.as_dict()["ipset"] == ""
    assert sets.sets == (("portguard-in4", "inet"), ("portguard-in6", "inet6"))
    for family, set_name in ((4, "portguard-in4"), (6, "portguard-in6")):
        with_set = getattr(sets, f"ipv{family}").splitlines()
        rule = f"-A PORTGUARD-IN -m set --match-set {set_name} src,dst -j ACCEPT"
        assert accepts("\n".join(with_set)) == []
        # the per-source rules are replaced by the one set rule, everything around them stays
        without = [line for line in getattr(plain, f"ipv{family}").splitlines() if line not in accepts(getattr(
            plain, f"ipv{family}"))]
        index = with_set.index(rule)
        assert with_set[:index] + with_set[index + 1:] == without
        assert with_set.index("-A PORTGUARD-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT") < index
        assert with_set[index + 1].startswith("-A PORTGUARD-IN -m limit")
    assert set_lines(sets) == [
        'add portguard-in4-new 10.20.0.0/16,tcp:443 comment "office-web/https: Public web traffic"',
        'add portguard-in4-new 10.99.0.0/24,tcp:22 comment "management/ssh: Remote administration"',
        'add portguard-in6-new 2001:db8:99::/64,tcp:22 comment "management/ssh: Remote administration"',
    ]
    assert sets.as_dict()["sets"] == [["portguard-in4", "inet"], ["portguard-in6", "inet6"]]


def test_ipset_payload_fills_new_sets_and_swaps_them_in():
    ruleset = render_iptables(policy_for(portguard_egress=True), ipset=True)
    commands = [line.split()[:2] for line in ruleset.ipset.splitlines() if not line.startswith(("#", "add "))]
    names = ["portguard-in4", "portguard-in6", "portguard-out4", "portguard-out6"]
    expected = [c for name in names for c in (["create", f"{name}-new"], ["swap", f"{name}-new"], ["destroy", f"{name}-new"])]
    assert commands == expected
    creates = set_lines(ruleset, "create")
    assert creates[0] == (f"create portguard-in4-new hash:net,port family inet hashsize 64 maxelem {SET_MAXELEM} "
                          "counters comment")
    assert " family inet6 " in creates[1]
    assert "swap portguard-out6-new portguard-out6" in ruleset.ipset.splitlines()
    assert "-A PORTGUARD-OUT -m set --match-set portguard-out4 dst,dst -j ACCEPT" in ruleset.ipv4.splitlines()
    assert "-A PORTGUARD-OUT -m set --match-set portguard-out6 dst,dst -j ACCEPT" in ruleset.ipv6.splitlines()


def test_ipset_elements_as_ipset_save_prints_them():
    """Hosts without /32 or /128, "any" as two halves (hash:net refuses /0), ranges split into CIDRs."""
    services = {"ssh": {"port": 22}, "https": {"port": 443}, "dns": {"port": 53, "proto": ["tcp", "udp"]},
                "workers": {"port": "8000-8010"}}
    flows = [
        {"name": "pub", "from": "any", "to": "web1", "services": ["https"]},
        {"name": "db", "from": "db1", "to": "web1", "services": ["dns", "workers"]},
    ]
    elements = [line.split(" comment ")[0].split(" ", 2)[2] for line in set_lines(
        render_iptables(policy_for(flows, services), ipset=True))]
    assert {"0.0.0.0/1,tcp:443", "128.0.0.0/1,tcp:443", "::/1,tcp:443", "8000::/1,tcp:443"} <= set(elements)
    # 10.0.2.1-10.0.2.2 is not one CIDR: two host elements per port
    assert {"10.0.2.1,udp:53", "10.0.2.2,udp:53", "10.0.2.1,tcp:53", "10.0.2.1,tcp:8000-8010",
            "10.0.2.2,tcp:8000-8010"} <= set(elements)
    assert not any(e.split(",")[0].endswith(("/32", "/128", "/0")) for e in elements)
    assert len(elements) == len(set(elements))


def test_wide_port_ranges_stay_rules_next_to_the_set():
    services = {"ssh": {"port": 22}, "narrow": {"port": f"9000-{9000 + SET_PORT_SPAN - 1}"},
                "wide": {"port": f"20000-{20000 + SET_PORT_SPAN}"}}
    flows = [{"name": "n", "from": "office", "to": "web1", "services": ["narrow"]},
             {"name": "w", "from": "admins", "to": "web1", "services": ["wide"]}]
    ruleset = render_iptables(policy_for(flows, services), ipset=True)
    assert f'add portguard-in4-new 10.20.0.0/16,tcp:9000-{9000 + SET_PORT_SPAN - 1} comment "n/narrow"' \
        in ruleset.ipset.splitlines()
    assert "20000" not in ruleset.ipset
    lines = ruleset.ipv4.splitlines()
    rule = f'-A PORTGUARD-IN -s 10.99.0.0/24 -p tcp -m tcp --dport 20000:{20000 + SET_PORT_SPAN} -m comment --comment "w/wide" -j ACCEPT'
    assert rule in lines
    assert lines.index(rule) == lines.index("-A PORTGUARD-IN -m set --match-set portguard-in4 src,dst -j ACCEPT") + 1


def test_ipset_comment_is_cut_at_255_bytes_never_mid_character():
    services = {"ssh": {"port": 22}, **{f"s{index}": {"port": 100, "purpose": "Überwachung €" * 3} for index in range(8)}}
    flows = [{"name": "flüsse", "from": "office", "to": "web1", "services": [f"s{index}" for index in range(8)]}]
    line = next(line for line in set_lines(render_iptables(policy_for(flows, services), ipset=True)) if ",tcp:100 " in line)
    comment = re.search(r' comment "([^"]*)"$', line).group(1)
    full = "; ".join(f"flüsse/s{index}: {'Überwachung €' * 3}" for index in range(8))
    assert full.startswith(comment)
    assert len(full.encode()) > SET_COMMENT_BYTES
    assert SET_COMMENT_BYTES - 3 <= len(comment.encode()) <= SET_COMMENT_BYTES


def test_maxelem_grows_with_the_expanded_ranges():
    services = {"ssh": {"port": 22}, "r": {"port": f"1000-{1000 + SET_PORT_SPAN - 1}"}}
    networks = [f"10.{i // 128}.{i % 128 * 2}.0/24" for i in range(1100)]  # never adjacent: 1100 CIDRs
    catalog_flows = [{"name": "many", "from": networks, "to": "web1", "services": ["r"]}]
    ruleset = render_iptables(policy_for(catalog_flows, services), ipset=True)
    create = set_lines(ruleset, "create")[0]
    elements = 1100 * SET_PORT_SPAN + 1  # + the management entry
    maxelem = int(re.search(r"maxelem (\d+)", create).group(1))
    assert maxelem >= elements and maxelem & (maxelem - 1) == 0 and maxelem > SET_MAXELEM


def test_render_is_pure_and_stable():
    policy = policy_for(portguard_egress=True)
    assert render_iptables(policy, ipset=True) == render_iptables(policy, ipset=True)
    assert render_iptables(policy) == render_iptables(policy, ipset=False)
