"""The activity report: counters and log groups joined to a compiled catalog, deltas, resets, recertification."""

import datetime
import json

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.report import activity_report as rep
from ansible_collections.portguard.hardening.plugins.module_utils.core.report import render

TODAY = datetime.date(2026, 11, 26)
VARIABLES = {
    "portguard_networks": {"office": ["10.20.0.0/16"]},
    "portguard_services": {
        "ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration", "owner": "platform"},
        "postgres": {"port": 5432, "proto": "tcp", "purpose": "Orders database", "owner": "data"},
        "redis": {"port": 6380, "proto": "tcp", "purpose": "Cache", "owner": "data"},
        "https": {"port": 443, "proto": "tcp", "purpose": "Web", "owner": "web"},
    },
    "portguard_flows": [
        {"name": "app-db", "from": "app", "to": "db", "services": ["postgres"]},
        {"name": "app-cache", "from": "app", "to": "db", "services": ["redis"]},
        {"name": "office-web", "from": "office", "to": "web", "services": ["https"], "expires": "2026-12-01"},
        {"name": "legacy", "from": "office", "to": "db", "services": ["https"], "expires": "2026-01-31"},
    ],
    "portguard_management": {"from": ["office"], "services": ["ssh"]},
}
GROUPS = {"all": ["app1", "db1", "web1"], "app": ["app1"], "db": ["db1"], "web": ["web1"], "ungrouped": []}
HOSTVARS = {"app1": {"portguard_addresses": ["10.0.0.11"]}, "db1": {"portguard_addresses": ["10.0.0.12"]},
            "web1": {"portguard_addresses": ["10.0.0.13"]}}


@pytest.fixture(scope="module")
def policy():
    return compile_catalog(VARIABLES, GROUPS, HOSTVARS, today=TODAY)


def element(addresses, port, packets, comment=""):
    return {"set": "in4_tcp", "addresses": addresses, "ports": port, "comment": comment, "packets": packets,
            "bytes": packets * 60}


def activity(packets_pg, packets_cache, denied, groups, *, now=1000.0, replaced=900.0, readable=True, logged=None):
    return {
        "counters": {"backend": "nftables", "denied_in": denied, "denied_out": None, "logged_in": logged,
                     "logged_out": None,
                     "elements": [element("10.0.0.11", "5432", packets_pg), element("10.0.0.11", "6380", packets_cache),
                                  element("10.20.0.0/16", "22", 0)]},
        "now": now, "boot_id": "b", "replaced": {"at": replaced, "event": "applied"} if replaced else None,
        "log": {"source": "kmsg", "readable": True, "cursor": {"source": "kmsg", "seq": int(now)}, "lines": 0,
                "groups": groups, "lost": False} if readable else
        {"source": "none", "readable": False, "reason": "no /dev/kmsg", "groups": [], "cursor": None},
    }


def group(src, port, count, first, last, proto="tcp"):
    return {"direction": "in", "src": src, "dst": "10.0.0.12", "proto": proto, "port": port, "count": count,
            "first": first, "last": last}


def test_names_of_sources(policy):
    namer = rep.SourceNamer(policy)
    assert namer.names("10.0.0.11") == {"hosts": ["app1"], "segments": ["app"], "networks": []}
    assert namer.names("10.20.3.4") == {"hosts": [], "segments": [], "networks": ["office"]}
    assert rep.name_text(namer.names("192.0.2.1")) == "unknown"


def test_first_report_then_new_since_last(policy):
    namer = rep.SourceNamer(policy)
    db1 = policy.host("db1")
    first, state = rep.host_report("db1", db1, activity(3, 0, 5, [group("10.0.0.11", 6379, 3, 950.0, 960.0),
                                                                  group("10.0.0.13", 23, 2, 955.0, 956.0)]),
                                   None, namer, threshold=3)
    assert first["first_report"] and first["reset"] is None
    assert first["counters_since"] == rep.iso(900.0)
    flows = {f["label"]: f for f in first["flows"]}
    assert flows["app-db/postgres"]["hits"] == 3 and flows["app-db/postgres"]["owner"] == "data"
    assert [u["label"] for u in first["unused"]] == ["app-cache/redis"]  # management is never a candidate
    denied = {(d["src"], d["port"]): d for d in first["denied"]}
    assert denied[("10.0.0.11", 6379)]["count"] == 3 and denied[("10.0.0.11", 6379)]["names"]["hosts"] == ["app1"]
    assert denied[("10.0.0.11", 6379)]["first_seen"] == rep.iso(950.0)
    assert [u["src"] for u in first["unusual"]] == ["10.0.0.11"]
    assert first["deny_counters"]["denied_in"] == {"total": 5, "new": 5}
    json.dumps(state)  # the state is plain JSON

    second, state = rep.host_report("db1", db1, activity(4, 0, 7, [group("10.0.0.11", 6379, 1, 1500.0, 1500.0)],
                                                         now=2000.0), state, namer, threshold=3)
    assert not second["first_report"] and second["reset"] is None
    assert second["deny_counters"]["denied_in"] == {"total": 7, "new": 2}
    flows = {f["label"]: f for f in second["flows"]}
    assert (flows["app-db/postgres"]["hits"], flows["app-db/postgres"]["new"]) == (4, 1)
    denied = {(d["src"], d["port"]): d for d in second["denied"]}
    assert (denied[("10.0.0.11", 6379)]["count"], denied[("10.0.0.11", 6379)]["new"]) == (4, 1)
    assert denied[("10.0.0.11", 6379)]["last_seen"] == rep.iso(1500.0)
    assert [(d["src"], d["new"]) for d in second["denied_new"]] == [("10.0.0.11", 1)]


def test_reset_by_an_apply_is_reported_and_hits_accumulate(policy):
    namer = rep.SourceNamer(policy)
    db1 = policy.host("db1")
    state = rep.host_report("db1", db1, activity(3, 0, 5, []), None, namer, threshold=20)[1]
    after = rep.host_report("db1", db1, activity(1, 0, 2, [], now=3000.0, replaced=2500.0), state, namer,
                            threshold=20)[0]
    assert after["reset"]["when"] == rep.iso(2500.0) and after["reset"]["event"] == "applied"
    assert after["deny_counters"]["denied_in"] == {"total": 2, "new": 2}
    flows = {f["label"]: f for f in after["flows"]}
    assert flows["app-db/postgres"]["hits"] == 4  # 3 before the reset + 1 after
    # a counter that went down without a recorded apply (a reboot, a manual nft -f) is a reset too
    unknown = rep.host_report("db1", db1, activity(1, 0, 2, [], now=3000.0, replaced=900.0), state, namer,
                              threshold=20)[0]
    assert unknown["reset"]["event"] == "unknown"


def test_counters_only_and_missing_log_lines(policy):
    namer = rep.SourceNamer(policy)
    db1 = policy.host("db1")
    only = rep.host_report("db1", db1, activity(0, 0, 4, [], readable=False), None, namer, threshold=20)[0]
    assert only["log_note"].startswith("counters only: no /dev/kmsg") and only["denied"] == []
    silent = rep.host_report("db1", db1, activity(0, 0, 4, [], logged=4), None, namer, threshold=20)[0]
    assert "nf_log_all_netns" in silent["log_note"]


def test_summary_recertification_and_renderings(policy):
    namer = rep.SourceNamer(policy)
    reports = [rep.host_report(h, policy.host(h), activity(2, 0, 1, [group("10.20.0.9", 3306, 1, 950.0, 950.0)]),
                               None, namer, threshold=20)[0] for h in ("db1", "web1")]
    expiring = rep.expiring_flows(policy, TODAY, 14)
    assert [(f["name"], f["days_left"], f["owners"]) for f in expiring] == [("office-web", 5, ["web"])]
    assert rep.expiring_flows(policy, TODAY, 4) == []
    summary = rep.summarize(reports, policy.expired, expiring)
    assert summary["unused_by_owner"]["data"] == [
        {"flow": "app-cache", "service": "redis", "purpose": "Cache", "hosts": ["db1"]}]
    assert [f["name"] for f in summary["expired"]] == ["legacy"]
    text = render.render_text(summary)
    assert "EXPIRED flow legacy" in text and "expiring flow office-web on 2026-12-01 (5 day(s) left)" in text
    assert "data: app-cache/redis on db1" in text and "network office" in text
    page = render.render_html(summary)
    assert "app-cache/redis" in page and page.count(render.MARK_START) == 1
    verify = "<html><body><h1>matrix</h1></body></html>"
    once = render.extend_page(verify, summary)
    assert once.index(render.MARK_START) < once.index("</body>") and "<h1>matrix</h1>" in once
    twice = render.extend_page(once, summary)
    assert twice == once  # a second report replaces its section


def test_iptables_rules_are_attributed_by_their_comment(policy):
    counters = {"backend": "iptables", "denied_in": 2, "denied_out": None, "logged_in": 2, "logged_out": None,
                "elements": [{"set": "PORTGUARD-IN/ipv4", "addresses": "-A PORTGUARD-IN -s 10.0.0.11/32",
                              "ports": "-A PORTGUARD-IN -s 10.0.0.11/32 -p tcp -m multiport --dports 5432,6380",
                              "comment": "app-cache/redis: Cache; app-db/postgres: Orders database", "packets": 5,
                              "bytes": 300}]}
    data = {"counters": counters, "now": 10.0, "boot_id": "b", "replaced": None,
            "log": {"source": "none", "readable": False, "reason": "x", "groups": [], "cursor": None}}
    report = rep.host_report("db1", policy.host("db1"), data, None, rep.SourceNamer(policy), threshold=20)[0]
    flows = {f["label"]: f["hits"] for f in report["flows"]}
    # one rule stands for both entries: both are used (hits cannot be split between them)
    assert flows == {"app-cache/redis": 5, "app-db/postgres": 5}
    assert report["allowed"][0]["family"] == "ipv4" and report["allowed"][0]["direction"] == "in"
