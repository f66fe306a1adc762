#!/usr/bin/env python
"""What one worker pays to get the shared compile of the generated 1,000-host catalog, before and after issue 9.

A worker of a play (a fresh process, ansible-core imported) either finds the compile the first worker
stored, or compiles. Measured per repeat, each step in a fresh process:

- ``before``: the key of issue 2's cache (task scope, catalog variables and groups, each made plain by a
  JSON round trip; no host variables), then ``pickle.load`` of the stored compile (collector paused);
- ``after``: ``compile_cache.compiled_policy`` as the action calls it: the key over every compile input
  (selected host variables of all hosts included), the directory checks, the HMAC check of the stored
  compile and the restricted unpickler;
- then, for both, the big host's and a small host's policy build and nftables render.

    python bench/bench_compile_cache.py [--repeats 7]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts, ms, setup_path

setup_path()


def worker(mode: str, workdir: Path) -> dict:
    """One simulated worker: get the compile (stored by a previous worker), build and render two hosts."""
    import gc
    import hashlib
    import pickle

    import ansible.plugins.action  # noqa: F401 - a worker has ansible-core imported
    import gen_catalog

    from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
    from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import catalog_vars
    from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import gc_paused
    from ansible_collections.portguard.hardening.plugins.plugin_utils import compile_cache

    data = json.loads((workdir / "catalog.json").read_text())
    task_vars = dict(data["variables"], groups=data["groups"], hostvars=data["hostvars"])
    small = next(h for h in data["groups"]["all"] if h != data["big_host"])
    scope = ["task-uuid", False]
    start = time.perf_counter()
    if mode == "before":
        def plain(value):
            return json.loads(json.dumps(value, default=str))
        groups = plain({name: list(members) for name, members in task_vars["groups"].items()})
        key_data = json.dumps([scope, plain(catalog_vars(task_vars)), groups], sort_keys=True)
        key = hashlib.sha256(key_data.encode()).hexdigest()
        with open(workdir / "before.pickle", "rb") as handle, gc_paused():
            policy = pickle.load(handle)  # noqa: S301 - the benchmark's own file
        assert key
    else:
        policy = compile_cache.compiled_policy(task_vars, scope, today=gen_catalog.TODAY)
    loaded = time.perf_counter()
    gc.freeze()
    render_nftables(policy.host(small))
    small_done = time.perf_counter()
    render_nftables(policy.host(data["big_host"]))
    big_done = time.perf_counter()
    return {"load": loaded - start, "small": small_done - start, "big": big_done - small_done + loaded - start}


def prepare(workdir: Path) -> None:
    import pickle

    import gen_catalog

    from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
    from ansible_collections.portguard.hardening.plugins.plugin_utils import compile_cache

    generated = gen_catalog.generate()
    gen_catalog.write(generated, workdir)
    data = json.loads((workdir / "catalog.json").read_text())
    policy = compile_catalog(data["variables"], data["groups"], data["hostvars"], today=gen_catalog.TODAY)
    (workdir / "before.pickle").write_bytes(pickle.dumps(policy))
    task_vars = dict(data["variables"], groups=data["groups"], hostvars=data["hostvars"])
    compile_cache.compiled_policy(task_vars, ["task-uuid", False], today=gen_catalog.TODAY)  # the first worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # internal: mode, workdir
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]))))
        return
    workdir = Path(tempfile.mkdtemp(prefix="pg-bench-cache-"))
    # a private runtime directory of this benchmark: the user's real cache is left alone
    runtime = workdir / "run"
    runtime.mkdir(mode=0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    prepare(workdir)
    print(machine_facts())
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runs = {"before": [], "after": []}
    for _repeat in range(args.repeats):
        for mode in runs:  # alternating, so that load changes hit both alike
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(workdir)], check=True,
                                 capture_output=True, text=True, env=dict(os.environ)).stdout
            runs[mode].append(json.loads(out))
    size = (workdir / "before.pickle").stat().st_size
    print(f"stored compile: {size / 1e6:.1f} MB; {args.repeats} repeats, fresh process each; best and median, wall")
    print(f"  {'':<44} {'before best':>12} {'median':>8} {'after best':>12} {'median':>8}")
    for key, label in (("load", "get the compile (key + checks + load)"),
                       ("small", "... + small host build + nftables"),
                       ("big", "... + big host build + nftables")):
        before = [r[key] for r in runs["before"]]
        after = [r[key] for r in runs["after"]]
        print(f"  {label:<44} {ms(min(before)):>12} {ms(statistics.median(before)):>8} "
              f"{ms(min(after)):>12} {ms(statistics.median(after)):>8}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
