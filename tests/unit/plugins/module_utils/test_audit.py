"""Pure tests of the port audit: classification, not-listening services, renderers."""

import datetime
import json
import random
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.audit import (
    AuditError,
    audit_listeners,
    audit_to_json,
    audit_to_junit,
    parse_fail_on,
    violation_table,
    violations,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

CATALOG = {
    "portguard_networks": {
        "office": ["10.20.0.0/16", "2001:db8:20::/48"],
        "admin_vpn": ["10.99.0.0/24"],
    },
    "portguard_services": {
        "ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration", "owner": "platform"},
        "https": {"port": 443, "proto": "tcp", "purpose": "Public web traffic", "owner": "web"},
        "app": {"port": 8443, "proto": "tcp", "purpose": "Internal app", "owner": "web"},
        "dns": {"port": 53, "proto": ["tcp", "udp"], "purpose": "Internal DNS", "owner": "platform"},
        "workers": {"port": "8000-8010", "proto": "tcp", "purpose": "App workers", "owner": "web"},
        "metrics": {"port": "9100-9101", "proto": "tcp", "purpose": "Exporters", "owner": "ops"},
        "redis": {"port": 6379, "proto": "tcp", "purpose": "Cache", "owner": "web"},
    },
    "portguard_flows": [
        {"name": "public-web", "from": "any", "to": "web", "services": ["https"]},
        {"name": "office-app", "from": "office", "to": "web", "services": ["app", "workers", "metrics", "dns"]},
        {"name": "office-cache", "from": "office", "to": "db", "services": ["redis"]},
    ],
    "portguard_management": {"from": ["admin_vpn"], "services": ["ssh"]},
}
GROUPS = {"all": ["web1", "db1"], "web": ["web1"], "db": ["db1"]}
HOSTVARS = {
    "web1": {"portguard_addresses": ["192.0.2.10", "2001:db8::10"]},
    "db1": {"portguard_addresses": ["192.0.2.20"]},
}


@pytest.fixture(scope="module")
def web1():
    policy = compile_catalog(CATALOG, GROUPS, HOSTVARS, today=datetime.date(2026, 1, 1))
    return policy.host("web1")


def sock(proto, address, port, *, family=None, v6only=None, interface=None, pid=100, name="srv", user="app",
         scope=None):
    record = {
        "protocol": proto,
        "family": family or ("ipv6" if ":" in address else "ipv4"),
        "address": address,
        "port": port,
        "v6only": v6only,
        "v4_mapped": address.startswith("::ffff:"),
        "interface": interface,
        "pid": pid,
        "pids": [] if pid is None else [pid],
        "name": name,
        "cmdline": f"{name} --port {port}",
        "user": user,
        "uid": 1000,
    }
    if scope:
        record["scope"] = scope
    return record


def status_of(result, port, address, proto="tcp"):
    found = [i for name in ("approved", "unapproved", "loopback") for i in result[name]
             if i["port"] == port and i["address"] == address and i["proto"] == proto]
    assert len(found) == 1, found
    return found[0]


def test_planted_unapproved_loopback_and_approved(web1):
    result = audit_listeners(web1, [
        sock("tcp", "0.0.0.0", 6379, name="socat", user="nobody", pid=42),
        sock("tcp", "127.0.0.1", 5000, name="python3"),
        sock("tcp", "192.0.2.10", 8443, name="app"),
    ])
    unapproved = status_of(result, 6379, "0.0.0.0")
    assert unapproved["status"] == "unapproved"
    assert (unapproved["process"], unapproved["pid"], unapproved["user"]) == ("socat", 42, "nobody")
    assert "tcp/6379" in unapproved["reason"]
    assert status_of(result, 5000, "127.0.0.1")["status"] == "loopback"
    approved = status_of(result, 8443, "192.0.2.10")
    assert approved["status"] == "approved"
    assert approved["overexposed"] is False
    assert approved["labels"] == [{"flow": "office-app", "service": "app", "purpose": "Internal app", "owner": "web"}]
    assert approved["allowed_from"] == {"ipv4": ["10.20.0.0/16"]}
    assert result["summary"] == {"approved": 1, "unapproved": 1, "overexposed": 0, "loopback": 1,
                                 "not_listening": 6}
    # redis is cataloged, but for db1 only: on web1 it is not approved.
    assert result["host"] == "web1"


@pytest.mark.parametrize("record", [
    sock("tcp", "127.0.0.1", 6379),
    sock("tcp", "::1", 6379, v6only=True),
    sock("tcp", "::ffff:127.0.0.1", 6379, v6only=False),
    sock("udp", "0.0.0.0", 6379, interface="lo"),
    sock("tcp", "127.0.0.53", 6379),
])
def test_loopback_is_never_a_violation(web1, record):
    result = audit_listeners(web1, [record])
    assert [i["status"] for i in result["loopback"]] == ["loopback"]
    assert result["unapproved"] == [] and result["approved"] == []
    assert violations(result, ["unapproved", "overexposed"]) == []


def test_wildcard_with_partial_sources_is_overexposed(web1):
    result = audit_listeners(web1, [sock("tcp", "0.0.0.0", 8443), sock("udp", "0.0.0.0", 53)])
    assert [(i["proto"], i["port"]) for i in result["overexposed"]] == [("udp", 53), ("tcp", 8443)]
    assert all(i["status"] == "approved" for i in result["overexposed"])
    assert "10.20.0.0/16" in result["overexposed"][1]["reason"]


def test_wildcard_open_to_any_is_not_overexposed(web1):
    result = audit_listeners(web1, [sock("tcp", "::", 443, v6only=False), sock("tcp", "0.0.0.0", 443)])
    assert len(result["approved"]) == 2
    assert result["overexposed"] == []
    assert status_of(result, 443, "::")["allowed_from"] == {"ipv4": ["0.0.0.0/0"], "ipv6": ["::/0"]}


def test_specific_address_not_of_the_host_counts_as_reachable(web1):
    result = audit_listeners(web1, [sock("tcp", "172.17.0.1", 8443), sock("tcp", "172.17.0.1", 6380)])
    assert status_of(result, 8443, "172.17.0.1")["status"] == "approved"
    assert status_of(result, 6380, "172.17.0.1")["status"] == "unapproved"
    assert result["overexposed"] == []


def test_dual_stack_socket_takes_both_families(web1):
    # The management floor lets ssh in from an IPv4 network only.
    dual = audit_listeners(web1, [sock("tcp", "::", 22, v6only=False)])
    item = status_of(dual, 22, "::")
    assert item["status"] == "approved"
    assert item["labels"][0]["flow"] == "management"
    assert item["overexposed"] is True  # and nothing at all is let in over IPv6
    assert item["allowed_from"] == {"ipv4": ["10.99.0.0/24"], "ipv6": []}
    # Unknown v6only (read from /proc/net): Linux defaults to dual-stack.
    assert status_of(audit_listeners(web1, [sock("tcp", "::", 22)]), 22, "::")["status"] == "approved"
    v6only = audit_listeners(web1, [sock("tcp", "::", 22, v6only=True)])
    assert status_of(v6only, 22, "::")["status"] == "unapproved"


def test_v4_mapped_address_is_ipv4(web1):
    result = audit_listeners(web1, [sock("tcp", "::ffff:192.0.2.10", 8443, v6only=False)])
    item = status_of(result, 8443, "::ffff:192.0.2.10")
    assert item["status"] == "approved"
    assert item["scope"] == "specific"
    assert item["allowed_from"] == {"ipv4": ["10.20.0.0/16"]}


def test_protocol_must_match(web1):
    result = audit_listeners(web1, [sock("udp", "0.0.0.0", 443), sock("udp", "0.0.0.0", 8005)])
    assert [i["port"] for i in result["unapproved"]] == [443, 8005]


def test_not_listening_collapses_ranges_and_ignores_partial(web1):
    result = audit_listeners(web1, [sock("tcp", "0.0.0.0", 9101), sock("tcp", "127.0.0.1", 53)])
    rows = {(i["service"], i["proto"]): i for i in result["not_listening"]}
    assert set(rows) == {("ssh", "tcp"), ("https", "tcp"), ("app", "tcp"), ("workers", "tcp"),
                         ("dns", "tcp"), ("dns", "udp")}
    assert rows["workers", "tcp"]["ports"] == "8000-8010"
    assert rows["workers", "tcp"]["flows"] == ["office-app"]
    assert rows["workers", "tcp"]["owner"] == "web"
    assert rows["dns", "tcp"]["loopback_only"] is True
    assert rows["dns", "udp"]["loopback_only"] is False
    assert [i["service"] for i in result["not_listening"]] == ["ssh", "dns", "dns", "https", "workers", "app"]
    one_worker = audit_listeners(web1, [sock("tcp", "192.0.2.10", 8007)])
    assert "workers" not in {i["service"] for i in one_worker["not_listening"]}


def test_reuseport_sockets_are_one_listener(web1):
    result = audit_listeners(web1, [
        sock("tcp", "0.0.0.0", 6379, pid=20, name="worker"),
        sock("tcp", "0.0.0.0", 6379, pid=10, name="master"),
        sock("tcp", "0.0.0.0", 6379, pid=None, name=None, user="0"),
    ])
    (item,) = result["unapproved"]
    assert (item["pid"], item["process"], item["sockets"], item["pids"]) == (10, "master", 3, [10, 20])


def test_listener_without_process(web1):
    result = audit_listeners(web1, [sock("tcp", "0.0.0.0", 6379, pid=None, name=None, user="999")])
    found = violations(result, ["unapproved"])
    assert "999" in violation_table("web1", found)


def test_fail_on_and_table(web1):
    result = audit_listeners(web1, [
        sock("tcp", "0.0.0.0", 6379, name="socat", user="nobody", pid=42),
        sock("tcp", "0.0.0.0", 8443, name="app", pid=7),
        sock("tcp", "127.0.0.1", 5000),
    ])
    assert violations(result, []) == []
    assert [v["port"] for v in violations(result, ["unapproved"])] == [6379]
    found = violations(result, ["overexposed", "unapproved", "not_listening"])
    assert [v["why"] for v in found] == ["unapproved", "overexposed"] + ["not listening"] * 6
    table = violation_table("web1", found).splitlines()
    assert table[0].split() == ["HOST", "PORT/PROTO", "ADDRESS", "PROCESS", "(PID)", "USER", "WHY"]
    assert table[1].split()[:6] == ["web1", "6379/tcp", "0.0.0.0", "socat", "(42)", "nobody"]
    assert "unapproved:" in table[1]
    assert any("8000-8010/tcp" in line and "workers" in line for line in table)


def test_fail_on_values():
    assert parse_fail_on(None) == ()
    assert parse_fail_on("unapproved") == ("unapproved",)
    assert parse_fail_on(["not_listening", "unapproved"]) == ("unapproved", "not_listening")
    with pytest.raises(AuditError, match="unknown value 'loopback'"):
        parse_fail_on(["loopback"])


@pytest.mark.parametrize(("record", "message"), [
    ({"protocol": "tcp", "port": 1}, r"listeners\[0\]\.address: missing"),
    ({"protocol": "sctp", "address": "0.0.0.0", "port": 1}, "expected tcp or udp"),
    ({"protocol": "tcp", "address": "0.0.0.0", "port": "x"}, "port: not a number"),
    ({"protocol": "tcp", "address": "nowhere", "port": 1}, r"listeners\[0\]\.address"),
    ("0.0.0.0:22", "expected a mapping"),
])
def test_malformed_listener(web1, record, message):
    with pytest.raises(AuditError, match=message):
        audit_listeners(web1, [record])


def test_minimal_records_get_a_scope(web1):
    result = audit_listeners(web1, [
        {"protocol": "tcp", "address": "0.0.0.0", "port": 8443},
        {"protocol": "tcp", "address": "::1", "port": 8443},
    ])
    assert status_of(result, 8443, "0.0.0.0")["scope"] == "wildcard"
    assert status_of(result, 8443, "::1")["status"] == "loopback"


def mixed(web1):
    return [
        sock("tcp", "0.0.0.0", 6379, name="socat", user="nobody", pid=42),
        sock("tcp", "::", 6379, v6only=True, name="socat", user="nobody", pid=43),
        sock("tcp", "127.0.0.1", 5000),
        sock("tcp", "::", 8443, v6only=False),
        sock("udp", "192.0.2.10", 53),
        sock("tcp", "0.0.0.0", 22, name="sshd", user="root"),
        sock("tcp", "0.0.0.0", 22, name="sshd", user="root", interface="eth0"),
    ]


def test_junit_is_well_formed(web1):
    db1 = compile_catalog(CATALOG, GROUPS, HOSTVARS, today=datetime.date(2026, 1, 1)).host("db1")
    results = {
        "web1": audit_listeners(web1, mixed(web1)),
        "db1": audit_listeners(db1, [sock("tcp", "0.0.0.0", 6379, name="redis-server", user="redis")]),
    }
    root = ET.fromstring(audit_to_junit(results))  # noqa: S314 - our own output
    assert root.tag == "testsuites"
    assert [s.get("name") for s in root.findall("testsuite")] == ["db1", "web1"]
    web = root.find("testsuite[@name='web1']")
    cases = web.findall("testcase")
    assert int(web.get("tests")) == len(cases) == 7 + len(results["web1"]["not_listening"])
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert sorted(failed) == ["tcp/6379 0.0.0.0:6379", "tcp/6379 [::]:6379"]
    assert failed["tcp/6379 0.0.0.0:6379"].get("type") == "unapproved"
    assert "socat (42)" in failed["tcp/6379 0.0.0.0:6379"].get("message")
    assert "nobody" in failed["tcp/6379 0.0.0.0:6379"].get("message")
    assert web.get("failures") == "2"
    assert root.get("failures") == "2"  # redis is cataloged for db1
    assert len({c.get("name") for c in cases}) == len(cases)
    strict = ET.fromstring(audit_to_junit(results, ["overexposed", "not_listening"]))  # noqa: S314
    web = strict.find("testsuite[@name='web1']")
    kinds = sorted(f.get("type") for f in web.iter("failure"))
    assert kinds.count("unapproved") == 2
    assert kinds.count("overexposed") == 3  # 8443 on ::, ssh on 0.0.0.0 twice (admin_vpn only)
    assert kinds.count("not_listening") == len(results["web1"]["not_listening"])


def test_output_is_deterministic(web1):
    records = mixed(web1)
    first = audit_listeners(web1, records)
    json_text, xml_text = audit_to_json(first), audit_to_junit({"web1": first}, ["overexposed"])
    for seed in range(5):
        shuffled = list(records)
        random.Random(seed).shuffle(shuffled)
        again = audit_listeners(web1, shuffled)
        assert audit_to_json(again) == json_text
        assert audit_to_junit({"web1": again}, ["overexposed"]) == xml_text
    assert json.loads(json_text)["summary"]["unapproved"] == 2
