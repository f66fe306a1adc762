"""How many probes may be in flight: the CPUs, and the sockets the process may open."""

import os
import resource

# File descriptors left to the rest of the process (Ansible's module glue, stdio) when sizing a run.
FD_RESERVE = 64
# Default concurrency: attempts in flight per CPU, and at most. See default_concurrency().
PER_CPU = 8192
MAX_CONCURRENCY = 16384


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_concurrency() -> int:
    """In-flight attempts: enough to sweep every port under drop, no more than the CPU and fd limit serve.

    PER_CPU attempts per CPU, at most MAX_CONCURRENCY, and no more sockets than
    the hard open-file limit lets the process open (the run raises its soft
    limit that far when it needs to).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    room = MAX_CONCURRENCY if hard == resource.RLIM_INFINITY else hard - FD_RESERVE
    return max(16, min(PER_CPU * _cpus(), MAX_CONCURRENCY, room))


class FileLimit:
    """Room for ``wanted`` more sockets: the soft open-file limit raised (up to the hard one) for the run."""

    def __init__(self, wanted):
        self.wanted = wanted
        self.saved = None
        self.room = 1

    def __enter__(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = FD_RESERVE
        needed = self.wanted + in_use + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < needed:
            raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                self.saved, soft = (soft, hard), raised
            except (ValueError, OSError):
                pass  # keep the limit we have; the run is clamped to it
        self.room = self.wanted if soft == resource.RLIM_INFINITY else max(1, soft - in_use - FD_RESERVE)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, self.saved)
            except (ValueError, OSError):
                pass
