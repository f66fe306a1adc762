"""What this host offers the firewall: backends, systemd, legacy rules, and where the controller connects from."""

import ipaddress
import os
import shutil

from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import ipset_usable
from ansible_collections.portguard.hardening.plugins.module_utils.host.run import HostError, run


def ssh_connection(pid=None):
    """``SSH_CONNECTION`` (client address, client port, server address, server port) of this process or of its
    nearest ancestor that has one, else None.

    sudo and su drop it from the environment under become; the login shell they were started from
    still holds it, and root reads its /proc/<pid>/environ.
    """
    pid = pid or os.getpid()
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environment = handle.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as handle:
                parent = int(handle.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None
        for item in environment:
            if item.startswith(b"SSH_CONNECTION="):
                fields = item.split(b"=", 1)[1].decode("ascii", "replace").split()
                try:
                    return (str(ipaddress.ip_address(fields[0].split("%")[0])), int(fields[1]),
                            fields[2], int(fields[3])) if len(fields) == 4 else None
                except ValueError:
                    return None
        pid = parent
    return None


def detect() -> dict:
    """What this host offers: backends, systemd, legacy iptables rules, the controller's address."""
    facts = {
        "nft": bool(shutil.which("nft")),
        "iptables": bool(shutil.which("iptables-restore") and shutil.which("ip6tables-restore")),
        "systemd": os.path.isdir("/run/systemd/system"),
        "legacy_rules": legacy_rule_count(),
        "iptables_variant": "",
        "ipset": ipset_usable(),
    }
    if shutil.which("iptables"):
        version = run(["iptables", "--version"], check=False).stdout
        facts["iptables_variant"] = "nf_tables" if "nf_tables" in version else "legacy"
    connection = ssh_connection()
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


def check_conflicts(backend: str, facts: dict):
    legacy = facts.get("legacy_rules", 0)
    uses_nft = backend == "nftables" or facts.get("iptables_variant") == "nf_tables"
    if legacy and uses_nft:
        raise HostError(
            f"conflict: {legacy} legacy iptables rule(s) (iptables-legacy-save) filter packets alongside nftables; "
            "a mix of both is not applied. Migrate them (iptables-legacy-save | iptables-nft-restore) and flush the "
            "legacy tables, or set portguard_backend: iptables on a host whose iptables is the legacy variant."
        )
