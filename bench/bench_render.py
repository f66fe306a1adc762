#!/usr/bin/env python
"""Compile plus render of a generated 10,000-entry catalog for 1,000 hosts, next to Aerleon.

One run measures, each repeat in a fresh Python process (so that no cache
survives from one repeat to the next, ours or Aerleon's):

- ``compile``: ``compile_catalog`` of the whole catalog and inventory;
- ``big host``: right after the compile, the big host's policy plus its
  nftables (and iptables) ruleset: "one host's ruleset from a 10,000-entry
  catalog";
- ``all hosts``: compile, then every host's policy and nftables ruleset (and,
  separately timed, the iptables payloads);
- per host once compiled: the cost of ``policy.host(h)`` plus
  ``render_nftables`` for each host in inventory order (median, p95, max);
- Aerleon, on the equivalent single ``nftables mixed INPUT`` policy of the
  big host (written by gen_catalog.py): as a library (definitions parse,
  policy parse, nftables generator), and the ``aclgen`` command line
  (process start and imports included; reported as is).

Times are the best (minimum) and the median of the repeats: the machine may
be shared, and the minimum is the least disturbed measure of the code.

    python bench/bench_render.py [--repeats 5] [--json results.json]
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
from _common import machine_facts, ms, percentile, setup_path

setup_path()


class _Clock:
    """Wall time (perf_counter) and this process's CPU time of the steps of one repeat."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return result


def _add(*laps):
    return tuple(sum(values) for values in zip(*laps))


def one_repeat(workdir: Path) -> dict:
    """One measurement of our side and of Aerleon's library, in this process: metric -> (wall, cpu)."""
    import gen_catalog

    from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
    from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
    from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

    data = json.loads((workdir / "catalog.json").read_text())
    variables, groups, hostvars, big = data["variables"], data["groups"], data["hostvars"], data["big_host"]
    hosts = groups["all"]
    today = gen_catalog.TODAY
    result = {}

    # one host's ruleset, right after the compile
    clock = _Clock()
    policy = compile_catalog(variables, groups, hostvars, today=today)
    result["compile"] = clock.lap()
    big_policy = policy.host(big)
    result["big_build"] = clock.lap()
    text = render_nftables(big_policy)
    result["big_nft"] = clock.lap()
    render_iptables(big_policy)
    result["big_ipt"] = clock.lap()
    result["big_one"] = _add(result["big_build"], result["big_nft"])
    result["big_all"] = _add(result["compile"], result["big_build"], result["big_nft"])
    result["big_entries"], result["big_lines"] = len(big_policy.ingress), text.count("\n")

    # all hosts, nftables: compile, then every host's policy and ruleset
    clock = _Clock()
    policy = compile_catalog(variables, groups, hostvars, today=today)
    compiled = clock.lap()
    per_host = []
    for host in hosts:
        render_nftables(policy.host(host))
        per_host.append(clock.lap())
    result["all_nft"] = _add(compiled, *per_host)
    result["per_host"] = [pair[0] for pair in per_host]
    result["per_host_big"] = per_host[hosts.index(big)][0]
    # iptables payloads of every host, policies already built (the policy build is timed above)
    clock = _Clock()
    for host in hosts:
        render_iptables(policy.host(host))
    result["all_ipt_render"] = clock.lap()
    result["entries_total"] = sum(len(policy.host(h).ingress) + len(policy.host(h).egress) for h in hosts)
    result["entries_median"] = statistics.median(len(policy.host(h).ingress) for h in hosts)
    result["findings"] = len(policy.findings)
    result["expired"] = len(policy.expired)

    # Aerleon as a library on the big host's equivalent policy
    try:
        from aerleon.lib import naming, nftables, plugin_supervisor
        from aerleon.lib import policy as aerleon_policy
    except ImportError:
        return result
    plugin_supervisor.PluginSupervisor.Start()
    pol_file = next((workdir / "aerleon" / "policies" / "pol").glob("*.pol"))
    pol_text = pol_file.read_text()
    clock = _Clock()
    definitions = naming.Naming(str(workdir / "aerleon" / "def"))
    result["aerleon_defs"] = clock.lap()
    pol = aerleon_policy.ParsePolicy(pol_text, definitions, optimize=False,
                                     base_dir=str(workdir / "aerleon" / "policies"))
    result["aerleon_parse"] = clock.lap()
    output = str(nftables.Nftables(pol, 2))
    result["aerleon_render"] = clock.lap()
    result["aerleon_lib"] = _add(result["aerleon_defs"], result["aerleon_parse"], result["aerleon_render"])
    result["aerleon_lines"] = output.count("\n")
    return result


def aclgen_run(workdir: Path) -> tuple[float, float] | None:
    aclgen = shutil.which("aclgen") or str(Path(sys.executable).parent / "aclgen")
    if not Path(aclgen).exists():
        return None
    out = Path(tempfile.mkdtemp(prefix="pg-aclgen-"))
    base = workdir / "aerleon"
    pol_file = next((base / "policies" / "pol").glob("*.pol"))
    command = [aclgen, f"--base_directory={base / 'policies'}", f"--definitions_directory={base / 'def'}",
               f"--output_directory={out}", f"--policy_file={pol_file}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the raw results there")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: one repeat in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_repeat(args.one)))
        return

    import gen_catalog

    workdir = Path(tempfile.mkdtemp(prefix="pg-bench-render-"))
    try:
        generated = gen_catalog.generate()
        gen_catalog.write(generated, workdir)
        print(machine_facts())
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"catalog: {generated.network_entries} network entries, "
              f"{len(generated.variables['portguard_services'])} services, {len(generated.hostvars)} hosts in "
              f"{len(generated.groups) - 1} groups, {len(generated.variables['portguard_flows'])} flows; "
              f"big host {generated.big_host}")
        runs, cli = [], []
        for _repeat in range(args.repeats):
            raw = subprocess.run([sys.executable, __file__, "--one", str(workdir)], check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(raw))
            cli.append(aclgen_run(workdir))
        report(runs, cli)
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "aclgen": cli}, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(runs: list[dict], cli: list) -> None:
    first = runs[0]
    print(f"big host whitelist: {first['big_entries']} elements; all hosts: {first['entries_total']} elements "
          f"(median {first['entries_median']:.0f} per host); {first['findings']} findings, {first['expired']} expired flows")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {len(runs)} repeats, each in a "
          "fresh process; best and median of the repeats, wall clock and CPU time of the process")
    print()
    for run, times in zip(runs, cli):
        run["aclgen"] = times
    ref = {}

    def row(label, key, compare=False):
        values = [r[key] for r in runs if r.get(key)]
        if not values:
            print(f"  {label:<54} n/a")
            return
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        ratio = ""
        if compare and "aerleon_lib" in ref:
            ratio = f"{min(walls) / ref['aerleon_lib'][0]:7.2f} {min(cpus) / ref['aerleon_lib'][1]:5.2f}"
        print(f"  {label:<54} {ms(min(walls)):>10} {ms(statistics.median(walls)):>10} {ms(min(cpus)):>10} "
              f"{ms(statistics.median(cpus)):>10} {ratio}")
        ref[key] = (min(walls), min(cpus))

    print(f"  {'':<54} {'wall best':>10} {'median':>10} {'CPU best':>10} {'median':>10} "
          "x Aerleon lib (wall, CPU)")
    print("Aerleon 1.18 (equivalent single nftables policy of the big host)")
    row("library: definitions + policy parse + nftables render", "aerleon_lib")
    row("  of which definitions parse", "aerleon_defs")
    row("  of which policy parse", "aerleon_parse")
    row("  of which nftables render", "aerleon_render")
    row("aclgen command line (process start included)", "aclgen")
    print("portguard")
    row("compile (10,000 entries, 1,000 services, 1,000 hosts)", "compile", True)
    row("big host: policy build, after compile", "big_build")
    row("big host: render nftables", "big_nft")
    row("big host: render iptables", "big_ipt")
    row("big host: build + nftables, after compile", "big_one", True)
    row("big host: compile + build + nftables", "big_all", True)
    row("all 1,000 hosts: compile + build + nftables", "all_nft", True)
    row("all 1,000 hosts: iptables render (policies built)", "all_ipt_render", True)
    best = min(runs, key=lambda r: r["all_nft"][0])
    per_host = best["per_host"]
    print("per host once compiled (build + nftables, wall), all hosts of the best repeat in inventory order:")
    print(f"  median {ms(statistics.median(per_host))}, p95 {ms(percentile(per_host, 0.95))}, "
          f"max {ms(max(per_host))}, big host {ms(best['per_host_big'])}, mean {ms(statistics.fmean(per_host))}")
    print()
    if "aerleon_lib" in ref:
        big, total, aerleon = ref["big_one"], ref["all_nft"], ref["aerleon_lib"]
        print(f"aim 1: big host ruleset after compile {ms(big[0])} wall, {ms(big[1])} CPU (aim <= 50 ms): "
              f"{'met' if max(big) <= 0.05 else 'met in CPU time' if big[1] <= 0.05 else 'NOT met'}")
        print(f"aim 2: all 1,000 hosts {ms(total[0])} wall, {ms(total[1])} CPU vs Aerleon library {ms(aerleon[0])} "
              f"wall, {ms(aerleon[1])} CPU for one policy: {'met' if total[1] < aerleon[1] else 'NOT met'} "
              f"(ratio {total[1] / aerleon[1]:.2f} in CPU time)")


if __name__ == "__main__":
    main()
