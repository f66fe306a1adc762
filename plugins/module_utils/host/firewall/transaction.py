"""Host side of ``portguard.hardening.firewall``: apply, arm the revert, confirm, revert, status.

The module is a thin shell around ``Host``; the action plugin drives the phases:

``inspect``  what the host has (detect.py: backends, systemd, legacy rules, connection);
``apply``    validate, compare with the live table/chains, and when they
             differ arm a revert, then apply in one transaction;
``confirm``  (over a fresh connection) disarm the revert, then persist what apply recorded (persist.py);
``status``   what happened to an apply (confirmed, pending, reverted).

The revert is a detached process started by ``apply``: it sleeps for the
rollback timeout and, unless ``confirm`` removed the pending record first,
restores the previous ruleset (or removes ours) and records why.
"""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    IPT_JUMPS,
    LOADER_PATH,
    NFT_TABLE_REF,
    PERSIST_DIR,
    PERSIST_EVIDENCE,
    STATE_DIR,
    UNIT_PATH,
)
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall import persist as persistence
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import live_lines
from ansible_collections.portguard.hardening.plugins.module_utils.host.processes import is_ours, start_time
from ansible_collections.portguard.hardening.plugins.module_utils.host.run import HostError, run_steps, write_atomic

# A record past its deadline by this much, whose revert process still has not acted, is stale.
STALE_GRACE = 30
# Tokens of confirmed changes remembered for a repeated confirm (a lost reply, then a retry).
CONFIRMED_KEPT = 20


class Host:
    """One host's firewall state machine; every phase takes the state lock."""

    def __init__(self, state_dir=STATE_DIR, persist_dir=PERSIST_DIR, unit_path=UNIT_PATH, loader_path=LOADER_PATH):
        self.state_dir = state_dir
        self.persist_dir = persist_dir
        self.unit_path = unit_path
        self.loader_path = loader_path
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    # locking ------------------------------------------------------------
    def _locked(self):
        handle = open(os.path.join(self.state_dir, "lock"), "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def _pending(self):
        try:
            with open(os.path.join(self.state_dir, "pending.json")) as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def _wait_for_pending(self, wait_seconds, check_mode=False):
        """Serialize runs: wait while another apply awaits its confirmation (or revert).

        Returns the lock, and whether a stale unconfirmed change was found: its revert process is gone
        (or is another process that got its pid), or has not acted STALE_GRACE seconds past its deadline.
        A real run reverts it; check mode writes nothing (the next real run reverts it).
        """
        deadline = time.time() + wait_seconds
        while True:
            lock = self._locked()
            pending = self._pending()
            if pending is None:
                return lock, False
            if not _revert_alive(pending) or time.time() > pending.get("deadline", 0) + STALE_GRACE:
                if not check_mode:
                    _terminate(pending)
                    run_steps(pending["restore"])
                    os.unlink(os.path.join(self.state_dir, "pending.json"))
                return lock, True
            lock.close()
            if time.time() > deadline:
                raise HostError("another portguard run on this host is waiting for its confirmation; try again later")
            time.sleep(0.3)

    # phases -------------------------------------------------------------
    def apply(self, backend, ruleset, *, check_mode, arm, timeout, state="present", persist=None):
        """Validate, diff, and apply when different; returns the result dict.

        ``persist`` (the keyword arguments of Host.persist but check_mode, or None) persists under the
        lock when nothing awaits a confirmation (no change, check mode, or no revert armed); otherwise
        it is recorded in the state dir, and confirm persists it: the ruleset crosses the network once.
        """
        if state == "present":
            backend.validate(ruleset)
        lock, stale = self._wait_for_pending(timeout + 15, check_mode)
        try:
            live = backend.live()
            before, after = backend.compare(ruleset) if state == "present" else (live_lines(live), [])
            changed = before != after
            missing = self._missing(backend, live, state)
            result = {
                # reverting a stale unconfirmed change is a change even when the catalog's rules follow
                "changed": changed or stale,
                "backend": backend.name,
                "diff": {"before": "\n".join(before) + "\n" if before else "",
                         "after": "\n".join(after) + "\n" if after else "",
                         "before_header": f"live {backend.name} "
                                          f"({'ours' if live else 'missing' if missing else 'absent'})",
                         "after_header": f"rendered {backend.name}"},
                "token": None,
            }
            if missing:
                result["table_missing"] = missing + (": a real run restores it" if check_mode else ": restored")
            if stale:
                result["stale_change"] = ("an unconfirmed change whose revert process had died or missed its "
                                          "deadline was " + ("found; a real run reverts it" if check_mode else "reverted"))
            if not changed or check_mode:
                return self._persisted(result, persist, check_mode)
            restore = backend.restore_steps(live)
            steps = backend.apply_steps(ruleset) if state == "present" else backend.restore_steps(None)
            token = uuid.uuid4().hex
            if arm:
                persistence.record_request(self.state_dir, token, persist)
                self._arm(token, restore, timeout)
                result["token"] = token
            try:
                run_steps(steps)
            except HostError:
                run_steps(restore)
                if arm:
                    os.unlink(os.path.join(self.state_dir, "pending.json"))
                raise
            # Replacing the table resets its counters: the activity report says since when they count.
            # The token also tells confirm which change is the latest, the only one it persists.
            write_atomic(os.path.join(self.state_dir, "applied.json"),
                         json.dumps({"at": time.time(), "token": token, "state": state}), mode=0o644)
            return result if arm else self._persisted(result, persist, check_mode)
        finally:
            lock.close()

    def _missing(self, backend, live, state):
        """Why our table or chains are gone although a confirmed ruleset is persisted (None when not so).

        The persisted files are the evidence: a change that was reverted, never confirmed, was never persisted.
        """
        if state != "present" or live is not None or not any(
                os.path.exists(os.path.join(self.persist_dir, name)) for name in PERSIST_EVIDENCE):
            return None
        what = f"table {NFT_TABLE_REF}" if backend.name == "nftables" else "our chains " + "/".join(IPT_JUMPS)
        return (f"{what} is missing from the live ruleset although portguard applied it: something flushed it "
                "(a 'flush ruleset' in /etc/nftables.conf, netfilter-persistent, firewalld, ufw or a manual flush)")

    def _persisted(self, result, persist, check_mode):
        if persist is None:
            return result
        result.update(self._persist_reported(persist, check_mode))
        result["changed"] = result["changed"] or result.get("persistence", {}).get("changed", False)
        return result

    def _persist_reported(self, persist, check_mode=False) -> dict:
        """Persist, and report a failure as what it is: the live rules stand, only the boot files failed."""
        try:
            return {"persistence": self.persist(**persist, check_mode=check_mode)}
        except (HostError, OSError) as exc:
            return {"persistence_error": str(exc)}

    def _arm(self, token, restore, timeout):
        for name in ("reverted.json",):
            path = os.path.join(self.state_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        deadline = time.time() + timeout
        proc = subprocess.Popen(
            [sys.executable, "-c", REVERT_SCRIPT, self.state_dir, token, repr(deadline)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        try:
            record = {"token": token, "pid": proc.pid, "start": start_time(proc.pid), "deadline": deadline,
                      "timeout": timeout, "restore": restore}
            write_atomic(os.path.join(self.state_dir, "pending.json"), json.dumps(record))
        except BaseException:
            proc.kill()
            raise
        # Only now may the revert process watch the record: it is on disk, with its identity.
        try:
            proc.stdin.write(b"1")
            proc.stdin.close()
        except BrokenPipeError as exc:
            os.unlink(os.path.join(self.state_dir, "pending.json"))
            raise HostError("the revert process died before it was armed; nothing was applied") from exc

    def confirm(self, token, persist=False):
        """Disarm the revert of ``token`` and, with ``persist``, when it is the latest applied change, persist
        under the lock what its apply recorded.

        A repeated confirm of a confirmed token (its reply was lost) answers "confirmed" again.
        """
        lock = self._locked()
        try:
            pending = self._pending()
            confirmed = self._read_json("confirmed.json").get("tokens", [])
            if pending is not None and pending.get("token") == token:
                os.unlink(os.path.join(self.state_dir, "pending.json"))
                _terminate(pending)
                write_atomic(os.path.join(self.state_dir, "confirmed.json"),
                             json.dumps({"tokens": [*confirmed, token][-CONFIRMED_KEPT:]}))
                result = {"state": "confirmed"}
            elif token in confirmed:
                result = {"state": "confirmed", "repeated": True}
            else:
                reverted = self.status(token)
                if reverted.get("state") == "reverted":
                    raise HostError(f"too late to confirm: the host already reverted ({reverted['reason']})")
                raise HostError("nothing to confirm: no pending change with this token")
            if persist:
                request = None
                if self._read_json("applied.json").get("token") != token:
                    result["persistence"] = {"changed": False,
                                             "skipped": "a later change was applied since; its confirm persists it"}
                elif (request := persistence.recorded_request(self.state_dir, token)) is None:
                    result["persistence_error"] = "its apply recorded nothing to persist (it ran with persist: false)"
                else:
                    result.update(self._persist_reported(request))
            return result
        finally:
            lock.close()

    def _read_json(self, name) -> dict:
        try:
            with open(os.path.join(self.state_dir, name)) as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}

    def status(self, token):
        pending = self._pending()
        if pending and pending.get("token") == token:
            return {"state": "pending", "deadline": pending["deadline"]}
        if token in self._read_json("confirmed.json").get("tokens", []):
            return {"state": "confirmed"}
        record = self._read_json("reverted.json")
        if record.get("token") == token:
            return {"state": "reverted", "reason": record.get("reason"), "errors": record.get("errors", [])}
        return {"state": "unknown"}

    def persist(self, backend, ruleset, fallback, *, check_mode, systemd, state="present"):
        """Write our files atomically, and the boot unit where systemd runs (persist.persist)."""
        return persistence.persist(self, backend, ruleset, fallback, check_mode=check_mode, systemd=systemd,
                                   state=state)


# The revert process. It waits for apply's go (a byte on stdin), sent only once the pending record with
# this process's identity is on disk: EOF instead means apply died before arming, and nothing was applied.
# It then exits early only when the record is gone (confirmed) or carries another token, and at the
# deadline restores, under the lock, unless confirm removed the record first.
REVERT_SCRIPT = r"""
import fcntl, json, os, subprocess, sys, time
state_dir, token, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3])
path = os.path.join(state_dir, "pending.json")
if sys.stdin.read(1) != "1":
    sys.exit(0)


def record():
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


seen = None
while time.time() < deadline:
    time.sleep(min(0.2, max(0.0, deadline - time.time())))
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        sys.exit(0)
    if (stat.st_ino, stat.st_mtime_ns) != seen:  # parse a (possibly large) record only when it was replaced
        seen = (stat.st_ino, stat.st_mtime_ns)
        if (record() or {}).get("token") != token:
            sys.exit(0)
with open(os.path.join(state_dir, "lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    pending = record()
    if pending is None or pending.get("token") != token:
        sys.exit(0)
    errors = []
    for argv, data in pending["restore"]:
        proc = subprocess.run(argv, input=data, capture_output=True, text=True)
        if proc.returncode:
            errors.append(proc.stderr.strip())
    result = {"token": token, "at": time.time(), "errors": errors,
              "reason": "not confirmed within %s s" % pending.get("timeout")}
    with open(os.path.join(state_dir, "reverted.json.tmp"), "w") as handle:
        json.dump(result, handle)
    os.replace(os.path.join(state_dir, "reverted.json.tmp"), os.path.join(state_dir, "reverted.json"))
    os.unlink(path)
"""


def _revert_alive(record) -> bool:
    """The revert process of ``record`` runs: same pid, same start time, its token on its command line."""
    return is_ours(record.get("pid"), record.get("start"), record.get("token"))


def _terminate(record):
    """SIGTERM the record's revert process, never a stranger that got its pid."""
    if _revert_alive(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record["pid"], signal.SIGTERM)
