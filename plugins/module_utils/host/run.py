"""What every host-side file shares: one way to run a command, one error, atomic file writes."""

import os
import subprocess
import tempfile

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError


class HostError(PortguardError):
    """A host-side step failed; nothing was left half-applied."""


def run(argv, data=None, check=True):
    # Foreign rules may hold any bytes: a strict decode would crash on them. Ours are validated text.
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, errors="replace", check=False)
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def run_steps(steps):
    """Run ``[argv, stdin data]`` steps in order (a backend's apply or restore steps); the first failure raises."""
    for argv, data in steps:
        run(argv, data)


def read_text(path):
    """The file's text, or None when it does not exist."""
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write_atomic(path, text, mode=0o600):
    """Replace ``path`` by ``text`` in one rename, synced first: a reader sees the old file or the new one."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".portguard-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
