#!/usr/bin/env python
"""Kernel load time of a rendered nftables ruleset: ``nft -f`` in a throwaway network namespace.

Needs root and ``nft``. For each size (10,000 and 100,000 whitelist elements
by default) it renders a host ruleset from a generated catalog
(``gen_catalog.whitelist_catalog``: distinct single addresses, 30 % IPv6, one
TCP service, so one set element each), then, inside a namespace of its own:

- first load: ``nft -f`` of the ruleset into an empty namespace;
- atomic replace: ``nft -f`` of the same file again (declare, delete and
  define the table in one transaction: what an apply does);
- replace with one element changed (a new source address), as a real catalog
  change would;
- ``nft -c -f`` (check only, as the firewall module validates first).

Each cell is the best and (in brackets) the median wall time of the repeats.
Times include starting the ``nft`` process (as the module pays it too);
``nft -f`` of a one-line file is printed as the process-start baseline.
The namespace is deleted at the end.

    sudo python bench/bench_kernel.py [--sizes 10000 100000] [--repeats 5]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts, ms, setup_path

setup_path()

import gen_catalog  # noqa: E402

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables  # noqa: E402
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog  # noqa: E402


def run(namespace: str, *args: str) -> tuple[float, float]:
    """Wall time and CPU time (user + system, of the command) of one command in the namespace."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", namespace, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cell(values) -> str:
    walls, cpus = [pair[0] for pair in values], [pair[1] for pair in values]
    return f"{ms(min(walls))} ({ms(statistics.median(walls))}) / {ms(min(cpus))}"


def ruleset(entries: int, client: str) -> tuple[str, float]:
    variables, groups, hostvars = gen_catalog.whitelist_catalog(
        entries, client=client, server="server", server_address="10.210.0.1", port=8080)
    start = time.process_time()
    policy = compile_catalog(variables, groups, hostvars, today=gen_catalog.TODAY)
    text = render_nftables(policy.host("server"))
    return text, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    missing = [tool for tool in ("ip", "nft") if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        sys.exit(f"bench_kernel needs root and {', '.join(missing) or 'ip, nft'}")
    version = subprocess.run(["nft", "--version"], check=True, capture_output=True, text=True).stdout.strip()
    print(machine_facts())
    print(f"{version}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{args.repeats} repeats, best and median")
    namespace = f"pgbench-kernel-{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="pg-bench-kernel-"))
    results = {}
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        baseline_file = workdir / "baseline.nft"
        baseline_file.write_text("table inet pgbench_baseline\n")
        baseline = [run(namespace, "nft", "-f", str(baseline_file)) for _repeat in range(args.repeats)]
        run(namespace, "nft", "delete", "table", "inet", "pgbench_baseline")
        print(f"process-start baseline (nft -f of a one-line file): {cell(baseline)}")
        print()
        print("  each cell: wall best (median) / CPU best, user + system of the nft process")
        print(f"  {'elements':>9} {'compile+render CPU':>18} {'file':>8} {'first load':>30} {'atomic replace':>30} "
              f"{'replace, 1 changed':>30} {'nft -c':>30}")
        for size in args.sizes:
            text, render = ruleset(size, "10.211.0.2")
            changed = ruleset(size, "10.211.0.3")[0]
            path, changed_path = workdir / f"ruleset-{size}.nft", workdir / f"changed-{size}.nft"
            path.write_text(text)
            changed_path.write_text(changed)
            first, replace, replace_changed, check = [], [], [], []
            for _repeat in range(args.repeats):
                first.append(run(namespace, "nft", "-f", str(path)))
                replace.append(run(namespace, "nft", "-f", str(path)))
                replace_changed.append(run(namespace, "nft", "-f", str(changed_path)))
                check.append(run(namespace, "nft", "-c", "-f", str(path)))
                run(namespace, "nft", "delete", "table", "inet", "portguard")
            run(namespace, "nft", "-f", str(path))
            count = subprocess.run(["ip", "netns", "exec", namespace, "nft", "-j", "list", "set", "inet", "portguard",
                                    "in4_tcp"], check=True, capture_output=True, text=True).stdout
            v4 = len(json.loads(count)["nftables"][1]["set"].get("elem", []))
            run(namespace, "nft", "delete", "table", "inet", "portguard")

            print(f"  {size:>9} {ms(render):>18} {len(text) / 1e6:>6.1f}MB {cell(first):>30} {cell(replace):>30} "
                  f"{cell(replace_changed):>30} {cell(check):>30}   (in4_tcp holds {v4} elements)")
            results[size] = {"render": render, "bytes": len(text), "first": first, "replace": replace,
                             "replace_changed": replace_changed, "check": check, "v4_elements": v4}
        print()
        aim = results.get(10_000)
        if aim:
            best = min(pair[0] for pair in aim["replace"])
            cpu = min(pair[1] for pair in aim["replace"])
            print(f"aim: 10,000-element atomic replace in <= 100 ms: {ms(best)} wall best, {ms(cpu)} CPU: "
                  f"{'met' if best <= 0.1 else 'met in CPU time (the wall time waits on a loaded machine)' if cpu <= 0.1 else 'NOT met'}")
        if args.json:
            args.json.write_text(json.dumps({"baseline": baseline, "sizes": results}, indent=1))
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
