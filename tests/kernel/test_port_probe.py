"""port_probe against a real rendered ruleset (root): every probe's classification, exactly.

Two namespaces over veth (kernel_lab.NetLab): the target loads the ruleset
the collection renders for it from a small catalog (some ports allowed from
the prober, others not), with ``portguard_deny: reject`` and then ``drop``.
Listeners (TCP accept and UDP echo) run on some allowed and some denied
ports; other allowed ports have nothing listening. So the truth of every
probe is known from the catalog's decision function and the listener list:

- allowed and listening: ``open`` (``handshake`` / ``echo``);
- allowed, nothing listening: ``closed`` (``refused`` / ``port-unreachable``);
- denied: ``filtered``, ``rejected`` under reject, ``timeout`` under drop.

NetLab lifts the ICMP rate limits in its namespaces, so each rejected probe
gets its ICMP error (with the kernel's limits most of a burst would time out,
still ``filtered``, but the reason would say ``timeout``).

Then full TCP sweeps under drop, with high concurrency and with the CPU busy
(spinning processes on every core): not one open or closed port may come
back filtered. Last, the module itself through ``ansible localhost`` run in
the prober namespace.
"""

import contextlib
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_lab import NetLab, Sample
from support.ansible import ansible_env, tool
from support.paths import COLLECTIONS
from support.requirements import need, require

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

pytestmark = pytest.mark.kernel

RUNNER = Path(__file__).with_name("probe_runner.py")
TARGET = {4: "198.18.77.1", 6: "2001:db8:77::1"}
PROBER = {4: "198.18.77.2", 6: "2001:db8:77::2"}
# TCP and UDP listeners on each: allowed ports and denied ones (22, 5432, 6379), spread over the whole range.
LISTENING = (1, 22, 53, 80, 5432, 6379, 8000, 8003, 40000, 40002, 65535)
# The probe matrix: listening ports, allowed ports with nothing listening (8001, 8002, 9100, 514/udp,
# 40001) and denied ports with nothing listening (23, 9999).
PORTS = (1, 22, 23, 53, 80, 514, 5432, 6379, 8000, 8001, 8002, 8003, 9100, 9999, 40000, 40001, 40002, 65535)
REASONS = {("open", "tcp"): "handshake", ("open", "udp"): "echo", ("closed", "tcp"): "refused",
           ("closed", "udp"): "port-unreachable"}


def catalog(deny: str):
    variables = {
        "portguard_networks": {"probers": [PROBER[4], PROBER[6]], "office": ["10.20.0.0/16", "2001:db8:20::/48"],
                               "admin_vpn": ["10.99.0.0/24"]},
        "portguard_services": {
            "tcpmux": {"port": 1, "proto": "tcp", "purpose": "Lowest port", "owner": "test"},
            "ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration", "owner": "platform"},
            "web": {"port": 80, "proto": "tcp", "purpose": "Web", "owner": "web"},
            "dns": {"port": 53, "proto": ["tcp", "udp"], "purpose": "Internal DNS", "owner": "platform"},
            "syslog": {"port": 514, "proto": "udp", "purpose": "Logs", "owner": "platform"},
            "workers": {"port": "8000-8003", "proto": "tcp", "purpose": "App workers", "owner": "web"},
            "metrics": {"port": 9100, "proto": ["tcp", "udp"], "purpose": "Metrics", "owner": "platform"},
            "tunnel": {"port": "40000-40002", "proto": ["tcp", "udp"], "purpose": "Tunnel", "owner": "net"},
            "top": {"port": 65535, "proto": ["tcp", "udp"], "purpose": "Highest port", "owner": "test"},
            "postgres": {"port": 5432, "proto": "tcp", "purpose": "Orders database", "owner": "data"},
        },
        "portguard_flows": [
            {"name": "probers-in", "from": "probers", "to": "targets",
             "services": ["tcpmux", "web", "dns", "syslog", "workers", "metrics", "tunnel", "top"]},
            {"name": "office-db", "from": "office", "to": "targets", "services": ["postgres"]},
        ],
        "portguard_management": {"from": ["admin_vpn"], "services": ["ssh"]},
    }
    groups = {"all": ["target"], "targets": ["target"]}
    hostvars = {"target": {"ansible_connection": "local", "portguard_addresses": [TARGET[4], TARGET[6]],
                           "portguard_deny": deny}}
    return compile_catalog(variables, groups, hostvars, today=datetime.date(2026, 1, 15)).host("target")


def truth(policy, family: int, port: int, proto: str) -> str:
    if not policy.allowed_in(PROBER[family], port, proto):
        return "filtered"
    return "open" if port in LISTENING else "closed"


@pytest.fixture(scope="module")
def lab():
    require("ip", "nft", "sysctl")
    sample = Sample(sources=(PROBER[4], PROBER[6]), ports=LISTENING, host_addresses={"target": (TARGET[4], TARGET[6])})
    netlab = NetLab(sample)
    try:
        netlab.setup()
        netlab.become("target")
        netlab.check_reachability()
        yield netlab
    finally:
        netlab.teardown()


@pytest.fixture
def load(lab):
    """``load(deny)``: the target's rendered ruleset in its namespace, fresh conntrack and neighbours."""

    def apply(deny: str):
        policy = catalog(deny)
        lab.reset_firewall()
        lab.ns(lab.dst, "nft", "-f", "-", input=render_nftables(policy))
        for namespace in (lab.dst, lab.src):
            lab.ns(namespace, "ip", "neigh", "flush", "all")
        return policy

    return apply


def run_prober(lab, request: dict) -> dict:
    result = lab.ns(lab.src, sys.executable, str(RUNNER), str(COLLECTIONS), input=json.dumps(request))
    return json.loads(result.stdout)


@contextlib.contextmanager
def cpu_hog():
    """Two spinning processes per core, at the prober's priority, for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _spinner in range(2 * (os.cpu_count() or 1))]
    try:
        yield len(spinners)
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def wrong_lines(results, expected) -> list[str]:
    return [f"{r['address']} {r['port']}/{r['proto']}: {r['state']} ({r['reason']}), expected {want}"
            for r, want in zip(results, expected) if r["state"] != want]


@pytest.mark.parametrize("deny", ["reject", "drop"])
def test_every_probe_is_classified_exactly(lab, load, deny):
    policy = load(deny)
    targets, expected = [], []
    for family in (4, 6):
        for port in PORTS:
            for proto in ("tcp", "udp"):
                targets.append([TARGET[family], port, proto, None])
                state = truth(policy, family, port, proto)
                reason = REASONS.get((state, proto)) or ("rejected" if deny == "reject" else "timeout")
                expected.append((state, reason))
    assert {state for state, _reason in expected} == {"open", "closed", "filtered"}
    out = run_prober(lab, {"targets": targets, "timeout": 1.0})
    got = [(r["state"], r["reason"]) for r in out["results"]]
    wrong = [f"{t[0]} {t[1]}/{t[2]}: got {g}, expected {e}" for t, g, e in zip(targets, got, expected) if g != e]
    assert not wrong, f"{len(wrong)} of {len(targets)} probes misclassified under {deny}:\n" + "\n".join(wrong)
    assert [(r["address"], r["port"], r["proto"]) for r in out["results"]] == [tuple(t[:3]) for t in targets]
    # Every denied probe counted by the ruleset's deny counter: the prober's packets really hit the policy.
    counter = lab.ns(lab.dst, "nft", "list", "counter", "inet", "portguard", "denied_in").stdout
    denied = sum(1 for state, _reason in expected if state == "filtered")
    packets = int(counter.split("packets", 1)[1].split()[0])
    assert packets >= denied


def test_a_source_address_per_target_is_used(lab, load):
    """A probe from a source the catalog does not allow is filtered; from the prober's own, it gets through."""
    policy = load("reject")
    stranger = "198.18.77.99"
    lab.ns(lab.src, "ip", "address", "add", f"{stranger}/32", "dev", lab.src_if)
    try:
        out = run_prober(lab, {"targets": [[TARGET[4], 80, "tcp", stranger], [TARGET[4], 80, "tcp", PROBER[4]],
                                           [TARGET[4], 80, "tcp", None]], "timeout": 1.0})
    finally:
        lab.ns(lab.src, "ip", "address", "del", f"{stranger}/32", "dev", lab.src_if)
    assert not policy.allowed_in(stranger, 80, "tcp")
    assert [(r["state"], r["reason"], r["source"]) for r in out["results"]] == [
        ("filtered", "rejected", stranger), ("open", "handshake", PROBER[4]), ("open", "handshake", None)]


SWEEPS = [
    pytest.param(4, None, False, id="ipv4-default-concurrency"),
    pytest.param(6, None, True, id="ipv6-default-concurrency-cpu-busy"),
    pytest.param(4, 16000, True, id="ipv4-concurrency-16000-cpu-busy"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "concurrency", "busy"), SWEEPS)
def test_full_sweep_under_drop_misclassifies_nothing(lab, load, family, concurrency, busy):
    """65,535 TCP ports under drop: open ports open, allowed-closed ports closed, every other port filtered."""
    policy = load("drop")
    expected = [truth(policy, family, port, "tcp") for port in range(1, 65536)]
    request = {"sweep": {"address": TARGET[family], "first": 1, "last": 65535}, "timeout": 1.0,
               "concurrency": concurrency}
    with cpu_hog() if busy else contextlib.nullcontext():
        out = run_prober(lab, request)
    results = out["results"]
    assert len(results) == 65535
    wrong = wrong_lines(results, expected)
    summary = {state: sum(1 for r in results if r["state"] == state) for state in ("open", "closed", "filtered")}
    assert not wrong, (f"{len(wrong)} ports misclassified in {out['elapsed']:.1f} s (summary {summary}):\n"
                       + "\n".join(wrong[:30]))
    assert summary["open"] == sum(1 for state in expected if state == "open") > 5
    assert summary["closed"] == sum(1 for state in expected if state == "closed") >= 4
    assert {r["reason"] for r in results if r["state"] == "filtered"} == {"timeout"}


@pytest.mark.slow
def test_full_sweep_under_reject_misclassifies_nothing(lab, load):
    policy = load("reject")
    expected = [truth(policy, 4, port, "tcp") for port in range(1, 65536)]
    out = run_prober(lab, {"sweep": {"address": TARGET[4], "first": 1, "last": 65535}, "timeout": 1.0})
    wrong = wrong_lines(out["results"], expected)
    assert not wrong, f"{len(wrong)} ports misclassified:\n" + "\n".join(wrong[:30])


def ansible_command() -> str:
    require("ip")
    found = tool("ansible")
    need(found, "ansible")
    return found


def test_module_through_ansible_in_the_prober_namespace(lab, load):
    policy = load("drop")
    command = ansible_command()
    args = {
        "targets": [{"address": TARGET[4], "port": 80}, {"address": TARGET[6], "port": 53, "proto": "udp"},
                    {"address": TARGET[6], "port": 5432, "proto": "tcp"},
                    {"address": TARGET[4], "port": 514, "proto": "udp", "source": PROBER[4]}],
        "sweep_addresses": [TARGET[4], TARGET[6]],
        "ports": ["7999-8004", "9100"],
        "timeout": 1.0,
    }
    env = ansible_env(ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    expected = [("open", TARGET[4], 80, "tcp"), ("open", TARGET[6], 53, "udp"), ("filtered", TARGET[6], 5432, "tcp"),
                ("closed", TARGET[4], 514, "udp")]
    expected += [(truth(policy, family, port, "tcp"), TARGET[family], port, "tcp")
                 for family in (4, 6) for port in (7999, 8000, 8001, 8002, 8003, 8004, 9100)]
    for extra in ([], ["--check"]):
        result = subprocess.run(["ip", "netns", "exec", lab.src, command, "localhost", "-o", "-m",
                                 "portguard.hardening.port_probe", "-a", json.dumps(args), *extra],
                                capture_output=True, text=True, env=env, timeout=180, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        output = json.loads(result.stdout.split(" => ", 1)[1])
        assert output["changed"] is False
        got = [(r["state"], r["address"], r["port"], r["proto"]) for r in output["results"]]
        assert got == expected
        assert output["results"][3]["source"] == PROBER[4]
        assert output["summary"] == {state: sum(1 for e in expected if e[0] == state)
                                     for state in ("open", "closed", "filtered")}
        assert output["elapsed"] < 30


def test_module_refuses_a_bad_target_through_ansible(lab):
    command = ansible_command()
    env = ansible_env(ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    args = {"targets": [{"address": TARGET[4], "port": 70000}]}
    result = subprocess.run(["ip", "netns", "exec", lab.src, command, "localhost", "-o", "-m",
                             "portguard.hardening.port_probe", "-a", json.dumps(args)],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode != 0
    output = json.loads(result.stdout.split(" => ", 1)[1])
    assert "targets[0]: bad port 70000" in output["msg"]
    assert "Traceback" not in result.stdout and "module_stderr" not in output
