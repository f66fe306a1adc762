"""Persistence for boot: our files, the loader, the systemd unit; and distribution units that would flush ours."""

import contextlib
import json
import os
import re

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    LOADER_PATH,
    PERSIST_FILES,
    UNIT_NAME,
)
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import BACKENDS
from ansible_collections.portguard.hardening.plugins.module_utils.host.run import read_text, run, write_atomic

# Distribution units that load a whole firewall early at boot: ours runs after them and again when they
# reload or restart (see unit_text). firewalld starts after sysinit.target, so it cannot be ordered before us.
FIREWALL_UNITS = ("nftables.service", "netfilter-persistent.service", "ufw.service")
# What an armed apply asks confirm to persist (state dir, 0600): the ruleset is not shipped a second time.
REQUEST_FILE = "persist.json"


def unit_text(loader_path=LOADER_PATH) -> str:
    """The boot unit: after the distribution's firewall units, and again whenever they reload or restart.

    Debian's nftables.conf starts with ``flush ruleset`` and netfilter-persistent restores without
    ``--noflush``: whichever loads last wins, so ours loads after them (After=), is reloaded right after
    them (ReloadPropagatedFrom=: reload jobs follow the same ordering) and restarted with them (PartOf=).
    Loading is idempotent (our table or chains are replaced as a whole), so ExecReload= is the loader.
    """
    units = " ".join(FIREWALL_UNITS)
    return f"""[Unit]
Description=portguard.hardening firewall (default-deny port whitelist)
Documentation=https://github.com/portguard/hardening
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target shutdown.target
After=local-fs.target {units}
PartOf={units}
ReloadPropagatedFrom={units}
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={loader_path}
ExecReload={loader_path}

[Install]
WantedBy=sysinit.target
"""


UNIT = unit_text()


def record_request(state_dir, token, persist) -> None:
    """Keep what confirm of ``token`` persists (None: nothing); written before the change is applied."""
    path = os.path.join(state_dir, REQUEST_FILE)
    if persist is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    request = {key: value for key, value in persist.items() if key != "backend"}
    write_atomic(path, json.dumps({"token": token, "backend": persist["backend"].name, **request}))


def recorded_request(state_dir, token):
    """The persist arguments recorded for ``token`` (backend as an object), or None."""
    text = read_text(os.path.join(state_dir, REQUEST_FILE))
    request = json.loads(text) if text else {}
    if request.pop("token", None) != token:
        return None
    return dict(request, backend=BACKENDS[request["backend"]]())


def persist(paths, backend, ruleset, fallback, *, check_mode, systemd, state="present"):
    """Write our files atomically, and the boot unit where systemd runs; ``changed`` when something changed.

    ``paths`` has ``persist_dir``, ``unit_path`` and ``loader_path`` (a Host).
    """
    if state == "absent":
        # Only the files portguard writes: an admin's file (or directory) in the persist dir stays.
        found = [path for path in (*(os.path.join(paths.persist_dir, name) for name in PERSIST_FILES),
                                   paths.unit_path, paths.loader_path) if os.path.isfile(path)]
        if found and not check_mode:
            if systemd and os.path.exists(paths.unit_path):
                run(["systemctl", "disable", UNIT_NAME], check=False)
            for path in found:
                os.unlink(path)
            with contextlib.suppress(OSError):  # left where it holds anything else
                os.rmdir(paths.persist_dir)
        return {"changed": bool(found), "unit": "removed" if found else "absent"}
    files = {os.path.join(paths.persist_dir, name): text
             for name, text in backend.persist_files(ruleset, fallback).items()}
    files[paths.loader_path] = backend.loader(paths.persist_dir)
    if systemd:
        files[paths.unit_path] = unit_text(paths.loader_path)
    changed = [path for path, text in files.items() if read_text(path) != text]
    if changed and not check_mode:
        os.makedirs(paths.persist_dir, mode=0o700, exist_ok=True)
        for path in changed:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, files[path], mode=0o755 if path == paths.loader_path else 0o600)
        if systemd:
            run(["systemctl", "daemon-reload"], check=False)
    enabled = False
    if systemd and not check_mode:
        if run(["systemctl", "is-enabled", UNIT_NAME], check=False).returncode != 0:
            run(["systemctl", "enable", UNIT_NAME])
            changed.append("enable")
        elif paths.unit_path in changed:
            run(["systemctl", "reenable", UNIT_NAME])  # an [Install] section of an older unit
        enabled = True
    unit = "installed" if systemd else "no boot unit installed: systemd is not running on this host"
    return {"changed": bool(changed), "files": sorted(changed), "unit": unit, "enabled": enabled}


def _unit_enabled(unit, systemd, root="/") -> bool:
    """``systemctl is-enabled`` where systemd runs, else the symlinks that enabling makes (containers)."""
    if systemd and root == "/":
        return run(["systemctl", "is-enabled", "--quiet", unit], check=False).returncode == 0
    for base in ("etc/systemd/system", "run/systemd/system", "lib/systemd/system", "usr/lib/systemd/system"):
        directory = os.path.join(root, base)
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        if any(name.endswith((".wants", ".requires")) and os.path.lexists(os.path.join(directory, name, unit))
               for name in names):
            return True
    return False


def _file_matches(path, pattern) -> bool:
    try:
        with open(path, errors="replace") as handle:
            return any(re.match(pattern, line) for line in handle)
    except OSError:
        return False


def flush_risks(backend: str, facts: dict, root="/") -> list[str]:
    """Enabled distribution units whose configuration flushes our table or chains when they (re)load.

    Reported in every mode. Where the boot unit is installed, it loads after them and again when they
    reload or restart (unit_text); a manual ``nft -f`` or ``iptables-restore`` of their files is not
    covered, and the next run reports our table as missing (Host.apply).
    """
    nft_backed = backend == "nftables" or facts.get("iptables_variant") == "nf_tables"
    found = []
    if nft_backed and _unit_enabled("nftables.service", facts.get("systemd"), root) and _file_matches(
            os.path.join(root, "etc/nftables.conf"), r"\s*flush\s+ruleset\b"):
        found.append("nftables.service is enabled and /etc/nftables.conf starts with 'flush ruleset': it removes "
                     "every table, ours included, whenever it loads (boot, reload, restart)")
    if backend == "iptables" and _unit_enabled("netfilter-persistent.service", facts.get("systemd"), root) and any(
            _file_matches(os.path.join(root, "etc/iptables", name), r"\*filter") for name in ("rules.v4", "rules.v6")):
        found.append("netfilter-persistent.service is enabled and restores /etc/iptables/rules.v4/v6 without "
                     "--noflush: it flushes the filter table, our chains and jumps included, whenever it loads")
    if backend == "iptables" and _unit_enabled("ufw.service", facts.get("systemd"), root) and _file_matches(
            os.path.join(root, "etc/default/ufw"), r"\s*MANAGE_BUILTINS\s*=\s*[\"']?yes"):
        found.append("ufw.service is enabled with MANAGE_BUILTINS=yes: it flushes the built-in chains, our jumps "
                     "included, whenever it loads")
    if backend == "iptables" and _unit_enabled("firewalld.service", facts.get("systemd"), root) and _file_matches(
            os.path.join(root, "etc/firewalld/firewalld.conf"), r"\s*FirewallBackend\s*=\s*iptables"):
        found.append("firewalld.service is enabled with FirewallBackend=iptables: it flushes every iptables chain "
                     "when it starts or reloads, and it starts after early boot, so our unit cannot be ordered "
                     "after it: our chains are gone until the next portguard run")
    return found
