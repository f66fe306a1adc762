"""nftables renderer: golden files of examples/inventory and the renderer's contract."""

import datetime
import re

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import (
    chain_rules,
    render_nftables,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

TODAY = datetime.date(2026, 11, 26)


def test_golden_nftables(example_policy, example_hosts, golden):
    for host in example_hosts:
        golden(f"{host}.nft", render_nftables(example_policy.host(host)))


def test_golden_files_match_the_inventory(example_hosts, golden_hosts):
    assert golden_hosts == set(example_hosts)


def policy_for(flows=None, https_purpose="Public web traffic", **host_settings):
    catalog = {
        "portguard_networks": {"office": ["10.20.0.0/16"], "admins": ["10.99.0.0/24", "2001:db8:99::/64"]},
        "portguard_services": {
            "ssh": {"port": 22, "purpose": "Remote administration", "owner": "platform"},
            "https": {"port": 443, "purpose": https_purpose, "owner": "web"},
            "dns": {"port": 53, "proto": ["tcp", "udp"], "purpose": "DNS", "owner": "platform"},
        },
        "portguard_flows": flows or [{"name": "office-web", "from": "office", "to": "web1", "services": ["https"]}],
        "portguard_management": {"from": "admins", "services": ["ssh"]},
    }
    hostvars = {
        "web1": {"portguard_addresses": ["10.0.1.1", "2001:db8:1::1"], **host_settings},
        "db1": {"portguard_addresses": ["10.0.2.1"]},
    }
    groups = {"all": ["web1", "db1"]}
    return compile_catalog(catalog, groups, hostvars, today=TODAY).host("web1")


def test_replaces_only_its_own_table_atomically():
    text = render_nftables(policy_for())
    lines = text.splitlines()
    assert lines[1:4] == ["table inet portguard", "delete table inet portguard", "table inet portguard {"]
    assert text.endswith("}\n")
    assert "flush" not in text
    assert re.findall(r"^\s*(?:delete )?table (\S+ \S+)", text, re.MULTILINE) == ["inet portguard"] * 3


def test_every_port_match_is_bound_to_an_address():
    """An empty family set matches nothing; there is never a port-only accept."""
    text = render_nftables(policy_for())
    for line in text.splitlines():
        if "dport" in line:
            assert re.search(r"ip6? [sd]addr \. (tcp|udp) dport @\w+ accept$", line.strip()), line


def test_family_without_sources_gets_an_empty_set():
    text = render_nftables(policy_for())
    in6_tcp = text.split("set in6_tcp {")[1].split("}")[0]
    in4_tcp = text.split("set in4_tcp {")[1].split("}")[0]
    assert "10.20.0.0/16 . 443" in in4_tcp
    assert "443" not in in6_tcp  # office has no IPv6 network
    assert "2001:db8:99::/64 . 22" in in6_tcp
    assert "elements" not in text.split("set in6_udp {")[1].split("}")[0]


@pytest.mark.parametrize(("settings", "verdict"), [
    ({}, 'counter name "denied_in" reject with icmpx admin-prohibited'),
    ({"portguard_deny": "drop"}, 'counter name "denied_in" drop'),
    ({"portguard_mode": "audit"}, 'counter name "denied_in" accept'),
    ({"portguard_mode": "audit", "portguard_deny": "drop"}, 'counter name "denied_in" accept'),
])
def test_default_verdict(settings, verdict):
    policy = policy_for(**settings)
    rules = chain_rules(policy, "in")
    assert rules[-1] == verdict
    assert rules[-2].startswith("limit rate 10/minute counter log prefix")
    assert f"\t\t{verdict}\n\t}}\n}}\n" in render_nftables(policy)


def test_egress_adds_an_output_chain_only_when_enabled():
    flows = [{"name": "web-dns", "from": "web1", "to": "db1", "services": ["dns"]}]
    assert "chain output" not in render_nftables(policy_for(flows))
    text = render_nftables(policy_for(flows, portguard_egress=True))
    assert "chain output {" in text and "counter denied_out {" in text
    out4_udp = text.split("set out4_udp {")[1].split("}")[0]
    assert '10.0.2.1 . 53 counter comment "web-dns/dns: DNS"' in out4_udp
    assert "elements" not in text.split("set out6_udp {")[1].split("}")[0]  # db1 has no IPv6 address
    assert "ip daddr . udp dport @out4_udp accept" in text


def test_ping_and_log_settings():
    text = render_nftables(policy_for(portguard_allow_ping=False, portguard_log_rate=3, portguard_log_burst=9,
                                      portguard_log_prefix="pg: "))
    assert "echo-request" not in text
    assert 'limit rate 3/minute burst 9 packets counter log prefix "pg: " level info' in text


def test_comments_of_several_labels_are_cut_at_128_bytes_never_mid_character():
    purpose = "Überwachung der Schnittstellen €"  # multi-byte characters throughout
    flows = [{"name": f"flüsse-{index}-{'é' * 20}", "from": "office", "to": "web1", "services": ["https"]}
             for index in range(4)]
    text = render_nftables(policy_for(flows, https_purpose=purpose))
    comments = re.findall(r'comment "([^"]*)"', text)
    long = [c for c in comments if c.startswith("flüsse-0")]
    assert len(long) == 1
    full = "; ".join(f"flüsse-{index}-{'é' * 20}/https: {purpose}" for index in range(4))
    assert len(full.encode()) > 128
    assert full.startswith(long[0])
    assert 128 - 3 <= len(long[0].encode()) <= 128
    for comment in comments:
        assert len(comment.encode()) <= 128
