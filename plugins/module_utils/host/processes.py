"""Process identity on this host: a pid with its start time names one process, never a later one given its pid."""


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
