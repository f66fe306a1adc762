"""The controller's compile cache never loads what another local user planted (issue 9, item 2).

Real ``ansible-playbook`` runs as root of a play whose action (port_audit with given listeners)
compiles the catalog in every worker without contacting a host. Another user (``nobody``) plants
directories where the cache lives or lived, and keeps replacing every stored compile there with a
pickle whose ``__reduce__`` creates a marker file as whoever loads it: the marker must never
appear. ``TMPDIR`` and ``XDG_RUNTIME_DIR`` point into the test's own directory, so nothing outside
it is touched. Needs root (to act as ``nobody``); skips locally without it, fails under CI=true.
"""

import json
import os
import pickle
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from support.ansible import ansible_env
from support.requirements import need

pytestmark = [pytest.mark.integration]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CATALOG = ROOT / "tests" / "integration" / "firewall" / "files" / "catalog.yml"
HOSTS = ("pgcache-a", "pgcache-b", "pgcache-c")


class Payload:
    """Runs ``touch <marker>`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def nobody():
    need(os.geteuid() == 0, "root (to plant files as nobody)")
    return pwd.getpwnam("nobody")


@pytest.fixture
def base():
    """A directory that nobody can traverse (pytest's own are private), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pgcache-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def play(base):
    """Run the play with TMPDIR and XDG_RUNTIME_DIR inside ``base``; returns (rc, result per host, text)."""
    tmpdir, runtime = base / "tmp", base / "run"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)  # like /tmp: anyone may create an entry
    runtime.mkdir(mode=0o700)
    inventory = base / "hosts.yml"
    variables = yaml.safe_load(CATALOG.read_text())
    hosts = {name: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable} for name in HOSTS}
    inventory.write_text(json.dumps({"all": {"vars": variables, "hosts": hosts}}))
    env = ansible_env(base, TMPDIR=str(tmpdir), XDG_RUNTIME_DIR=str(runtime),
                      ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")

    def run():
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                str(HERE / "files" / "audit_serial.yml"), "-e", f"pgit_report_dir={base / 'reports'}"]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=base, timeout=300, check=False)
        data = json.loads(proc.stdout)
        results = {}
        for batch in data["plays"]:  # with serial, one entry per batch
            for task in batch["tasks"]:
                results.update(task["hosts"])
        return proc.returncode, results, proc.stdout + proc.stderr

    run.tmpdir, run.runtime = tmpdir, runtime
    return run


def _as(user, function, *args):
    """Run ``function(*args)`` in a child process with ``user``'s uid and gid; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            function(*args)
        finally:
            os._exit(0)
    return pid


def _poison(directory, payload):
    """Keep every stored compile in ``directory`` replaced by ``payload`` (the other user's side)."""
    tmp = os.path.join(directory, ".swap")
    while True:
        for entry in os.listdir(directory):
            path = os.path.join(directory, entry)
            if entry.endswith((".pickle", ".policy")) and os.lstat(path).st_uid != os.getuid():
                Path(tmp).write_bytes(payload)
                os.replace(tmp, path)
        time.sleep(0.002)


def _plant(user, path, payload, mode=0o777):
    """A directory of ``user`` holding ``payload`` under names a stored compile could have (made as root and
    given away with chown, as for a place that user cannot reach by itself)."""
    os.mkdir(path)
    for name in ("planted.pickle", "planted.policy"):
        (Path(path) / name).write_bytes(payload)
        os.chown(Path(path) / name, user.pw_uid, user.pw_gid)
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)


def test_planted_old_cache_directory_is_never_loaded(nobody, play, base):
    """The old place (<tmp>/portguard-cache-<uid>) created first by nobody, who replaces each stored compile
    with a pickle that runs code: the play works, and nothing nobody wrote is ever loaded."""
    marker = base / "executed"
    old = play.tmpdir / f"portguard-cache-{os.geteuid()}"
    payload = pickle.dumps(Payload(marker))
    _plant(nobody, old, payload)
    attacker = _as(nobody, _poison, str(old), payload)
    try:
        rc, results, text = play()
    finally:
        os.kill(attacker, signal.SIGKILL)
        os.waitpid(attacker, 0)
    assert not marker.exists(), "a pickle planted by another user was loaded (and ran) as root"
    assert rc == 0, text[-3000:]
    assert set(results) == set(HOSTS) and not any(r.get("failed") for r in results.values())
    assert [p.name for p in old.iterdir() if p.stat().st_uid != nobody.pw_uid] == [], "the cache used the old place"
    stored = play.runtime / "portguard"
    assert stored.stat().st_uid == 0 and stored.stat().st_mode & 0o777 == 0o700
    assert list(stored.glob("*.policy"))


@pytest.mark.parametrize("planted", ["foreign-owner", "group-writable", "symlink"])
def test_foreign_cache_directory_is_refused(nobody, play, base, planted):
    """The new place made by someone else, open to others, or a symlink: every host's task fails with a clear
    message naming it, and nothing in it is loaded."""
    marker = base / "executed"
    target = play.runtime / "portguard"
    payload = pickle.dumps(Payload(marker))
    elsewhere = play.tmpdir / "elsewhere"
    if planted == "foreign-owner":
        _plant(nobody, target, payload, mode=0o700)
    elif planted == "group-writable":
        _plant(nobody, target, payload, mode=0o770)
        os.chown(target, 0, nobody.pw_gid)
    else:
        _plant(nobody, elsewhere, payload)
        target.symlink_to(elsewhere)
    attacker = _as(nobody, _poison, str(elsewhere), payload) if planted == "symlink" else None
    try:
        rc, results, text = play()
    finally:
        if attacker:
            os.kill(attacker, signal.SIGKILL)
            os.waitpid(attacker, 0)
    assert not marker.exists(), "a pickle planted by another user was loaded (and ran) as root"
    assert rc != 0
    for host in HOSTS[:1]:  # the first batch fails, and with it the play
        assert results[host].get("failed"), text[-2000:]
        assert f"portguard compile cache {target} refused" in results[host]["msg"], results[host]["msg"]
