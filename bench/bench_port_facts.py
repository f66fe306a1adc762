#!/usr/bin/env python
"""Benchmark: gathering listening sockets with port_facts, ss and listen_ports_facts.

    sudo .venv/bin/python bench/bench_port_facts.py [--sizes 50,2000,10000] [--baseline-max 2000]

Runs in a fresh network namespace (``unshare --net``, so root), opens N listening
sockets (TCP and UDP, IPv4 and IPv6, a quarter each) held by one process, and
times, side by side:

- ``collect_listeners()`` in-process: the module's own work (median of several runs);
- ``port_facts`` run as a module (``python port_facts.py args.json``: interpreter
  start and ansible imports included, as Ansible pays them on a host);
- ``ss -Htlnup`` as a subprocess;
- ``community.general.listen_ports_facts`` run as a module the same way (it runs
  ``ss`` once, then ``ps`` twice per socket), up to ``--baseline-max`` sockets.

community.general ships in the ``ansible`` package on PyPI, pinned in
requirements-dev.txt (``scripts/setup.sh`` installs it into .venv). Elsewhere:
``pip install ansible==12.3.0``, or point ``--community-general`` at an
``ansible_collections/community/general`` folder (e.g. extracted from that wheel).
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import _common

_common.setup_path()

from ansible_collections.portguard.hardening.plugins.module_utils.host.listeners import (  # noqa: E402
    collect_listeners,
)

MODULE = _common.ROOT / "plugins" / "modules" / "port_facts.py"
KINDS = [
    (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
    (socket.AF_INET6, socket.SOCK_STREAM, "::1"),
    (socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
    (socket.AF_INET6, socket.SOCK_DGRAM, "::1"),
]
FIRST_PORT = 10000


def find_listen_ports_facts(explicit):
    if explicit:
        path = os.path.join(explicit, "plugins", "modules", "listen_ports_facts.py")
        return path if os.path.exists(path) else None
    spec = importlib.util.find_spec("ansible_collections.community.general")
    if spec is None:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "plugins", "modules", "listen_ports_facts.py")
        if os.path.exists(path):
            return path
    return None


def open_sockets(count):
    held = []
    for index in range(count):
        family, kind, address = KINDS[index % len(KINDS)]
        sock = socket.socket(family, kind)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, FIRST_PORT + index))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        held.append(sock)
    return held


def run_module(path, args, env=None):
    """Run an Ansible module file directly, as AnsiballZ would: ``(seconds, result)``."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump({"ANSIBLE_MODULE_ARGS": args}, handle)
        handle.flush()
        # -P: the module's own folder must not shadow the standard library
        # (community.general has plugins/modules/pkgutil.py).
        seconds, proc = _common.timed(subprocess.run, [sys.executable, "-P", path, handle.name],
                                      capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{path} failed: {proc.stdout}{proc.stderr}")
    return seconds, json.loads(proc.stdout)


def cpu_seconds():
    """CPU time of this process and of its waited-for children: robust on a busy machine."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def median_of(repeats, func):
    """``((median wall seconds, median CPU seconds), last result)``."""
    walls, cpus = [], []
    result = None
    for _run in range(repeats):
        cpu = cpu_seconds()
        seconds, result = _common.timed(func)
        cpus.append(cpu_seconds() - cpu)
        walls.append(seconds)
    return (statistics.median(walls), statistics.median(cpus)), result


def measure(count, lpf_path, baseline_max, repeats):
    held = open_sockets(count)
    row = {"sockets": count}
    try:
        row["ours"], found = median_of(repeats, collect_listeners)
        assert len(found) == count, (len(found), count)
        assert all(item["pid"] == os.getpid() for item in found)
        row["ours_proc"], found = median_of(repeats, lambda: collect_listeners(source="proc"))
        assert len(found) == count
        env = {**os.environ, "PYTHONPATH": str(_common.COLLECTIONS)}
        module_runs = max(3, repeats // 3)
        row["ours_module"], result = median_of(module_runs, lambda: run_module(str(MODULE), {}, env)[1])
        assert len(result["ansible_facts"]["portguard_listeners"]) == count
        row["ss"], _out = median_of(repeats, lambda: subprocess.run(
            ["ss", "-Htlnup"], check=True, capture_output=True))
        if lpf_path and count <= baseline_max:
            runs = 3 if count <= 100 else 1
            row["lpf"], result = median_of(runs, lambda: run_module(lpf_path, {"command": "ss"})[1])
            facts = result["ansible_facts"]
            assert len(facts["tcp_listen"]) + len(facts["udp_listen"]) == count
    finally:
        for sock in held:
            sock.close()
    return row


def cell(row, key, which):
    return _common.ms(row[key][which]) if key in row else "-"


def ratio(row, slow, fast, which):
    return f"{row[slow][which] / row[fast][which]:.1f}x" if slow in row and fast in row else "-"


def print_table(rows, which, title):
    header = ("sockets", "port_facts in-process", "(/proc source)", "port_facts module run", "ss -Htlnup",
              "listen_ports_facts", "lpf / module run", "ss / in-process")
    lines = [header]
    for row in rows:
        lines.append((str(row["sockets"]),
                      *(cell(row, key, which) for key in ("ours", "ours_proc", "ours_module", "ss", "lpf")),
                      ratio(row, "lpf", "ours_module", which), ratio(row, "ss", "ours", which)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\n{title}")
    lines.insert(1, tuple("-" * (width - 1) + ":" for width in widths))
    for line in lines:
        print("| " + " | ".join(text.rjust(width) for text, width in zip(line, widths)) + " |")


def inner(args):
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lpf_path = find_listen_ports_facts(args.community_general)
    print(_common.machine_facts())
    print(f"ss: {subprocess.run(['ss', '-V'], check=True, capture_output=True, text=True).stdout.strip()}")
    if lpf_path is None:
        print("community.general not found: listen_ports_facts column skipped "
              "(pip install ansible==12.3.0, or --community-general PATH)")
    rows = []
    for count in args.sizes:
        if count + 200 > hard:
            print(f"skipping {count} sockets: RLIMIT_NOFILE hard limit is {hard}")
            continue
        rows.append(measure(count, lpf_path, args.baseline_max, args.repeats))
    print_table(rows, 0, "Wall clock (median)")
    print_table(rows, 1, "CPU time, user + system, the process and its children (median)")
    print(f"load average after the run: {os.getloadavg()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="50,2000,10000",
                        type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--baseline-max", type=int, default=2000,
                        help="largest socket count to run listen_ports_facts at (it runs ps twice per socket)")
    parser.add_argument("--repeats", type=int, default=15, help="runs per in-process and ss measurement")
    parser.add_argument("--community-general", help="path of an ansible_collections/community/general folder")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    if os.geteuid() != 0 or not shutil.which("unshare"):
        sys.exit("needs root and unshare(1): the sockets are opened in a fresh network namespace")
    started = time.monotonic()
    code = subprocess.run(["unshare", "--net", sys.executable, __file__, "--inner", *sys.argv[1:]],
                          check=False).returncode
    print(f"total {time.monotonic() - started:.0f} s")
    sys.exit(code)


if __name__ == "__main__":
    main()
