"""The reachability matrix decides the verify role's verdict: the plan from the catalog, the join with reality.

The plan is built from the example inventory (examples/inventory) as the role builds it: every host of the
play, one prober per segment. Probe results are made from the plan itself, then bent one way or another.
"""

import html
import json
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.verify import matrix

HOSTS = ["app1", "db1", "desk1", "mon1", "web1", "web2"]


@pytest.fixture(scope="module")
def groups(example_inventory):
    return example_inventory[1]


@pytest.fixture(scope="module")
def plan(example_policy, groups):
    return matrix.build_plan(example_policy, groups, HOSTS)


def probe(plan, src, dst, port, proto="tcp", family="ipv4"):
    (found,) = [p for p in plan if (p["src"], p["dst"], p["port"], p["proto"], p["family"]) ==
                (src, dst, port, proto, family)]
    return found


def reality(plan, seen=None):
    """What the probes would see if every host behaved as the catalog says; ``seen`` overrides some states."""
    results = {}
    for item in plan:
        state = (seen or {}).get((item["src"], item["dst"], item["port"], item["proto"]), item["expected"])
        results.setdefault(item["src"], []).append({
            "address": item["address"], "port": item["port"], "proto": item["proto"], "source": item["src_address"],
            "state": state, "reason": "handshake" if state == "open" else "timeout"})
    return results


def counters_as_planned(plan):
    """Deny counters before (all zero) and after (each rose by the probes it must have denied)."""
    after = {}
    for item in plan:
        if item["counted_at"]:
            after[item["counted_at"]] = after.get(item["counted_at"], 0) + 1
    return dict.fromkeys(after, 0), after


# ---------------------------------------------------------------- the plan


def test_one_prober_per_segment_the_first_of_its_hosts():
    groups = {"all": ["a", "b", "c"], "ungrouped": [], "web": ["c", "b"], "db": ["a"], "empty": []}
    assert matrix.segments_of(groups) == {"db": ["a"], "web": ["b", "c"]}
    assert matrix.choose_probers(groups, ["a", "b", "c"]) == {"db": "a", "web": "b"}
    # a host outside the play never probes: the next one of its segment does, an absent segment has none
    assert matrix.choose_probers(groups, ["c"]) == {"web": "c"}


def test_every_prober_probes_every_other_host_in_its_own_family(plan):
    sources = {p["src"] for p in plan}
    assert sources == {"app1", "db1", "desk1", "mon1", "web1"}  # web2 shares web1's segment
    assert all(p["src"] != p["dst"] for p in plan)
    assert {(p["src"], p["dst"]) for p in plan} == {(s, d) for s in sources for d in HOSTS if s != d}
    for item in plan:
        assert (":" in item["src_address"]) == (":" in item["address"]) == (item["family"] == "ipv6")


def test_ports_are_the_catalog_the_common_ones_and_a_random_one(plan):
    ports = {(p["port"], p["proto"], p["service"]) for p in plan}
    # both ends of a range, a service on two protocols, the catalog's name wins over the common one
    assert {(8000, "tcp", "workers"), (8010, "tcp", "workers"), (53, "tcp", "dns"), (53, "udp", "dns"),
            (5432, "tcp", "postgres"), (6379, "tcp", "redis"), (47123, "tcp", "random-high")} <= ports
    assert (8005, "tcp", "workers") not in ports
    assert len(ports) == len({(port, proto) for port, proto, _service in ports})


@pytest.mark.parametrize(("src", "dst", "port", "proto", "expected", "counted_at"), [
    ("app1", "db1", 5432, "tcp", "open", None),              # app-to-db
    ("web1", "db1", 5432, "tcp", "filtered", "db1/in"),      # not from webservers
    ("mon1", "db1", 22, "tcp", "open", None),                # management
    ("app1", "db1", 22, "tcp", "filtered", "db1/in"),
    ("app1", "db1", 21, "tcp", "filtered", "db1/in"),        # office-legacy-ftp has expired
    ("desk1", "mon1", 3000, "tcp", "open", None),            # office-dashboards, from the office desk
    ("desk1", "db1", 5432, "tcp", "filtered", "desk1/out"),  # desk1 filters egress: its own counter counts
    ("desk1", "web1", 80, "tcp", "open", None),              # web-public from any, and desk1 may go out to it
    ("app1", "mon1", 514, "udp", "open", None),              # ship-logs
    ("app1", "web1", 514, "udp", "filtered", "web1/in"),
    ("mon1", "web2", 9100, "tcp", "open", None),             # scrape-metrics to all
    ("web1", "app1", 47123, "tcp", "filtered", "app1/in"),
])
def test_expectations_follow_the_catalog(plan, src, dst, port, proto, expected, counted_at):
    for family in ("ipv4", "ipv6"):
        item = probe(plan, src, dst, port, proto, family)
        assert (item["expected"], item["counted_at"], item["allowed"]) == (expected, counted_at, expected == "open")


def test_a_host_in_audit_mode_is_expected_open_but_not_allowed(example_inventory):
    from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

    variables, groups, hostvars = example_inventory
    catalog = {name: variables[name] for name in
               ("portguard_networks", "portguard_services", "portguard_flows", "portguard_management")}
    audit = dict(hostvars, db1=dict(hostvars["db1"], portguard_mode="audit"))
    plan = matrix.build_plan(compile_catalog(catalog, groups, audit), groups, HOSTS)
    item = probe(plan, "web1", "db1", 5432)
    assert (item["expected"], item["allowed"], item["counted_at"]) == ("open", False, "db1/in")


def test_listeners_self_checks_and_probes_are_the_plan_regrouped(plan):
    listeners = matrix.listener_ports(plan)
    assert {"port": 5432, "proto": "tcp"} in listeners["db1"] and {"port": 53, "proto": "udp"} in listeners["db1"]
    assert len(listeners["db1"]) == len({(p["port"], p["proto"]) for p in plan if p["dst"] == "db1"})
    checks = matrix.self_checks(plan)
    assert {"address": "fd89:7067::31", "port": 5432, "proto": "tcp"} in checks["db1"]
    assert {c["address"] for c in checks["db1"]} == {"172.30.89.31", "fd89:7067::31"}
    by_source = matrix.probes_by_source(plan)
    assert set(by_source) == {"app1", "db1", "desk1", "mon1", "web1"}
    assert {"address": "172.30.89.31", "port": 5432, "proto": "tcp", "source": "172.30.89.21"} in by_source["app1"]
    assert sum(len(v) for v in by_source.values()) == len(plan)


# ---------------------------------------------------------------- the verdict


def test_reality_as_planned_is_no_problem(plan):
    before, after = counters_as_planned(plan)
    cells, problems, counters = matrix.evaluate(plan, reality(plan), before, after)
    assert problems == []
    assert len(cells) == len(plan) and all(cell["ok"] for cell in cells)
    assert counters["db1/in"] == {"denied_probes": after["db1/in"], "counter_delta": after["db1/in"]}
    assert counters["desk1/out"]["denied_probes"] == after["desk1/out"] > 0
    assert json.loads(matrix.to_json(cells, problems, counters))["ok"] is True


def test_an_open_port_the_catalog_blocks_is_a_problem(plan):
    before, after = counters_as_planned(plan)
    after["db1/in"] -= 2  # the two leaked probes (both families) were not denied
    cells, problems, _counters = matrix.evaluate(plan, reality(plan, {("web1", "db1", 5432, "tcp"): "open"}),
                                                 before, after)
    assert problems == [
        "web1 (172.30.89.11) -> db1 172.30.89.31 5432/tcp [postgres]: expected filtered, seen open (handshake)",
        "web1 (fd89:7067::11) -> db1 fd89:7067::31 5432/tcp [postgres]: expected filtered, seen open (handshake)",
        f"db1/in: {after['db1/in'] + 2} probes were denied but the deny counter rose by {after['db1/in']} only",
    ]
    assert [c["ok"] for c in cells].count(False) == 2


def test_a_blocked_port_the_catalog_opens_and_a_missing_result_are_problems(plan):
    results = reality(plan, {("app1", "db1", 5432, "tcp"): "filtered"})
    results["mon1"] = [r for r in results["mon1"] if not (r["port"] == 22 and r["address"] == "172.30.89.31")]
    before, after = counters_as_planned(plan)
    _cells, problems, _counters = matrix.evaluate(plan, results, before, after)
    assert problems == [
        "app1 (172.30.89.21) -> db1 172.30.89.31 5432/tcp [postgres]: expected open, seen filtered (timeout)",
        "app1 (fd89:7067::21) -> db1 fd89:7067::31 5432/tcp [postgres]: expected open, seen filtered (timeout)",
        "mon1 (172.30.89.41) -> db1 172.30.89.31 22/tcp [ssh]: expected open, seen missing",
    ]


def test_a_result_from_another_source_address_answers_nothing(plan):
    results = reality(plan)
    for result in results["app1"]:
        result["source"] = "172.30.89.99"
    before, after = counters_as_planned(plan)
    cells, problems, _counters = matrix.evaluate(plan, results, before, after)
    assert {c["seen"] for c in cells if c["src"] == "app1"} == {"missing"}
    assert len(problems) == sum(1 for p in plan if p["src"] == "app1")


def test_an_unreadable_deny_counter_is_a_problem(plan):
    before, after = counters_as_planned(plan)
    del after["web2/in"]
    _cells, problems, counters = matrix.evaluate(plan, reality(plan), before, after)
    assert problems == ["web2/in: the deny counter could not be read"]
    assert counters["web2/in"]["counter_delta"] is None


# ---------------------------------------------------------------- the reports


def test_the_table_marks_each_family(plan):
    before, after = counters_as_planned(plan)
    cells, _problems, _counters = matrix.evaluate(
        plan, reality(plan, {("web1", "db1", 5432, "tcp"): "open", ("app1", "db1", 5432, "tcp"): "filtered"}),
        before, after)
    table = matrix.render_table(cells)
    db1 = table.split("\ndb1:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = db1[0].split()
    rows = {line.split()[0]: dict(zip(header[1:], line.split()[2:])) for line in db1[1:]}
    assert rows["postgres"] == {"appservers(app1)": "!!", "monitoring(mon1)": "..", "office_desks(desk1)": "..",
                                "webservers(web1)": "XX"}
    assert rows["ssh"] == {"appservers(app1)": "..", "monitoring(mon1)": "++", "office_desks(desk1)": "..",
                           "webservers(web1)": ".."}
    overview = table.split("\n\n", 1)[0]
    assert "appservers(app1)" in overview and "!:postgres" in overview and "X:postgres" in overview


def test_junit_and_html_count_and_escape(plan):
    hostile = [dict(p, dst="db1<script>\x1b[2J") if p["dst"] == "db1" else p for p in plan]
    before, after = counters_as_planned(hostile)
    cells, problems, counters = matrix.evaluate(
        hostile, reality(hostile, {("web1", "db1<script>\x1b[2J", 5432, "tcp"): "open"}), before, after)
    suites = ET.fromstring(matrix.to_junit(cells, problems, counters))  # noqa: S314 - our own output
    suite = suites.find("testsuite[@name='reachability.db1<script>\\x1b[2J']")
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failed == ["web1 172.30.89.11 -> 172.30.89.31 5432/tcp postgres expected filtered",
                      "web1 fd89:7067::11 -> fd89:7067::31 5432/tcp postgres expected filtered"]
    assert suite.get("failures") == "2"
    page = matrix.to_html(cells, problems, counters)
    assert "<script>" not in page and "\x1b" not in page
    assert html.escape("db1<script>\\x1b[2J") in page
    assert f"{len(problems)} problem(s):" in page


def test_junit_and_html_carry_each_destinations_deny_counter(plan):
    before, after = counters_as_planned(plan)
    after["db1/in"] -= 1  # one denied probe was not counted
    cells, problems, counters = matrix.evaluate(plan, reality(plan), before, after)
    suites = ET.fromstring(matrix.to_junit(cells, problems, counters))  # noqa: S314 - our own output
    cases = {case.get("name"): case for case in suites.find("testsuite[@name='reachability.db1']").iter("testcase")}
    assert cases["deny counter rose"].find("failure") is not None
    web1 = {case.get("name"): case for case in suites.find("testsuite[@name='reachability.web1']").iter("testcase")}
    assert web1["deny counter rose"].find("failure") is None
    page = matrix.to_html(cells, problems, counters)
    denied = counters["db1/in"]["denied_probes"]
    assert f"db1 — deny counter +{denied - 1} for {denied} denied probes" in page
