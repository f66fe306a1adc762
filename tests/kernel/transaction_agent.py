"""Runs one scenario of test_firewall_transaction.py inside a fresh network namespace (``unshare --net``).

``python transaction_agent.py <scenario> <workdir>`` prints the scenario's findings as JSON. The host code
(``transaction.Host``, the module's ``run_phase``) runs as on a managed host, with its state, persisted
files, boot unit and loader under ``workdir``; the namespace's nftables/iptables are real and its own.
"""

import json
import os
import subprocess
import sys
import threading
import time

from support.fakes import FakeModule

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import normalize_nft
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall import transaction as firewall_host
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import NftablesBackend
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.persist import unit_text
from ansible_collections.portguard.hardening.plugins.modules import firewall as firewall_module

TABLE = """table inet portguard
delete table inet portguard
table inet portguard {{
    chain input {{
        type filter hook input priority filter; policy {policy};
        iif "lo" accept comment "{label}"
    }}
}}
"""
OPEN = TABLE.format(policy="accept", label="open")
LOCK = TABLE.format(policy="drop", label="lock")
FALLBACK = TABLE.format(policy="accept", label="fallback")
# Debian 12's /etc/nftables.conf as the nftables package installs it.
DEBIAN_NFTABLES_CONF = """#!/usr/sbin/nft -f

flush ruleset

table inet filter {
\tchain input {
\t\ttype filter hook input priority filter;
\t}
\tchain forward {
\t\ttype filter hook forward priority filter;
\t}
\tchain output {
\t\ttype filter hook output priority filter;
\t}
}
"""
CHAINS_V4 = "*filter\n:PORTGUARD-IN - [0:0]\n-A PORTGUARD-IN -i lo -j ACCEPT\nCOMMIT\n"
IPTABLES = {"ipv4": CHAINS_V4, "ipv6": CHAINS_V4, "jumps": [["INPUT", "PORTGUARD-IN"]], "ipset": "", "sets": []}


class Module(FakeModule):
    error = PortguardError


def host(workdir, persist_dir=None):
    return firewall_host.Host(state_dir=f"{workdir}/run", persist_dir=persist_dir or f"{workdir}/etc",
                              unit_path=f"{workdir}/unit/portguard.service", loader_path=f"{workdir}/sbin/load")


def module_on(workdir, persist_dir=None):
    """The module's run_phase with the host's paths under workdir and no systemd."""
    firewall_module.Host = lambda: host(workdir, persist_dir)
    firewall_module.detect = lambda: {"systemd": False, "legacy_rules": 0, "iptables_variant": "nf_tables"}
    if hasattr(firewall_module, "flush_risks"):
        firewall_module.flush_risks = lambda backend, facts: []


def params(**values):
    return {"phase": "apply", "backend": "nftables", "state": "present", "rollback_timeout": 30,
            "arm_rollback": True, "persist": True, "token": None, "ruleset": None, "fallback": FALLBACK, **values}


def nft(*args, data=None):
    return subprocess.run(["nft", *args], input=data, capture_output=True, text=True, check=True).stdout


def live():
    return NftablesBackend().live()


def slow_record(workdir):
    """A loaded host: the pending record lands 1.5 s after the revert process started (first tick 0.2 s)."""
    write = firewall_host.write_atomic

    def slow(path, text, mode=0o600):
        if path.endswith("pending.json"):
            time.sleep(1.5)
        write(path, text, mode)

    firewall_host.write_atomic = slow
    nft("-f", "-", data=OPEN)
    started = time.time()
    result = host(workdir).apply(NftablesBackend(), LOCK, check_mode=False, arm=True, timeout=3)
    locked = live()
    end = started + 15
    while not os.path.exists(f"{workdir}/run/reverted.json") and time.time() < end:
        time.sleep(0.2)
    return {"token": result["token"], "locked": locked, "after_deadline": live(),
            "reverted": os.path.exists(f"{workdir}/run/reverted.json")}


def interleaved(workdir):
    """Run A's confirm persists slowly; run B applies and confirms meanwhile. Boot must end equal to live."""
    module_on(workdir)
    persist = firewall_host.Host.persist

    def slow_persist(self, *args, **kwargs):
        if kwargs.get("ruleset", args[1] if len(args) > 1 else None) == OPEN:
            time.sleep(1.5)
        return persist(self, *args, **kwargs)

    firewall_host.Host.persist = slow_persist
    first = firewall_module.run_phase(Module(), params(ruleset=OPEN))
    replies = {}
    confirm_a = threading.Thread(target=lambda: replies.setdefault("a", firewall_module.run_phase(
        Module(), params(phase="confirm", token=first["token"], ruleset=OPEN))))
    confirm_a.start()
    time.sleep(0.5)
    second = firewall_module.run_phase(Module(), params(ruleset=LOCK.replace("drop", "accept")))
    replies["b"] = firewall_module.run_phase(Module(), params(phase="confirm", token=second["token"],
                                                              ruleset=LOCK.replace("drop", "accept")))
    confirm_a.join()
    with open(f"{workdir}/etc/ruleset.nft") as handle:
        boot = handle.read()
    return {"live": normalize_nft(live()), "boot": normalize_nft(boot),
            "states": [replies["a"].get("state"), replies["b"].get("state")]}


def persistence_error(workdir):
    """Persisting fails after the confirm (the persist dir cannot be created): say exactly that."""
    with open(f"{workdir}/file", "w"):
        pass
    module_on(workdir, persist_dir=f"{workdir}/file/portguard")
    applied = firewall_module.run_phase(Module(), params(ruleset=OPEN))
    # the finding is whatever escaped run_phase (the old code let an OSError through)
    try:
        reply = firewall_module.run_phase(Module(), params(phase="confirm", token=applied["token"], ruleset=OPEN))
    except Exception as exc:  # pylint: disable=broad-exception-caught
        reply = {"escaped": f"{type(exc).__name__}: {exc}"}
    pending = os.path.exists(f"{workdir}/run/pending.json")
    return {"reply": reply, "pending": pending, "live": normalize_nft(live())}


def hostile_iptables(workdir):
    """A direct call with a jump that injects a command, and one with a payload for another table."""
    module_on(workdir)
    subprocess.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "198.51.100.0/24", "-j", "MASQUERADE"],
                   check=True)
    before = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    marker = f"{workdir}/pwned"
    hostile = {
        "jumps": dict(IPTABLES, jumps=[["INPUT", f"PORTGUARD-IN; touch {marker}; true"]]),
        "payload": dict(IPTABLES, ipv4=CHAINS_V4 + "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j ACCEPT\nCOMMIT\n"),
        "chain": dict(IPTABLES, ipv4=CHAINS_V4.replace("COMMIT", "-A INPUT -j ACCEPT\nCOMMIT")),
    }
    found = {}
    for name, ruleset in hostile.items():
        try:
            firewall_module.run_phase(Module(), params(backend="iptables", ruleset=ruleset, fallback=IPTABLES,
                                                       arm_rollback=False, persist=False))
            found[name] = "applied"
        except PortguardError as exc:
            found[name] = str(exc)
    after = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    strip = [line for line in before.splitlines() if not line.startswith("#")]
    return {"found": found, "marker": os.path.exists(marker),
            "unchanged": strip == [line for line in after.splitlines() if not line.startswith("#")]}


def hostile_nft(workdir):
    """A direct call whose nftables text also deletes another table (nft -c accepts it)."""
    module_on(workdir)
    nft("-f", "-", data="table inet f2b-table {\n  set addr-set-sshd { type ipv4_addr; }\n}\n")
    try:
        firewall_module.run_phase(Module(), params(ruleset=OPEN + "delete table inet f2b-table\n",
                                                   arm_rollback=False, persist=False))
        found = "applied"
    except PortguardError as exc:
        found = str(exc)
    return {"found": found, "tables": nft("list", "tables").splitlines(), "ours": live()}


def debian_reload(workdir):
    """Ours, then Debian's nftables.conf (flush ruleset) loads over it, then the unit's reload command."""
    guard = host(workdir)
    backend = NftablesBackend()
    guard.persist(backend, OPEN, FALLBACK, check_mode=False, systemd=False)
    unit = unit_text(guard.loader_path)
    reload_command = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecReload="))
    subprocess.run([guard.loader_path], check=True)
    loaded = live()
    with open(f"{workdir}/nftables.conf", "w") as handle:
        handle.write(DEBIAN_NFTABLES_CONF)
    nft("-f", f"{workdir}/nftables.conf")
    flushed = live()
    drift = guard.apply(backend, OPEN, check_mode=True, arm=True, timeout=30)
    subprocess.run(reload_command.split(), check=True)
    return {"loaded": loaded is not None, "flushed": flushed, "drift": drift, "reloaded": live(),
            "tables": nft("list", "tables").split("\n")}


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]](sys.argv[2])))
