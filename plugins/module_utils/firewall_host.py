"""Host side of ``portguard.hardening.firewall``: validate, diff, apply, revert, persist.

Plain Python over the ``nft`` / ``iptables`` command line tools. The module
is a thin shell around ``Host``; the action plugin drives the phases:

``inspect``  what the host has (backends, systemd, legacy rules, connection);
``apply``    validate, compare with the live table/chains, and when they
             differ arm a revert, then apply in one transaction;
``confirm``  (over a fresh connection) disarm the revert, then persist;
``status``   what happened to an apply (confirmed, pending, reverted).

The revert is a detached process started by ``apply``: it sleeps for the
rollback timeout and, unless ``confirm`` removed the pending record first,
restores the previous ruleset (or removes ours) and records why.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from ansible_collections.portguard.hardening.plugins.module_utils.errors import PortguardError

TABLE = "portguard"
CHAINS = ("PORTGUARD-IN", "PORTGUARD-OUT")
BUILTIN = {"PORTGUARD-IN": "INPUT", "PORTGUARD-OUT": "OUTPUT"}
STATE_DIR = "/run/portguard"
PERSIST_DIR = "/etc/portguard"
UNIT_PATH = "/etc/systemd/system/portguard.service"
LOADER_PATH = "/usr/local/sbin/portguard-load"

_COUNTER_RE = re.compile(r"\s*counter packets \d+ bytes \d+")
_ELEMENTS_RE = re.compile(r"elements = \{(.*?)\}", re.S)


class HostError(PortguardError):
    """A host-side step failed; nothing was left half-applied."""


def run(argv, data=None, check=True):
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def normalize_nft(text: str | None) -> list[str]:
    """A table listing (or a rendered ruleset) as comparable lines: no counter values, elements sorted."""
    if not text:
        return []
    body = text
    start = body.find(f"table inet {TABLE} {{")
    if start >= 0:
        body = body[start:]

    def elements(match):
        items = [item.strip() for item in re.split(r",\s*\n", match.group(1)) if item.strip()]
        return "\n" + "\n".join(f"element {item}" for item in sorted(items)) + "\n"

    body = _COUNTER_RE.sub(" counter", body)
    body = _ELEMENTS_RE.sub(elements, body)
    lines = []
    for line in body.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.fullmatch(r"packets \d+ bytes \d+", line):
            continue
        lines.append(line)
    return lines


def normalize_iptables(save_output: str) -> list[str]:
    """Our chains (declarations, jumps to them, their rules in order) from ``iptables-save`` or a payload."""
    declared, jumps, rules = set(), set(), {chain: [] for chain in CHAINS}
    for line in save_output.splitlines():
        line = line.strip()
        for chain, builtin in BUILTIN.items():
            if line.startswith(f":{chain} "):
                declared.add(f":{chain}")
            elif line == f"-A {builtin} -j {chain}":
                jumps.add(line)
            elif line.startswith(f"-A {chain} "):
                rules[chain].append(line)
    return [*sorted(declared), *sorted(jumps), *(line for chain in CHAINS for line in rules[chain])]


class NftablesBackend:
    name = "nftables"

    def live(self) -> str | None:
        proc = run(["nft", "list", "table", "inet", TABLE], check=False)
        if proc.returncode != 0:
            if "No such file" in proc.stderr or "does not exist" in proc.stderr:
                return None
            raise HostError(f"nft list table inet {TABLE} failed: {proc.stderr.strip()}")
        return proc.stdout

    def compare(self, ruleset) -> tuple[list[str], list[str]]:
        return normalize_nft(self.live()), normalize_nft(ruleset)

    def validate(self, ruleset):
        with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as handle:
            handle.write(ruleset)
        try:
            proc = run(["nft", "-c", "-f", handle.name], check=False)
        finally:
            os.unlink(handle.name)
        if proc.returncode != 0:
            raise HostError(f"nft -c rejected the ruleset, nothing was changed: {proc.stderr.strip()}")

    def apply_steps(self, ruleset) -> list:
        return [[["nft", "-f", "-"], ruleset]]

    def restore_steps(self, snapshot) -> list:
        if snapshot is None:
            return [[["nft", "delete", "table", "inet", TABLE], None]]
        return [[["nft", "-f", "-"], f"table inet {TABLE}\ndelete table inet {TABLE}\n{snapshot}"]]

    def persist_files(self, ruleset, fallback) -> dict:
        return {"ruleset.nft": ruleset, "fallback.nft": fallback}

    def loader(self) -> str:
        return (
            "#!/bin/sh\n"
            "# portguard.hardening boot loader: the persisted ruleset, or the management-only fallback.\n"
            f"if nft -f {PERSIST_DIR}/ruleset.nft; then exit 0; fi\n"
            "echo 'portguard: persisted ruleset failed to load, loading the management-only fallback' >&2\n"
            f"nft -f {PERSIST_DIR}/fallback.nft\n"
        )


class IptablesBackend:
    name = "iptables"
    families = (("iptables", "ipv4"), ("ip6tables", "ipv6"))

    def _save(self, tool) -> str:
        return run([f"{tool}-save", "-t", "filter"]).stdout

    def live(self) -> dict | None:
        result = {}
        for tool, family in self.families:
            result[family] = self._save(tool)
        if not any(normalize_iptables(text) for text in result.values()):
            return None
        return result

    def compare(self, ruleset) -> tuple[list[str], list[str]]:
        live = self.live() or {}
        jumps = "".join(f"-A {builtin} -j {chain}\n" for builtin, chain in ruleset["jumps"])
        before, after = [], []
        for _, family in self.families:
            before += [f"{family} {line}" for line in normalize_iptables(live.get(family, ""))]
            after += [f"{family} {line}" for line in normalize_iptables(ruleset[family] + jumps)]
        return before, after

    def validate(self, ruleset):
        for tool, family in self.families:
            proc = run([f"{tool}-restore", "--test", "--noflush"], ruleset[family], check=False)
            if proc.returncode != 0:
                raise HostError(f"{tool}-restore --test rejected the {family} rules, nothing was changed: "
                                f"{proc.stderr.strip()}")

    def apply_steps(self, ruleset) -> list:
        steps = []
        for tool, family in self.families:
            steps.append([[f"{tool}-restore", "--noflush"], ruleset[family]])
            for builtin, chain in ruleset["jumps"]:
                steps.append([["sh", "-c", f"{tool} -C {builtin} -j {chain} 2>/dev/null || "
                                           f"{tool} -I {builtin} 1 -j {chain}"], None])
        return steps

    def restore_steps(self, snapshot) -> list:
        steps = []
        for tool, family in self.families:
            for chain, builtin in BUILTIN.items():
                steps.append([["sh", "-c", f"while {tool} -D {builtin} -j {chain} 2>/dev/null; do :; done; "
                                           f"{tool} -F {chain} 2>/dev/null; {tool} -X {chain} 2>/dev/null; true"], None])
            if snapshot is not None:
                ours = normalize_iptables(snapshot[family])
                chains = [line for line in ours if line.startswith(":")]
                rules = [line for line in ours if line.startswith("-A PORTGUARD")]
                jumps = [line for line in ours if line.startswith("-A ") and not line.startswith("-A PORTGUARD")]
                payload = "\n".join(["*filter", *[f"{c} - [0:0]" for c in chains], *rules, "COMMIT"]) + "\n"
                steps.append([[f"{tool}-restore", "--noflush"], payload])
                for jump in jumps:
                    _, builtin, _, chain = jump.split(" ")
                    steps.append([[tool, "-I", builtin, "1", "-j", chain], None])
        return steps

    def persist_files(self, ruleset, fallback) -> dict:
        return {
            "ruleset.ipv4": ruleset["ipv4"],
            "ruleset.ipv6": ruleset["ipv6"],
            "fallback.ipv4": fallback["ipv4"],
            "fallback.ipv6": fallback["ipv6"],
            "jumps": "".join(f"{builtin} {chain}\n" for builtin, chain in ruleset["jumps"]),
        }

    def loader(self) -> str:
        return (
            "#!/bin/sh\n"
            "# portguard.hardening boot loader: the persisted rules, or the management-only fallback.\n"
            "load() {\n"
            f"  iptables-restore --noflush {PERSIST_DIR}/$1.ipv4 && ip6tables-restore --noflush {PERSIST_DIR}/$1.ipv6\n"
            "}\n"
            "if ! load ruleset; then\n"
            "  echo 'portguard: persisted rules failed to load, loading the management-only fallback' >&2\n"
            "  load fallback || exit 1\n"
            "fi\n"
            f"while read -r builtin chain; do\n"
            "  for tool in iptables ip6tables; do\n"
            "    $tool -C \"$builtin\" -j \"$chain\" 2>/dev/null || $tool -I \"$builtin\" 1 -j \"$chain\"\n"
            "  done\n"
            f"done < {PERSIST_DIR}/jumps\n"
        )


BACKENDS = {"nftables": NftablesBackend, "iptables": IptablesBackend}

UNIT = f"""[Unit]
Description=portguard.hardening firewall (default-deny port whitelist)
Documentation=https://github.com/portguard/hardening
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target shutdown.target
After=local-fs.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={LOADER_PATH}

[Install]
WantedBy=sysinit.target
"""

# The revert process: sleeps, then restores unless confirm removed the pending record.
REVERT_SCRIPT = r"""
import fcntl, json, os, subprocess, sys, time
state_dir, token, deadline = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < deadline:
    time.sleep(min(0.2, max(0.0, deadline - time.time())))
    if not os.path.exists(os.path.join(state_dir, "pending.json")):
        sys.exit(0)
with open(os.path.join(state_dir, "lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = os.path.join(state_dir, "pending.json")
    try:
        with open(path) as handle:
            pending = json.load(handle)
    except FileNotFoundError:
        sys.exit(0)
    if pending.get("token") != token:
        sys.exit(0)
    errors = []
    for argv, data in pending["restore"]:
        proc = subprocess.run(argv, input=data, capture_output=True, text=True)
        if proc.returncode:
            errors.append(proc.stderr.strip())
    record = {"token": token, "at": time.time(), "errors": errors,
              "reason": "not confirmed within %s s" % pending.get("timeout")}
    with open(os.path.join(state_dir, "reverted.json.tmp"), "w") as handle:
        json.dump(record, handle)
    os.replace(os.path.join(state_dir, "reverted.json.tmp"), os.path.join(state_dir, "reverted.json"))
    os.unlink(path)
"""


def detect() -> dict:
    """What this host offers: backends, systemd, legacy iptables rules, the controller's address."""
    facts = {
        "nft": bool(shutil.which("nft")),
        "iptables": bool(shutil.which("iptables-restore") and shutil.which("ip6tables-restore")),
        "systemd": os.path.isdir("/run/systemd/system"),
        "legacy_rules": legacy_rule_count(),
        "iptables_variant": "",
    }
    if shutil.which("iptables"):
        version = run(["iptables", "--version"], check=False).stdout
        facts["iptables_variant"] = "nf_tables" if "nf_tables" in version else "legacy"
    connection = os.environ.get("SSH_CONNECTION", "").split()
    facts["controller_address"] = connection[0] if connection else None
    if facts["nft"]:
        facts["nft_usable"] = run(["nft", "list", "tables"], check=False).returncode == 0
    else:
        facts["nft_usable"] = False
    return facts


def legacy_rule_count() -> int:
    """Rules in the legacy (x_tables) iptables, which filter alongside nftables."""
    count = 0
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        if not shutil.which(tool):
            continue
        proc = run([tool], check=False)
        count += sum(1 for line in proc.stdout.splitlines() if line.startswith("-A "))
    return count


def choose_backend(requested: str, facts: dict) -> str:
    if requested == "auto":
        if facts["nft_usable"]:
            return "nftables"
        if facts["iptables"]:
            return "iptables"
        raise HostError("neither nft nor iptables-restore is usable on this host; install nftables")
    if requested == "nftables" and not facts["nft_usable"]:
        raise HostError("portguard_backend is nftables but nft is missing or unusable on this host")
    if requested == "iptables" and not facts["iptables"]:
        raise HostError("portguard_backend is iptables but iptables-restore/ip6tables-restore are missing")
    return requested


def check_conflicts(backend: str, facts: dict):
    legacy = facts.get("legacy_rules", 0)
    uses_nft = backend == "nftables" or facts.get("iptables_variant") == "nf_tables"
    if legacy and uses_nft:
        raise HostError(
            f"conflict: {legacy} legacy iptables rule(s) (iptables-legacy-save) filter packets alongside nftables; "
            "a mix of both is not applied. Migrate them (iptables-legacy-save | iptables-nft-restore) and flush the "
            "legacy tables, or set portguard_backend: iptables on a host whose iptables is the legacy variant."
        )


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

        Returns the lock, and whether an unconfirmed change was left behind by a dead revert process.
        """
        deadline = time.time() + wait_seconds
        while True:
            lock = self._locked()
            pending = self._pending()
            if pending is None:
                return lock, False
            if not _alive(pending.get("pid")):
                # The revert process is gone without reverting (it was killed): revert now, unless in
                # check mode, which writes nothing (the next real run reverts it).
                if not check_mode:
                    _run_steps(pending["restore"])
                    os.unlink(os.path.join(self.state_dir, "pending.json"))
                return lock, True
            lock.close()
            if time.time() > deadline:
                raise HostError("another portguard run on this host is waiting for its confirmation; try again later")
            time.sleep(0.3)

    # phases -------------------------------------------------------------
    def apply(self, backend, ruleset, *, check_mode, arm, timeout, state="present"):
        """Validate, diff, and apply when different; returns the result dict."""
        if state == "present":
            backend.validate(ruleset)
        lock, stale = self._wait_for_pending(timeout + 15, check_mode)
        try:
            live = backend.live()
            before, after = backend.compare(ruleset) if state == "present" else (_lines(live), [])
            changed = before != after
            result = {
                # reverting a stale unconfirmed change is a change even when the catalog's rules follow
                "changed": changed or stale,
                "backend": backend.name,
                "diff": {"before": "\n".join(before) + "\n" if before else "",
                         "after": "\n".join(after) + "\n" if after else "",
                         "before_header": f"live {backend.name} ({'ours' if live else 'absent'})",
                         "after_header": f"rendered {backend.name}"},
                "token": None,
            }
            if stale:
                result["stale_change"] = ("an unconfirmed change whose revert process had died was "
                                          + ("found; a real run reverts it" if check_mode else "reverted"))
            if not changed or check_mode:
                return result
            restore = backend.restore_steps(live)
            steps = backend.apply_steps(ruleset) if state == "present" else backend.restore_steps(None)
            token = uuid.uuid4().hex
            if arm:
                self._arm(token, restore, timeout)
                result["token"] = token
            try:
                _run_steps(steps)
            except HostError:
                _run_steps(restore)
                if arm:
                    os.unlink(os.path.join(self.state_dir, "pending.json"))
                raise
            # Replacing the table resets its counters: the activity report says since when they count.
            _write_atomic(os.path.join(self.state_dir, "applied.json"),
                          json.dumps({"at": time.time(), "token": token, "state": state}), mode=0o644)
            return result
        finally:
            lock.close()

    def _arm(self, token, restore, timeout):
        for name in ("reverted.json",):
            path = os.path.join(self.state_dir, name)
            if os.path.exists(path):
                os.unlink(path)
        deadline = time.time() + timeout
        proc = subprocess.Popen(
            [sys.executable, "-c", REVERT_SCRIPT, self.state_dir, token, repr(deadline)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
        record = {"token": token, "pid": proc.pid, "deadline": deadline, "timeout": timeout, "restore": restore}
        _write_atomic(os.path.join(self.state_dir, "pending.json"), json.dumps(record))

    def confirm(self, token):
        lock = self._locked()
        try:
            pending = self._pending()
            if pending is None or pending.get("token") != token:
                reverted = self.status(token)
                if reverted.get("state") == "reverted":
                    raise HostError(f"too late to confirm: the host already reverted ({reverted['reason']})")
                raise HostError("nothing to confirm: no pending change with this token")
            os.unlink(os.path.join(self.state_dir, "pending.json"))
            _terminate(pending.get("pid"))
            return {"state": "confirmed"}
        finally:
            lock.close()

    def status(self, token):
        pending = self._pending()
        if pending and pending.get("token") == token:
            return {"state": "pending", "deadline": pending["deadline"]}
        try:
            with open(os.path.join(self.state_dir, "reverted.json")) as handle:
                record = json.load(handle)
        except FileNotFoundError:
            record = {}
        if record.get("token") == token:
            return {"state": "reverted", "reason": record.get("reason"), "errors": record.get("errors", [])}
        return {"state": "unknown"}

    def persist(self, backend, ruleset, fallback, *, check_mode, systemd, state="present"):
        """Write our files atomically, and the boot unit where systemd runs; True when something changed."""
        if state == "absent":
            paths = [os.path.join(self.persist_dir, n) for n in os.listdir(self.persist_dir)] \
                if os.path.isdir(self.persist_dir) else []
            paths += [p for p in (self.unit_path, self.loader_path) if os.path.exists(p)]
            if paths and not check_mode:
                if systemd and os.path.exists(self.unit_path):
                    run(["systemctl", "disable", "portguard.service"], check=False)
                for path in paths:
                    os.unlink(path)
            return {"changed": bool(paths), "unit": "removed" if paths else "absent"}
        files = {os.path.join(self.persist_dir, name): text for name, text in backend.persist_files(ruleset, fallback).items()}
        files[self.loader_path] = backend.loader()
        if systemd:
            files[self.unit_path] = UNIT
        changed = [path for path, text in files.items() if _read(path) != text]
        if changed and not check_mode:
            os.makedirs(self.persist_dir, mode=0o700, exist_ok=True)
            for path in changed:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _write_atomic(path, files[path], mode=0o755 if path == self.loader_path else 0o600)
            if systemd:
                run(["systemctl", "daemon-reload"], check=False)
        enabled = False
        if systemd and not check_mode:
            if run(["systemctl", "is-enabled", "portguard.service"], check=False).returncode != 0:
                run(["systemctl", "enable", "portguard.service"])
                changed.append("enable")
            enabled = True
        unit = "installed" if systemd else "no boot unit installed: systemd is not running on this host"
        return {"changed": bool(changed), "files": sorted(changed), "unit": unit, "enabled": enabled}


def _lines(live):
    if live is None:
        return []
    if isinstance(live, dict):
        return [f"{family} {line}" for family, text in sorted(live.items()) for line in normalize_iptables(text)]
    return normalize_nft(live)


def _run_steps(steps):
    for argv, data in steps:
        run(argv, data)


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _terminate(pid):
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _write_atomic(path, text, mode=0o600):
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
