"""The two backends on the host: read the live table or chains, validate, and the steps that apply or restore.

Every name comes from core/backends/contract.py, every text check and normalization from the backend's
pure file (core/backends/nftables.py, iptables.py, ipset.py); this file runs the commands.
"""

import os
import shutil
import tempfile

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    IPT_FAMILIES,
    IPT_JUMPS,
    IPT_TABLE,
    NFT_PERSIST_FILES,
    NFT_TABLE_REF,
    PERSIST_DIR,
    SET_SWAP_SUFFIX,
    SET_TYPE,
    SETS,
    PayloadRefused,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.ipset import normalize_ipset
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import (
    check_iptables_ruleset,
    normalize_iptables,
    restore_payload,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import (
    check_nft_ruleset,
    normalize_nft,
)
from ansible_collections.portguard.hardening.plugins.module_utils.host.run import HostError, run

_CHECKS = {"nftables": check_nft_ruleset, "iptables": check_iptables_ruleset}
# Our sets, and the -new ones a payload fills (or an interrupted apply left).
_ALL_SETS = [n for name in SETS for n in (name, name + SET_SWAP_SUFFIX)]


def check_ruleset(backend: str, value, where: str) -> None:
    """A ruleset (or fallback) of the form ``backend`` takes, with payloads that touch only what is ours."""
    try:
        _CHECKS[backend](value, where)
    except PayloadRefused as exc:
        raise HostError(str(exc)) from exc


def ipset_usable() -> bool:
    """The ipset tool is installed and the kernel has ip_set (``ipset list -n`` fails without it)."""
    return bool(shutil.which("ipset")) and run(["ipset", "list", "-n"], check=False).returncode == 0


def _destroy_sets_script(names) -> str:
    """Destroy those of ``names`` that exist; retried briefly, since a rule's reference can outlive it a moment."""
    return (
        "command -v ipset >/dev/null 2>&1 || exit 0\n"
        f"for s in {' '.join(names)}; do\n"
        "  ipset list -n \"$s\" >/dev/null 2>&1 || continue\n"
        "  i=0\n"
        "  until ipset destroy \"$s\"; do\n"
        "    i=$((i + 1)); [ $i -lt 50 ] || exit 1; sleep 0.1\n"
        "  done\n"
        "done\n"
    )


def _prepare_sets_script(sets) -> str:
    """Make ``<set>-new`` free and the live set exist, so that the payload's ``swap`` works."""
    lines = []
    for name, family in sets:
        lines.append(f"ipset destroy {name}{SET_SWAP_SUFFIX} 2>/dev/null; ipset list -n {name} >/dev/null 2>&1 || "
                     f"ipset create {name} {SET_TYPE} family {family} counters comment || exit 1")
    return "\n".join(lines) + "\n"


def live_lines(live):
    """A live snapshot (``backend.live()``) as the comparable lines of the diff."""
    if live is None:
        return []
    if isinstance(live, dict):
        return [f"{family} {line}" for family, text in sorted(live.items())
                for line in (normalize_ipset(text) if family == "ipset" else normalize_iptables(text))]
    return normalize_nft(live)


class NftablesBackend:
    name = "nftables"

    def live(self):
        proc = run(["nft", "list", "table", *NFT_TABLE_REF.split()], check=False)
        if proc.returncode != 0:
            if "No such file" in proc.stderr or "does not exist" in proc.stderr:
                return None
            raise HostError(f"nft list table {NFT_TABLE_REF} failed: {proc.stderr.strip()}")
        return proc.stdout

    def compare(self, ruleset) -> tuple[list[str], list[str]]:
        return normalize_nft(self.live()), normalize_nft(ruleset)

    def validate(self, ruleset):
        check_ruleset(self.name, ruleset, "ruleset")
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
            return [[["nft", "delete", "table", *NFT_TABLE_REF.split()], None]]
        return [[["nft", "-f", "-"], f"table {NFT_TABLE_REF}\ndelete table {NFT_TABLE_REF}\n{snapshot}"]]

    def persist_files(self, ruleset, fallback) -> dict:
        return dict(zip(NFT_PERSIST_FILES, (ruleset, fallback)))

    def loader(self, persist_dir=PERSIST_DIR) -> str:
        ruleset, fallback = (f"{persist_dir}/{name}" for name in NFT_PERSIST_FILES)
        return (
            "#!/bin/sh\n"
            "# portguard.hardening boot loader: the persisted ruleset, or the management-only fallback.\n"
            f"if nft -f {ruleset}; then exit 0; fi\n"
            "echo 'portguard: persisted ruleset failed to load, loading the management-only fallback' >&2\n"
            f"nft -f {fallback}\n"
        )


class IptablesBackend:
    """Our chains in both families' filter tables and, in the ipset variant, our sets.

    ``suffix`` picks other iptables commands (``-legacy`` in the kernel tests); the host module
    uses the default ones.
    """

    name = "iptables"

    def __init__(self, suffix=""):
        self.families = ((f"iptables{suffix}", IPT_FAMILIES[4]), (f"ip6tables{suffix}", IPT_FAMILIES[6]))

    def _save(self, tool) -> str:
        return run([f"{tool}-save", "-t", IPT_TABLE]).stdout

    def _save_sets(self) -> str:
        """``ipset save`` of our sets (and of a ``-new`` one an interrupted apply left), '' without ipset."""
        if not shutil.which("ipset"):
            return ""
        listed = run(["ipset", "list", "-n"], check=False)
        if listed.returncode != 0:
            return ""
        ours = [name for name in listed.stdout.split() if name in _ALL_SETS]
        return "".join(run(["ipset", "save", name]).stdout.rstrip("\n") + "\n" for name in sorted(ours))

    def live(self):
        result = {}
        for tool, family in self.families:
            result[family] = self._save(tool)
        result["ipset"] = self._save_sets()
        if not result["ipset"] and not any(normalize_iptables(result[family]) for _tool, family in self.families):
            return None
        return result

    def compare(self, ruleset) -> tuple[list[str], list[str]]:
        live = self.live() or {}
        jumps = "".join(f"-A {builtin} -j {chain}\n" for builtin, chain in ruleset["jumps"])
        before, after = [], []
        for _tool, family in self.families:
            before += [f"{family} {line}" for line in normalize_iptables(live.get(family, ""))]
            after += [f"{family} {line}" for line in normalize_iptables(ruleset[family] + jumps)]
        before += [f"ipset {line}" for line in normalize_ipset(live.get("ipset"))]
        after += [f"ipset {line}" for line in normalize_ipset(ruleset.get("ipset"), rendered=True)]
        return before, after

    def validate(self, ruleset):
        """Check the sets' payload, then ``iptables-restore --test`` both families; writes nothing.

        ipset has no test mode: the payload is checked for everything the kernel would refuse
        (ipset.check_ipset_payload). The set match refuses a set that does not exist, so a rule naming
        one of our sets is tested only when that set exists (every run after the first); before, it is
        left out of the test. It is a fixed line of the renderer, the same on every host.
        """
        check_ruleset(self.name, ruleset, "ruleset")
        payload, sets = ruleset.get("ipset") or "", [tuple(s) for s in ruleset.get("sets") or ()]
        if payload and not ipset_usable():
            raise HostError("the ruleset needs ipset, but the ipset tool or the kernel's ip_set is missing on this "
                            "host; nothing was changed")
        existing = set(run(["ipset", "list", "-n"], check=False).stdout.split()) if payload else set()
        absent = {name for name, _family in sets if name not in existing}
        for tool, family in self.families:
            rules = "".join(line + "\n" for line in ruleset[family].splitlines()
                            if not any(f" --match-set {name} " in line for name in absent))
            proc = run([f"{tool}-restore", "--test", "--noflush"], rules, check=False)
            if proc.returncode != 0:
                raise HostError(f"{tool}-restore --test rejected the {family} rules, nothing was changed: "
                                f"{proc.stderr.strip()}")

    def _remove_chains_steps(self, chains) -> list:
        return [[["sh", "-c", f"while {tool} -D {IPT_JUMPS[chain]} -j {chain} 2>/dev/null; do :; done; "
                              f"{tool} -F {chain} 2>/dev/null; {tool} -X {chain} 2>/dev/null; true"], None]
                for tool, _family in self.families for chain in chains]

    def apply_steps(self, ruleset) -> list:
        """Sets first (the rules reference them), then each family's chains and jumps, then stale chains and sets."""
        check_ruleset(self.name, ruleset, "ruleset")
        sets = [tuple(s) for s in ruleset.get("sets") or ()]
        steps = []
        if ruleset.get("ipset"):
            steps.append([["sh", "-c", _prepare_sets_script(sets)], None])
            steps.append([["ipset", "restore"], ruleset["ipset"]])
        for tool, family in self.families:
            steps.append([[f"{tool}-restore", "--noflush"], ruleset[family]])
            for builtin, chain in ruleset["jumps"]:
                steps.append([["sh", "-c", f"{tool} -C {builtin} -j {chain} 2>/dev/null || "
                                           f"{tool} -I {builtin} 1 -j {chain}"], None])
        # A chain the ruleset no longer has (egress turned off), then the sets nothing references any more
        # (all of them when the host fell back to per-source rules).
        wanted = {chain for _builtin, chain in ruleset["jumps"]}
        steps += self._remove_chains_steps([chain for chain in IPT_JUMPS if chain not in wanted])
        used = {name for name, _family in sets}
        steps.append([["sh", "-c", _destroy_sets_script(
            [n for name in SETS for n in (name, name + SET_SWAP_SUFFIX) if n not in used])], None])
        return steps

    def restore_steps(self, snapshot) -> list:
        """Remove our chains and sets, then load the snapshot's sets (counters too) and chains."""
        steps = self._remove_chains_steps(IPT_JUMPS)
        steps.append([["sh", "-c", _destroy_sets_script(_ALL_SETS)], None])
        if snapshot is None:
            return steps
        if snapshot.get("ipset"):
            steps.append([["ipset", "restore"], snapshot["ipset"]])
        for tool, family in self.families:
            payload, jumps = restore_payload(normalize_iptables(snapshot[family]))
            steps.append([[f"{tool}-restore", "--noflush"], payload])
            for builtin, chain in jumps:
                steps.append([[tool, "-I", builtin, "1", "-j", chain], None])
        return steps

    def persist_files(self, ruleset, fallback) -> dict:
        # The ipset files are written (empty) for per-source rules too, so that none of an earlier run survives.
        return {
            "ruleset.ipset": ruleset.get("ipset") or "",
            "sets": "".join(f"{name} {family}\n" for name, family in ruleset.get("sets") or ()),
            "ruleset.ipv4": ruleset["ipv4"],
            "ruleset.ipv6": ruleset["ipv6"],
            "fallback.ipv4": fallback["ipv4"],
            "fallback.ipv6": fallback["ipv6"],
            "jumps": "".join(f"{builtin} {chain}\n" for builtin, chain in ruleset["jumps"]),
        }

    def loader(self, persist_dir=PERSIST_DIR) -> str:
        # The fallback is rendered without sets: it loads even where ipset fails.
        return (
            "#!/bin/sh\n"
            "# portguard.hardening boot loader: the persisted sets and rules, or the management-only fallback.\n"
            "load() {\n"
            f"  if [ \"$1\" = ruleset ] && [ -s {persist_dir}/ruleset.ipset ]; then\n"
            "    while read -r name family; do\n"
            f"      ipset destroy \"$name{SET_SWAP_SUFFIX}\" 2>/dev/null\n"
            "      ipset list -n \"$name\" >/dev/null 2>&1 ||\n"
            f"        ipset create \"$name\" {SET_TYPE} family \"$family\" counters comment || return 1\n"
            f"    done < {persist_dir}/sets\n"
            f"    ipset restore < {persist_dir}/ruleset.ipset || return 1\n"
            "  fi\n"
            f"  iptables-restore --noflush {persist_dir}/$1.ipv4 && ip6tables-restore --noflush {persist_dir}/$1.ipv6\n"
            "}\n"
            "if ! load ruleset; then\n"
            "  echo 'portguard: persisted rules failed to load, loading the management-only fallback' >&2\n"
            "  load fallback || exit 1\n"
            "  # the fallback has no set rule: sets a partial load left hold flows it must not allow\n"
            f"  while read -r name family; do ipset destroy \"$name\" 2>/dev/null; done < {persist_dir}/sets\n"
            "fi\n"
            "while read -r builtin chain; do\n"
            "  for tool in iptables ip6tables; do\n"
            "    $tool -C \"$builtin\" -j \"$chain\" 2>/dev/null || $tool -I \"$builtin\" 1 -j \"$chain\"\n"
            "  done\n"
            f"done < {persist_dir}/jumps\n"
        )


BACKENDS = {"nftables": NftablesBackend, "iptables": IptablesBackend}
