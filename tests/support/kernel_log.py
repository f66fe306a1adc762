"""The machine-wide switch that makes the kernel log the log rules of every network namespace."""

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

NF_LOG_ALL_NETNS = Path("/proc/sys/net/netfilter/nf_log_all_netns")
LOCK = Path(tempfile.gettempdir()) / "portguard-nf-log-all-netns.lock"


@contextlib.contextmanager
def namespaces_log():
    """The machine logs the log rules of every network namespace while the block runs; restored after.

    The sysctl belongs to the machine: the tests that set it serialize on one lock file, so that one's
    restore never cuts another's log. The lock is opened without following a link and without truncating:
    another local user may have planted either in the shared temporary directory.
    """
    fd = os.open(LOCK, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        before = NF_LOG_ALL_NETNS.read_text().strip()
        NF_LOG_ALL_NETNS.write_text("1\n")
        try:
            yield
        finally:
            NF_LOG_ALL_NETNS.write_text(before + "\n")
    finally:
        os.close(fd)
