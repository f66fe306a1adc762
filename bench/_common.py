"""Shared helpers of the benchmarks: import path, machine facts, timing."""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

# The repository's one collection-path setup lives with the test helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.paths import COLLECTIONS, ROOT, link_collection

__all__ = ["COLLECTIONS", "ROOT", "machine_facts", "ms", "percentile", "setup_path", "summary", "timed"]


def setup_path() -> None:
    """Make the repository importable as ``ansible_collections.portguard.hardening``, and bench/ too."""
    link_collection()
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))


def machine_facts() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"Python {platform.python_version()} ({platform.python_implementation()}), "
            f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu})")


def timed(func, *args, **kwargs):
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - start, result


def percentile(values, fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(values) -> str:
    return f"median {ms(statistics.median(values))}, min {ms(min(values))}, max {ms(max(values))}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"
