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
import ipaddress
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
# The ipsets of the iptables backend (render_iptables.SETS), with their family; nothing else is touched.
SETS = {"portguard-in4": "inet", "portguard-in6": "inet6", "portguard-out4": "inet", "portguard-out6": "inet6"}
SET_TYPE = "hash:net,port"
SET_COMMENT_BYTES = 255

_COUNTER_RE = re.compile(r"\s*counter packets \d+ bytes \d+")
_ELEMENTS_RE = re.compile(r"elements = \{(.*?)\}", re.S)
_SET_NAME = r"portguard-(?:in|out)[46]"
# The lines a rendered ipset payload holds; check_ipset_payload checks their values and order too.
_IPSET_LINE_RE = re.compile(
    rf"create (?P<create>{_SET_NAME})-new hash:net,port family (?P<family>inet6?) hashsize (?P<hashsize>\d+) "
    r"maxelem (?P<maxelem>\d+) counters comment"
    rf"|add (?P<add>{_SET_NAME})-new (?P<address>[0-9a-fA-F.:/]+),(?P<proto>tcp|udp):(?P<lo>\d+)(?:-(?P<hi>\d+))? "
    r'comment "(?P<comment>[^"\\\n]*)"'
    rf"|swap (?P<swap>{_SET_NAME})-new (?P=swap)|destroy (?P<destroy>{_SET_NAME})-new")
_SET_COUNTERS_RE = re.compile(r" packets \d+ bytes \d+")
_PORT_RANGE_RE = re.compile(r"^(\S+),(\w+):(\d+)-(\d+)$")


class HostError(PortguardError):
    """A host-side step failed; nothing was left half-applied."""


def run(argv, data=None, check=True):
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def normalize_nft(text) -> list[str]:
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


def normalize_ipset(text, rendered: bool = False) -> list[str]:
    """Our sets from ``ipset save`` (or a rendered payload) as comparable lines.

    Per set: the ``create`` line with what we set (type, family, maxelem, counters, comment; the
    kernel's hashsize, bucketsize and initval left out), then its elements sorted, counters left
    out, and port ranges expanded into one element per port, as the kernel stores them. In a
    rendered payload ``<set>-new`` stands for ``<set>`` (it is swapped in).
    """
    creates, adds = {}, {}
    for line in (text or "").splitlines():
        words = line.split(" ", 3)
        if len(words) < 3 or words[0] not in ("create", "add"):
            continue
        name = words[1].removesuffix("-new") if rendered else words[1]
        if words[0] == "create":
            options = line.split()[2:]
            kept = [options[0]]
            for index, word in enumerate(options[1:], 1):
                if word in ("family", "maxelem"):
                    kept += [word, options[index + 1]]
                elif word in ("counters", "comment"):
                    kept.append(word)
            creates[name] = f"create {name} {' '.join(kept)}"
            continue
        element, rest = words[2], _SET_COUNTERS_RE.sub("", " " + words[3]).strip() if len(words) > 3 else ""
        tail = f" {rest}" if rest else ""
        match = _PORT_RANGE_RE.match(element)
        if match:
            address, proto, low, high = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
            adds.setdefault(name, []).extend(f"add {name} {address},{proto}:{p}{tail}" for p in range(low, high + 1))
        else:
            adds.setdefault(name, []).append(f"add {name} {element}{tail}")
    lines = []
    for name in sorted(set(creates) | set(adds)):
        if name in creates:
            lines.append(creates[name])
        lines += sorted(adds.get(name, []))
    return lines


def check_ipset_payload(payload: str, sets) -> None:
    """Everything the kernel would check in a payload, without the kernel (ipset has no test mode).

    Only our own sets, each in the order create, add..., swap, destroy; elements that
    ``hash:net,port`` takes (an address of the set's family with a prefix of 1 or more, ports
    0-65535, a comment of at most 255 bytes, no duplicate) and no more of them than maxelem.
    """
    for name, family in sets:
        if SETS.get(name) != family:
            raise HostError(f"refused set {name!r} ({family!r}): not one of portguard's own sets")
    expected = dict(sets)
    state, counts, seen = {}, {}, set()
    for number, line in enumerate(payload.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        match = _IPSET_LINE_RE.fullmatch(line)
        problem = None if match else "not a line portguard renders"
        if match and match["create"]:
            name = match["create"]
            if expected.get(name) != match["family"] or name in state:
                problem = f"set {name} is not listed with family {match['family']}, or is created twice"
            state[name], counts[name] = ("created", int(match["maxelem"])), 0
        elif match and match["add"]:
            name = match["add"]
            problem = _element_problem(match, expected.get(name)) if state.get(name, ("",))[0] == "created" \
                else f"add to {name}-new outside its create/swap"
            if not problem:
                element = (name, match["address"], match["proto"], match["lo"], match["hi"])
                counts[name] += int(match["hi"] or match["lo"]) - int(match["lo"]) + 1
                if element in seen:
                    problem = "duplicate element"
                elif counts[name] > state[name][1]:
                    problem = f"more elements than maxelem {state[name][1]}"
                seen.add(element)
        elif match and match["swap"]:
            problem = None if state.get(match["swap"], ("",))[0] == "created" else "swap before create"
            state[match["swap"]] = ("swapped", 0)
        elif match:
            problem = None if state.get(match["destroy"], ("",))[0] == "swapped" else "destroy before swap"
            state[match["destroy"]] = ("done", 0)
        if problem:
            raise HostError(f"refused ipset payload line {number} ({problem}): {line[:120]!r}")
    if payload and sorted(state) != sorted(expected) or any(value[0] != "done" for value in state.values()):
        raise HostError("refused ipset payload: it does not fill and swap in exactly the listed sets")


def _element_problem(match, family):
    try:
        network = ipaddress.ip_network(match["address"] if "/" in match["address"] else match["address"] + "/"
                                       + ("32" if "." in match["address"] else "128"))
    except ValueError as exc:
        return str(exc)
    if network.version != (4 if family == "inet" else 6) or network.prefixlen == 0:
        return "address of another family, or a /0 (hash:net refuses it)"
    if str(network.network_address) != match["address"].split("/")[0]:
        return "address not as ipset prints it"
    low, high = int(match["lo"]), int(match["hi"] or match["lo"])
    if not low <= high <= 65535:
        return "port out of range"
    if len(match["comment"].encode("utf-8")) > SET_COMMENT_BYTES:
        return f"comment over {SET_COMMENT_BYTES} bytes"
    return None


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
        lines.append(f"ipset destroy {name}-new 2>/dev/null; ipset list -n {name} >/dev/null 2>&1 || "
                     f"ipset create {name} {SET_TYPE} family {family} counters comment || exit 1")
    return "\n".join(lines) + "\n"


class NftablesBackend:
    name = "nftables"

    def live(self):
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
    """Our chains in both families' filter tables and, in the ipset variant, our sets.

    ``suffix`` picks other iptables commands (``-legacy`` in the kernel tests); the host module
    uses the default ones.
    """

    name = "iptables"

    def __init__(self, suffix=""):
        self.families = ((f"iptables{suffix}", "ipv4"), (f"ip6tables{suffix}", "ipv6"))

    def _save(self, tool) -> str:
        return run([f"{tool}-save", "-t", "filter"]).stdout

    def _save_sets(self) -> str:
        """``ipset save`` of our sets (and of a ``-new`` one an interrupted apply left), '' without ipset."""
        if not shutil.which("ipset"):
            return ""
        listed = run(["ipset", "list", "-n"], check=False)
        if listed.returncode != 0:
            return ""
        ours = [name for name in listed.stdout.split() if name.removesuffix("-new") in SETS]
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

        ipset has no test mode: the payload is checked here for everything the kernel would refuse
        (check_ipset_payload). The set match refuses a set that does not exist, so a rule naming one
        of our sets is tested only when that set exists (every run after the first); before, it is
        left out of the test. It is a fixed line of the renderer, the same on every host.
        """
        payload, sets = ruleset.get("ipset") or "", [tuple(s) for s in ruleset.get("sets") or ()]
        check_ipset_payload(payload, sets)
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
        return [[["sh", "-c", f"while {tool} -D {BUILTIN[chain]} -j {chain} 2>/dev/null; do :; done; "
                              f"{tool} -F {chain} 2>/dev/null; {tool} -X {chain} 2>/dev/null; true"], None]
                for tool, _family in self.families for chain in chains]

    def apply_steps(self, ruleset) -> list:
        """Sets first (the rules reference them), then each family's chains and jumps, then stale chains and sets."""
        sets = [tuple(s) for s in ruleset.get("sets") or ()]
        check_ipset_payload(ruleset.get("ipset") or "", sets)
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
        steps += self._remove_chains_steps([chain for chain in CHAINS if chain not in wanted])
        used = {name for name, _family in sets}
        steps.append([["sh", "-c", _destroy_sets_script(
            [n for name in SETS for n in (name, f"{name}-new") if n not in used])], None])
        return steps

    def restore_steps(self, snapshot) -> list:
        """Remove our chains and sets, then load the snapshot's sets (counters too) and chains."""
        steps = self._remove_chains_steps(CHAINS)
        steps.append([["sh", "-c", _destroy_sets_script([n for name in SETS for n in (name, f"{name}-new")])], None])
        if snapshot is None:
            return steps
        if snapshot.get("ipset"):
            steps.append([["ipset", "restore"], snapshot["ipset"]])
        for tool, family in self.families:
            ours = normalize_iptables(snapshot[family])
            chains = [line for line in ours if line.startswith(":")]
            rules = [line for line in ours if line.startswith("-A PORTGUARD")]
            jumps = [line for line in ours if line.startswith("-A ") and not line.startswith("-A PORTGUARD")]
            payload = "\n".join(["*filter", *[f"{c} - [0:0]" for c in chains], *rules, "COMMIT"]) + "\n"
            steps.append([[f"{tool}-restore", "--noflush"], payload])
            for jump in jumps:
                builtin, chain = jump.split(" ")[1::2]
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

    def loader(self) -> str:
        # The fallback is rendered without sets: it loads even where ipset fails.
        return (
            "#!/bin/sh\n"
            "# portguard.hardening boot loader: the persisted sets and rules, or the management-only fallback.\n"
            "load() {\n"
            f"  if [ \"$1\" = ruleset ] && [ -s {PERSIST_DIR}/ruleset.ipset ]; then\n"
            "    while read -r name family; do\n"
            "      ipset destroy \"$name-new\" 2>/dev/null\n"
            "      ipset list -n \"$name\" >/dev/null 2>&1 ||\n"
            f"        ipset create \"$name\" {SET_TYPE} family \"$family\" counters comment || return 1\n"
            f"    done < {PERSIST_DIR}/sets\n"
            f"    ipset restore < {PERSIST_DIR}/ruleset.ipset || return 1\n"
            "  fi\n"
            f"  iptables-restore --noflush {PERSIST_DIR}/$1.ipv4 && ip6tables-restore --noflush {PERSIST_DIR}/$1.ipv6\n"
            "}\n"
            "if ! load ruleset; then\n"
            "  echo 'portguard: persisted rules failed to load, loading the management-only fallback' >&2\n"
            "  load fallback || exit 1\n"
            "  # the fallback has no set rule: sets a partial load left hold flows it must not allow\n"
            f"  while read -r name family; do ipset destroy \"$name\" 2>/dev/null; done < {PERSIST_DIR}/sets\n"
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
        "ipset": ipset_usable(),
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
        return [f"{family} {line}" for family, text in sorted(live.items())
                for line in (normalize_ipset(text) if family == "ipset" else normalize_iptables(text))]
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
