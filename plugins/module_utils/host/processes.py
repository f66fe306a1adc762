"""Process identity on this host: a pid with its start time names one process, never a later one given its pid."""

import os


def start_time(pid):
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); None when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields 3 (state) and 22 (start time); a zombie has exited already, whoever reaps it.
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def is_ours(pid, start, marker) -> bool:
    """Whether ``pid`` is still the process we recorded: same start time, our user, ``marker`` among its arguments.

    A pid alone may name a stranger that got it after ours ended: nothing is signalled on a pid alone.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 2 or not isinstance(start, str) or not start:
        return False
    if start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
        owner = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return owner == os.geteuid() and str(marker).encode() in argv
