"""port_probe's bound on one call: a sweep too large is refused at once, in little memory, before any packet.

The module runs as on a host (its file executed with the arguments in a JSON
file), in a child whose peak RSS is read with ``getrusage``; the child's
address space is capped, so a regression fails with MemoryError instead of
taking the machine down.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import MAX_TARGETS
from ansible_collections.portguard.hardening.plugins.modules.port_probe import build_targets

ROOT = Path(__file__).resolve().parents[4]
COLLECTIONS = ROOT / ".build" / "collections"
MODULE = ROOT / "plugins" / "modules" / "port_probe.py"
# The child's peak RSS and wall time, read by a small parent of its own (this process has had other children).
MEASURE = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    started = time.monotonic()
    result = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=cap, timeout=120)
    print(json.dumps({"stdout": result.stdout, "stderr": result.stderr[-2000:], "rc": result.returncode,
                      "elapsed": time.monotonic() - started,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
""")


def params(**changes):
    base = {"targets": [], "ports": [], "sweep_addresses": [], "source": None}
    return {**base, **changes}


def test_a_sweep_of_every_port_of_256_addresses_fails_fast_in_little_memory(tmp_path):
    addresses = [f"198.18.{index // 256}.{index % 256}" for index in range(256)]
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {
        "targets": [{"address": "198.18.1.1", "port": 22}], "sweep_addresses": addresses, "ports": ["1-65535"]}}))
    measured = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, str(MODULE), str(args)],
                              capture_output=True, text=True, env={"PYTHONPATH": str(COLLECTIONS)},
                              timeout=180, check=True)
    run = json.loads(measured.stdout)
    output = json.loads(run["stdout"]) if run["stdout"].strip().startswith("{") else {}
    assert output.get("failed"), run
    assert output["msg"] == (f"cannot probe: 16776961 targets (1 targets + 256 sweep_addresses x 65535 ports) "
                             f"is more than the {MAX_TARGETS} one call may probe: split them over several tasks")
    assert run["maxrss_mb"] < 200, f"peak RSS {run['maxrss_mb']:.0f} MB"
    assert run["elapsed"] < 10, f"took {run['elapsed']:.1f} s"


def test_a_full_sweep_of_one_host_in_both_families_fits():
    """The documented sweep (every TCP port of one IPv4 and one IPv6 address) is within the bound, and lazy."""
    targets = build_targets(params(sweep_addresses=["172.30.89.31", "fd89:7067::31"], ports=["1-65535"]))
    assert not isinstance(targets, list)
    assert sum(1 for _target in targets) == 2 * 65535 <= MAX_TARGETS


def test_the_sweep_follows_the_targets_in_order():
    targets = build_targets(params(targets=[{"address": "10.0.0.1", "port": 5, "proto": "udp", "source": None}],
                                   sweep_addresses=["10.0.0.2"], ports=["7-8", "1"]))
    assert list(targets) == [("10.0.0.1", 5, "udp", None), ("10.0.0.2", 7, "tcp", None), ("10.0.0.2", 8, "tcp", None),
                             ("10.0.0.2", 1, "tcp", None)]
