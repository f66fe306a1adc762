#!/usr/bin/env python
"""Per-packet cost: new-connection rate between two network namespaces over veth.

Needs root, ``ip``, ``nft``, ``iptables-restore``/``ip6tables-restore`` (and
``ipset`` for our iptables backend); ``--iptables legacy`` uses the
``iptables-legacy*`` commands instead of those on PATH. Two throwaway namespaces are created per
scenario (``pgbench-srv-*``, ``pgbench-cli-*``, veth between them,
198.18.0.0/24 of the benchmarking range); a server in the server namespace
accepts and closes TCP connections on port 8080, and a client in the client
namespace opens and closes (RST, no TIME_WAIT) as many connections as it can
for a bounded time and count. Traffic only flows between these namespaces.

Scenarios, all on the server's input path, with 10,000 whitelist entries
(distinct sources, 30 % IPv6, from gen_catalog.whitelist_catalog); the
client's address is one of them, near the end of the catalog and last in
address order:

- ``none``: no firewall;
- ``nftables``: our rendered nftables ruleset (the client matched by one set
  element);
- ``iptables``: our iptables backend as the firewall module applies it on a
  host with ipset (its apply steps: the whitelist into ``hash:net,port``
  sets, then ``iptables-restore --noflush`` of both families, jumps from
  INPUT);
- ``iptables-rules``: our iptables backend's fallback for hosts without
  ipset (one rule per source, ports grouped with multiport), applied the
  same way;
- ``linear``: what a user would write by hand: one ``-s X -p tcp --dport
  8080 -j ACCEPT`` rule per entry in catalog order, then REJECT, no
  conntrack rule;
- ``linear+est``: the same with an ``ESTABLISHED,RELATED`` rule first.

Each round runs every scenario once, in a fresh pair of namespaces; the
report gives the median rate over the rounds and its share of the
no-firewall rate of the same round (median of the per-round shares).

    sudo python bench/bench_packets.py [--entries 10000] [--rounds 3] [--seconds 3]
"""

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts, setup_path

setup_path()

import gen_catalog  # noqa: E402

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables  # noqa: E402
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables  # noqa: E402
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog  # noqa: E402
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import IptablesBackend  # noqa: E402

SERVER, CLIENT, STRANGER = "198.18.0.1", "198.18.0.2", "198.18.0.99"
PORT = 8080
SCENARIOS = ("none", "nftables", "iptables", "iptables-rules", "linear", "linear+est")

SERVER_CODE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    try:
        c, _ = s.accept()
        c.close()
    except OSError:
        pass
"""

CLIENT_CODE = """
import json, socket, struct, sys, time
host, port, seconds, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
source = sys.argv[5] if len(sys.argv) > 5 else None
linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT, no port exhaustion
ok = failed = 0
error = None
start = time.perf_counter()
end = start + seconds
while ok + failed < limit:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.settimeout(3)
    try:
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        ok += 1
    except OSError as exc:
        failed += 1
        error = str(exc)
    finally:
        s.close()
    if time.perf_counter() >= end:
        break
print(json.dumps({"ok": ok, "failed": failed, "elapsed": time.perf_counter() - start, "error": error}))
"""


def sh(*args, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, check=check, capture_output=True, text=True)


@contextlib.contextmanager
def lab(tag: str):
    """Two namespaces joined by veth, a server listening in one; everything removed afterwards."""
    srv, cli = f"pgbench-srv-{tag}", f"pgbench-cli-{tag}"
    server = None
    try:
        sh("ip", "netns", "add", srv)
        sh("ip", "netns", "add", cli)
        sh("ip", "link", "add", "pgb-s", "netns", srv, "type", "veth", "peer", "name", "pgb-c", "netns", cli)
        for ns, dev, addr in ((srv, "pgb-s", SERVER), (cli, "pgb-c", CLIENT)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", cli, "addr", "add", f"{STRANGER}/24", "dev", "pgb-c")
        server = subprocess.Popen(["ip", "netns", "exec", srv, sys.executable, "-c", SERVER_CODE, str(PORT)],
                                  stdout=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("server did not start")
        yield srv, cli
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (srv, cli):
            sh("ip", "netns", "delete", ns, check=False)


def connect_rate(cli: str, seconds: float, limit: int, source: str | None = None) -> dict:
    args = ["ip", "netns", "exec", cli, sys.executable, "-c", CLIENT_CODE, SERVER, str(PORT), str(seconds), str(limit)]
    return json.loads(sh(*args, *([source] if source else [])).stdout)


def policy_for(entries: int):
    variables, groups, hostvars = gen_catalog.whitelist_catalog(
        entries, client=CLIENT, server="server", server_address=SERVER, port=PORT)
    sources = variables["portguard_networks"]["clients"]
    return compile_catalog(variables, groups, hostvars, today=gen_catalog.TODAY).host("server"), sources


def linear_payload(sources: list[str], family: int, established_first: bool) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", "-A INPUT -i lo -j ACCEPT"]
    if established_first:
        lines.append("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    lines += [f"-A INPUT -s {s} -p tcp -m tcp --dport {PORT} -j ACCEPT"
              for s in sources if ipaddress.ip_address(s).version == family]
    if family == 4:
        lines.append("-A INPUT -p tcp -j REJECT --reject-with icmp-admin-prohibited")
    else:
        lines.append("-A INPUT -p tcp -j REJECT --reject-with icmp6-adm-prohibited")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


IPTABLES = {"iptables": "iptables", "ip6tables": "ip6tables", "iptables-restore": "iptables-restore",
            "ip6tables-restore": "ip6tables-restore"}


def ipt(name: str) -> str:
    return IPTABLES[name]


def install(scenario: str, srv: str, policy, sources, workdir: Path) -> str:
    """Load the scenario's firewall into the server namespace; returns a short description."""
    run = ["ip", "netns", "exec", srv]
    if scenario == "none":
        return "no rules"
    if scenario == "nftables":
        path = workdir / "ruleset.nft"
        path.write_text(render_nftables(policy))
        sh(*run, "nft", "-f", str(path))
        return "rendered nftables ruleset"
    if scenario in ("iptables", "iptables-rules"):
        with_sets = scenario == "iptables"
        ruleset = render_iptables(policy, ipset=with_sets)
        suffix = IPTABLES["iptables"].removeprefix("iptables")
        for argv, data in IptablesBackend(suffix).apply_steps(ruleset.as_dict()):
            sh(*run, *argv, stdin=data)
        rules = sum(1 for line in ruleset.ipv4.splitlines() if line.startswith("-A "))
        elements = sum(1 for line in ruleset.ipset.splitlines() if line.startswith("add "))
        return f"our iptables backend, {rules} IPv4 rules" + (f", {elements} set elements" if with_sets else "")
    if scenario in ("linear", "linear+est"):
        established = scenario == "linear+est"
        sh(*run, ipt("iptables-restore"), stdin=linear_payload(sources, 4, established))
        sh(*run, ipt("ip6tables-restore"), stdin=linear_payload(sources, 6, established))
        return "one rule per entry" + (", established first" if established else "")
    raise ValueError(scenario)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--limit", type=int, default=200_000, help="most connections per measurement")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--iptables", choices=("nft", "legacy"), default=None,
                        help="iptables variant (default: whatever iptables is on PATH)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.iptables:
        for name in IPTABLES:
            base, _dash, rest = name.partition("-")
            IPTABLES[name] = f"{base}-{args.iptables}" + (f"-{rest}" if rest else "")
    tools = ["ip", "nft", *IPTABLES.values()] + (["ipset"] if "iptables" in args.scenarios else [])
    missing = [tool for tool in tools if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        sys.exit(f"bench_packets needs root and {', '.join(missing) or ', '.join(tools)}")
    iptables_version = sh(ipt("iptables"), "-V").stdout.strip()
    print(machine_facts())
    print(f"{sh('nft', '--version').stdout.strip()}; {iptables_version}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    policy, sources = policy_for(args.entries)
    print(f"{args.entries} whitelist entries ({len(policy.ingress)} elements), client {CLIENT} at position "
          f"{sources.index(CLIENT) + 1} of the catalog; {args.rounds} rounds of {args.seconds:g} s per scenario")
    workdir = Path(tempfile.mkdtemp(prefix="pg-bench-packets-"))
    rates: dict[str, list[float]] = {s: [] for s in args.scenarios}
    shares: dict[str, list[float]] = {s: [] for s in args.scenarios}
    notes = {}
    failures = dict.fromkeys(args.scenarios, 0)
    try:
        for number in range(args.rounds):
            baseline = None
            for scenario in args.scenarios:
                with lab(f"{os.getpid()}") as (srv, cli):
                    notes[scenario] = install(scenario, srv, policy, sources, workdir)
                    if scenario != "none":
                        denied = connect_rate(cli, 1.0, 1, source=STRANGER)
                        if denied["ok"]:
                            raise RuntimeError(f"{scenario}: a source outside the whitelist got through")
                    result = connect_rate(cli, args.seconds, args.limit)
                    # a rare timeout (a SYN lost to a full backlog on a busy machine) is noise; a firewall
                    # that denies the client fails nearly every connection
                    if result["failed"] > 0.01 * (result["ok"] + result["failed"]):
                        raise RuntimeError(f"{scenario}: {result['failed']} connections failed: {result['error']}")
                    failures[scenario] += result["failed"]
                    rate = result["ok"] / result["elapsed"]
                    rates[scenario].append(rate)
                    if scenario == "none":
                        baseline = rate
                    if baseline:
                        shares[scenario].append(rate / baseline)
                    lost = f" ({result['failed']} timed out: {result['error']})" if result["failed"] else ""
                    print(f"  round {number + 1}: {scenario:<14} {rate:9.0f} connections/s{lost}", flush=True)
        print()
        print(f"  {'scenario':<14} {'conn/s (median)':>16} {'% of none':>10}   ruleset")
        for scenario in args.scenarios:
            share = f"{100 * statistics.median(shares[scenario]):9.1f}%" if shares[scenario] else "       n/a"
            print(f"  {scenario:<14} {statistics.median(rates[scenario]):>16.0f} {share}   {notes[scenario]}")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.json:
            args.json.write_text(json.dumps({"rates": rates, "shares": shares, "notes": notes, "failures": failures},
                                            indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
