#!/usr/bin/env python
"""Benchmark: port_probe against ``nmap -sT``, under the collection's reject and drop policies.

    sudo .venv/bin/python bench/bench_port_probe.py [--repeats 1] [--skip-nmap] [--family 4|6]

Needs root, ``ip``, ``nft`` and (for the comparison) ``nmap`` (``scripts/setup.sh``
installs it). Two throwaway namespaces (``pgbench-pp-tgt-*``, ``pgbench-pp-src-*``)
joined by a veth pair; the target loads the REAL ruleset the collection renders
for it (``render_nftables`` of a small compiled catalog) with
``portguard_deny: reject``, then ``drop``. Listeners (TCP accept and UDP echo,
tests/kernel/nsagent.py) run on some allowed and some denied ports; other
allowed ports have nothing listening. The ground truth of every port is then
known: allowed and listening is open, allowed and nothing listening is closed,
denied is filtered.

For each policy, in one run:

- a full 1-65535 TCP sweep of the target by ``port_probe`` (its library in a
  process in the prober namespace; default timeout 1 s and default concurrency
  unless ``--timeout``/``--concurrency``) and by ``nmap -sT -p- -T4 -n -Pn``
  (``-n -Pn``: no DNS, no host discovery; the time is the sweep's);
- under drop, the targeted probe set of the host (its catalog services plus
  ``matrix.COMMON_PORTS``, as the verify role builds it, TCP and UDP, IPv4 and
  IPv6) by port_probe.

The table gives each run's wall-clock seconds (the whole process, interpreter
start included), the open/closed/filtered counts and the number of ports
classified differently from the ground truth. nmap under drop is slow (see
docs/benchmarks.md); ``--nmap-limit`` bounds it (default 300 s).

The kernel rate-limits ICMP errors (per peer and in total): under a sweep, a
rejecting host answers only the first few probes and the rest time out (still
"filtered", for both tools). Like the kernel tests, the target namespace lifts
those limits (``--keep-icmp-ratelimit`` keeps the kernel defaults), so
"reject" measures what the ruleset answers.
"""

import argparse
import contextlib
import datetime
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import _common

_common.setup_path()

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import (  # noqa: E402
    render_nftables,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog  # noqa: E402
from ansible_collections.portguard.hardening.plugins.module_utils.core.verify.matrix import probe_ports_of  # noqa: E402

AGENT = _common.ROOT / "tests" / "kernel" / "nsagent.py"
RUNNER = _common.ROOT / "tests" / "kernel" / "probe_runner.py"
TARGET = {4: "198.18.77.1", 6: "2001:db8:77::1"}
PROBER = {4: "198.18.77.2", 6: "2001:db8:77::2"}
# What listens on the target (TCP and UDP on each): some allowed ports, some denied ones.
LISTENING = (22, 53, 80, 443, 2375, 5432, 6379, 8000, 8005, 8010, 9100, 27017, 40000)
TODAY = "2026-06-01"


def catalog(deny: str) -> tuple[dict, dict, dict]:
    """A small catalog: the prober's network may reach web, DNS, the workers and the metrics agent."""
    variables = {
        "portguard_networks": {
            "probers": [PROBER[4], PROBER[6]],
            "office": ["10.20.0.0/16", "2001:db8:20::/48"],
            "admin_vpn": ["10.99.0.0/24"],
        },
        "portguard_services": {
            "ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration", "owner": "platform"},
            "web": {"port": [80, 443], "proto": "tcp", "purpose": "Web", "owner": "web"},
            "dns": {"port": 53, "proto": ["tcp", "udp"], "purpose": "Internal DNS", "owner": "platform"},
            "workers": {"port": "8000-8010", "proto": "tcp", "purpose": "App workers", "owner": "web"},
            "metrics": {"port": 9100, "proto": "tcp", "purpose": "Node exporter", "owner": "platform"},
            "tunnel": {"port": "40000-40003", "proto": ["tcp", "udp"], "purpose": "Tunnel", "owner": "net"},
            "postgres": {"port": 5432, "proto": "tcp", "purpose": "Orders database", "owner": "data"},
            "syslog": {"port": 514, "proto": "udp", "purpose": "Logs", "owner": "platform"},
        },
        "portguard_flows": [
            {"name": "probers-in", "from": "probers", "to": "targets",
             "services": ["web", "dns", "workers", "metrics", "tunnel", "syslog"]},
            {"name": "office-db", "from": "office", "to": "targets", "services": ["postgres"]},
        ],
        "portguard_management": {"from": ["admin_vpn"], "services": ["ssh"]},
    }
    groups = {"all": ["target"], "targets": ["target"]}
    hostvars = {"target": {"ansible_connection": "local", "portguard_addresses": [TARGET[4], TARGET[6]],
                           "portguard_deny": deny}}
    return variables, groups, hostvars


def compiled(deny: str):
    variables, groups, hostvars = catalog(deny)
    return compile_catalog(variables, groups, hostvars, today=datetime.date.fromisoformat(TODAY))


def truth(host_policy, family: int, port: int, proto: str) -> str:
    if not host_policy.allowed_in(PROBER[family], port, proto):
        return "filtered"
    return "open" if port in LISTENING else "closed"


def sh(*command, stdin=None, check=True, timeout=None):
    return subprocess.run(command, input=stdin, capture_output=True, text=True, check=check, timeout=timeout)


class Lab:
    def __init__(self, keep_ratelimit: bool):
        tag = secrets.token_hex(3)
        self.tgt, self.src = f"pgbench-pp-tgt-{tag}", f"pgbench-pp-src-{tag}"
        self.keep_ratelimit = keep_ratelimit
        self.listener = None

    def __enter__(self):
        for ns in (self.tgt, self.src):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for key in ("default", "all"):
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
        if not self.keep_ratelimit:
            for setting in ("net.ipv4.icmp_ratemask=0", "net.ipv6.icmp.ratelimit=0"):
                sh("ip", "netns", "exec", self.tgt, "sysctl", "-qw", setting, check=False)
            sh("ip", "netns", "exec", self.tgt, "sysctl", "-qw", "net.ipv6.icmp.ratemask=", check=False)
        sh("ip", "link", "add", "pgbpp-t", "netns", self.tgt, "type", "veth", "peer", "name", "pgbpp-s", "netns", self.src)
        for ns, dev, addresses in ((self.tgt, "pgbpp-t", TARGET), (self.src, "pgbpp-s", PROBER)):
            sh("ip", "-n", ns, "addr", "add", f"{addresses[4]}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{addresses[6]}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        self.listener = subprocess.Popen(
            ["ip", "netns", "exec", self.tgt, sys.executable, str(AGENT), "listen", *map(str, LISTENING)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.listener.stdout.readline().strip() != "ready":
            raise RuntimeError("the listeners did not start")
        return self

    def __exit__(self, *exc):
        if self.listener is not None:
            self.listener.stdin.close()
            try:
                self.listener.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.listener.kill()
                self.listener.wait()
        for ns in (self.tgt, self.src):
            sh("ip", "netns", "delete", ns, check=False)

    def load(self, host_policy) -> None:
        sh("ip", "netns", "exec", self.tgt, "nft", "-f", "-", stdin=render_nftables(host_policy))

    def settle(self) -> None:
        """Between runs: no conntrack or neighbour state of the previous run helps the next one."""
        if shutil.which("conntrack"):
            for ns in (self.tgt, self.src):
                sh("ip", "netns", "exec", ns, "conntrack", "-F", check=False)
        for ns in (self.tgt, self.src):
            sh("ip", "-n", ns, "neigh", "flush", "all")

    def port_probe(self, request: dict) -> tuple[float, dict]:
        started = time.monotonic()
        out = sh("ip", "netns", "exec", self.src, sys.executable, str(RUNNER), str(_common.COLLECTIONS),
                 stdin=json.dumps(request)).stdout
        return time.monotonic() - started, json.loads(out)

    def nmap(self, family: int, limit: float) -> tuple[float, dict | None]:
        command = ["ip", "netns", "exec", self.src, "nmap", "-sT", "-p-", "-T4", "-n", "-Pn", "-oX", "-"]
        command += ["-6"] if family == 6 else []
        started = time.monotonic()
        try:
            out = sh(*command, TARGET[family], timeout=limit).stdout
        except subprocess.TimeoutExpired:
            return time.monotonic() - started, None
        return time.monotonic() - started, parse_nmap(out)


def parse_nmap(xml_text: str) -> dict:
    """port -> state, for every port: listed ports, and the rest from ``extraports``."""
    root = ElementTree.fromstring(xml_text)  # noqa: S314  (nmap's output, not untrusted input)
    listed, rest = {}, None
    for ports in root.iter("ports"):
        for port in ports.findall("port"):
            listed[int(port.get("portid"))] = port.find("state").get("state")
        for extra in ports.findall("extraports"):
            if rest is not None and extra.get("state") != rest:
                raise RuntimeError("more than one extraports state; cannot attribute the unlisted ports")
            rest = extra.get("state")
    return {port: listed.get(port, rest) for port in range(1, 65536)}


@contextlib.contextmanager
def cpu_hog(count: int):
    """``count`` processes spinning at the prober's priority, killed (by pid) when the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _spinner in range(count)]
    try:
        time.sleep(0.2)
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def softnet_drops() -> int:
    """Packets the kernel dropped because a CPU's input backlog was full (all CPUs, whole machine)."""
    lines = Path("/proc/net/softnet_stat").read_text().split("\n")
    return sum(int(line.split()[1], 16) for line in lines if line.strip())


def counts(states) -> dict:
    found = {"open": 0, "closed": 0, "filtered": 0, "other": 0}
    for state in states:
        found[state if state in found else "other"] += 1
    return found


def row(tool, policy, what, seconds, states, expected, note=""):
    found = counts(states)
    wrong = sum(1 for got, want in zip(states, expected) if got != want)
    return {"tool": tool, "policy": policy, "what": what, "seconds": round(seconds, 2), **found,
            "misclassified": wrong, "note": note}


def print_table(rows) -> None:
    print(f"\n{'tool':<12} {'policy':<7} {'probes':<28} {'seconds':>8} {'open':>6} {'closed':>7} {'filtered':>9} "
          f"{'wrong':>6}  note")
    for r in rows:
        print(f"{r['tool']:<12} {r['policy']:<7} {r['what']:<28} {r['seconds']:>8.2f} {r['open']:>6} {r['closed']:>7} "
              f"{r['filtered']:>9} {r['misclassified']:>6}  {r['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement (rows are printed per run)")
    parser.add_argument("--family", type=int, choices=(4, 6), default=4, help="address family of the full sweeps")
    parser.add_argument("--timeout", type=float, default=None, help="port_probe timeout (default: the module's, 1 s)")
    parser.add_argument("--concurrency", type=int, default=None, help="port_probe concurrency (default: its own)")
    parser.add_argument("--skip-nmap", action="store_true")
    parser.add_argument("--nmap-limit", type=float, default=300.0, help="seconds before an nmap run is cut off")
    parser.add_argument("--policies", nargs="+", default=["reject", "drop"], choices=("reject", "drop"))
    parser.add_argument("--keep-icmp-ratelimit", action="store_true")
    parser.add_argument("--cpu-hog", type=int, default=0, metavar="N",
                        help="also sweep under drop with N spinning processes busy (e.g. 2 per CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tools = ["ip", "nft"] + ([] if args.skip_nmap else ["nmap"])
    missing = [tool for tool in tools if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        sys.exit(f"bench_port_probe needs root and {', '.join(missing) or ', '.join(tools)}")
    print(_common.machine_facts())
    if not args.skip_nmap:
        print(sh("nmap", "--version").stdout.splitlines()[0])
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; ICMP rate limits "
          f"{'kept' if args.keep_icmp_ratelimit else 'lifted'} on the target")
    timeout = args.timeout if args.timeout is not None else 1.0
    rows = []
    with Lab(args.keep_icmp_ratelimit) as lab:
        for deny in args.policies:
            policy = compiled(deny).host("target")
            lab.load(policy)
            family = args.family
            expected = [truth(policy, family, port, "tcp") for port in range(1, 65536)]
            for _repeat in range(args.repeats):
                lab.settle()
                seconds, out = lab.port_probe({"sweep": {"address": TARGET[family], "first": 1, "last": 65535},
                                               "timeout": timeout, "concurrency": args.concurrency})
                states = [r["state"] for r in out["results"]]
                rows.append(row("port_probe", deny, f"TCP 1-65535 IPv{family}", seconds, states, expected,
                                f"probe loop {out['elapsed']:.2f} s, concurrency "
                                f"{args.concurrency or out['concurrency']}, timeout {timeout:g} s"))
                print_table(rows[-1:])
                if not args.skip_nmap:
                    lab.settle()
                    seconds, found = lab.nmap(family, args.nmap_limit)
                    if found is None:
                        rows.append({"tool": "nmap -sT -T4", "policy": deny, "what": f"TCP 1-65535 IPv{family}",
                                     "seconds": seconds, "open": 0, "closed": 0, "filtered": 0, "other": 0,
                                     "misclassified": 65535, "note": f"cut off after {args.nmap_limit:g} s"})
                    else:
                        states = [found[port] for port in range(1, 65536)]
                        rows.append(row("nmap -sT -T4", deny, f"TCP 1-65535 IPv{family}", seconds, states, expected))
                    print_table(rows[-1:])
            if deny == "drop":
                planned = probe_ports_of(None, compiled(deny).services, 47123)
                targets, expected = [], []
                for fam in (4, 6):
                    for port, proto, _name in planned:
                        targets.append([TARGET[fam], port, proto, None])
                        expected.append(truth(policy, fam, port, proto))
                for _repeat in range(args.repeats):
                    lab.settle()
                    seconds, out = lab.port_probe({"targets": targets, "timeout": timeout,
                                                   "concurrency": args.concurrency})
                    states = [r["state"] for r in out["results"]]
                    rows.append(row("port_probe", deny, f"targeted set ({len(targets)} probes)", seconds, states,
                                    expected, f"probe loop {out['elapsed']:.2f} s; catalog + COMMON_PORTS, "
                                    "TCP+UDP, IPv4+IPv6"))
                    print_table(rows[-1:])
        if args.cpu_hog:
            policy = compiled("drop").host("target")
            lab.load(policy)
            for family in (4, 6):
                expected = [truth(policy, family, port, "tcp") for port in range(1, 65536)]
                for _repeat in range(args.repeats):
                    lab.settle()
                    drops = softnet_drops()
                    with cpu_hog(args.cpu_hog):
                        seconds, out = lab.port_probe({"sweep": {"address": TARGET[family], "first": 1, "last": 65535},
                                                       "timeout": timeout, "concurrency": args.concurrency})
                    states = [r["state"] for r in out["results"]]
                    rows.append(row("port_probe", "drop", f"TCP 1-65535 IPv{family}", seconds, states, expected,
                                    f"CPU busy ({args.cpu_hog} spinners), loop {out['elapsed']:.2f} s, "
                                    f"{softnet_drops() - drops} packets dropped by full kernel backlogs"))
                    print_table(rows[-1:])
    print_table(rows)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"machine": _common.machine_facts(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
