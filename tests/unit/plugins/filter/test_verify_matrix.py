"""The verify role's two filters over the example inventory: ``probe_plan`` then ``verify_matrix``.

``hostvars`` are shaped as the role leaves them: each prober registered ``__portguard_probe`` (port_probe's
result), each host ``__portguard_counters_before``/``_after`` (port_activity's result); hosts that probe
nothing registered a skipped task.
"""

import json
import xml.etree.ElementTree as ET

import pytest

from ansible_collections.portguard.hardening.plugins.filter.portguard import FilterModule

FILTERS = FilterModule().filters()
HOSTS = ["app1", "db1", "desk1", "mon1", "web1", "web2"]


pytestmark = pytest.mark.usefixtures("private_runtime_dir")


@pytest.fixture
def inventory(example_inventory):
    _variables, groups, hostvars = example_inventory
    return {host: dict(values) for host, values in hostvars.items()}, groups


@pytest.fixture
def planned(inventory):
    hostvars, groups = inventory
    return FILTERS["probe_plan"](hostvars, groups, HOSTS)


def after_the_probes(hostvars, plan, seen=None, unreadable=()):
    """Register in ``hostvars`` what the role's tasks would, with the hosts behaving as planned but for ``seen``."""
    results, denied = {}, {}
    for item in plan:
        state = (seen or {}).get((item["src"], item["dst"], item["port"], item["proto"]), item["expected"])
        results.setdefault(item["src"], []).append({
            "address": item["address"], "port": item["port"], "proto": item["proto"], "source": item["src_address"],
            "state": state, "reason": "handshake" if state == "open" else "timeout", "rtt_ms": 0.2})
        if item["counted_at"] and state != "open":
            denied[item["counted_at"]] = denied.get(item["counted_at"], 0) + 1
    for host in HOSTS:
        variables = hostvars[host]
        if host in results:
            variables["__portguard_probe"] = {"changed": False, "results": results[host]}
        else:
            variables["__portguard_probe"] = {"changed": False, "skipped": True, "skip_reason": "Conditional result"}
        egress = host == "desk1"
        before = {"backend": "nftables", "denied_in": 0, "denied_out": 0 if egress else None, "elements": []}
        after = dict(before, denied_in=denied.get(f"{host}/in", 0))
        if egress:
            after["denied_out"] = denied.get(f"{host}/out", 0)
        if host in unreadable:
            after["denied_in"] = None
        variables["__portguard_counters_before"] = {"changed": False, "counters": before}
        variables["__portguard_counters_after"] = {"changed": False, "counters": after}
    return hostvars


def test_the_plan_comes_with_listeners_probes_and_self_checks(planned):
    plan = planned["plan"]
    assert {p["src"] for p in plan} == set(planned["probes"]) == {"app1", "db1", "desk1", "mon1", "web1"}
    assert set(planned["listeners"]) == set(planned["self_checks"]) == set(HOSTS)
    assert sum(len(v) for v in planned["probes"].values()) == len(plan)


def test_a_network_as_the_catalog_says_passes(inventory, planned):
    hostvars, _groups = inventory
    verdict = FILTERS["verify_matrix"](after_the_probes(hostvars, planned["plan"]), planned["plan"], HOSTS)
    assert verdict["ok"] is True and verdict["problems"] == []
    assert verdict["cells"] == len(planned["plan"])
    denied = sum(1 for p in planned["plan"] if p["counted_at"] == "desk1/out")
    assert verdict["counters"]["desk1/out"] == {"denied_probes": denied, "counter_delta": denied}
    assert json.loads(verdict["json"])["ok"] is True
    suites = ET.fromstring(verdict["junit"])  # noqa: S314 - our own output
    assert [s.get("failures") for s in suites] == ["0"] * len(HOSTS)
    assert "All cells as the catalog expects." in verdict["html"]
    assert verdict["table"].startswith("open services (everything else was blocked, as the catalog says):")


def test_a_leak_fails_the_verdict_and_names_the_probe(inventory, planned):
    hostvars, _groups = inventory
    registered = after_the_probes(hostvars, planned["plan"], seen={("web1", "db1", 5432, "tcp"): "open"})
    verdict = FILTERS["verify_matrix"](registered, planned["plan"], HOSTS)
    assert verdict["ok"] is False
    # the two leaked probes, and db1's counter that rose by two less than the probes it had to deny
    denied = sum(1 for p in planned["plan"] if p["counted_at"] == "db1/in")
    assert verdict["problems"] == [
        "web1 (172.30.89.11) -> db1 172.30.89.31 5432/tcp [postgres]: expected filtered, seen open (handshake)",
        "web1 (fd89:7067::11) -> db1 fd89:7067::31 5432/tcp [postgres]: expected filtered, seen open (handshake)",
        f"db1/in: {denied} probes were denied but the deny counter rose by {denied - 2} only",
    ]
    assert json.loads(verdict["json"])["problems"] == verdict["problems"]


def test_an_unreadable_counter_fails_the_verdict(inventory, planned):
    hostvars, _groups = inventory
    registered = after_the_probes(hostvars, planned["plan"], unreadable=("web2",))
    verdict = FILTERS["verify_matrix"](registered, planned["plan"], HOSTS)
    assert verdict["problems"] == ["web2/in: the deny counter could not be read"]


def test_probes_nobody_ran_are_missing(inventory, planned):
    hostvars, _groups = inventory
    registered = after_the_probes(hostvars, planned["plan"])
    registered["mon1"]["__portguard_probe"] = {"changed": False, "results": []}
    verdict = FILTERS["verify_matrix"](registered, planned["plan"], HOSTS)
    missing = [p for p in verdict["problems"] if p.endswith("seen missing")]
    assert len(missing) == sum(1 for p in planned["plan"] if p["src"] == "mon1")
    assert missing[0].startswith("mon1 (172.30.89.41) -> ")


def test_the_registered_variable_names_can_be_chosen(inventory, planned):
    hostvars, _groups = inventory
    registered = after_the_probes(hostvars, planned["plan"], seen={("app1", "db1", 5432, "tcp"): "filtered"})
    for variables in registered.values():
        for name in ("probe", "counters_before", "counters_after"):
            variables[f"mine_{name}"] = variables.pop(f"__portguard_{name}")
    verdict = FILTERS["verify_matrix"](registered, planned["plan"], HOSTS, probe_var="mine_probe",
                                       before_var="mine_counters_before", after_var="mine_counters_after")
    assert verdict["problems"] == [
        "app1 (172.30.89.21) -> db1 172.30.89.31 5432/tcp [postgres]: expected open, seen filtered (timeout)",
        "app1 (fd89:7067::21) -> db1 fd89:7067::31 5432/tcp [postgres]: expected open, seen filtered (timeout)",
    ]
