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

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError

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
# Every file persist() writes into PERSIST_DIR (both backends): state absent removes these and nothing else.
PERSIST_FILES = ("ruleset.nft", "fallback.nft", "ruleset.ipset", "sets", "ruleset.ipv4", "ruleset.ipv6",
                 "fallback.ipv4", "fallback.ipv6", "jumps")
# Targets our iptables chains use; a payload that jumps anywhere else is refused.
IPTABLES_TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "LOG", "NFLOG"}
# Distribution units that load a whole firewall early at boot: ours runs after them and again when they
# reload or restart (see unit_text). firewalld starts after sysinit.target, so it cannot be ordered before us.
FIREWALL_UNITS = ("nftables.service", "netfilter-persistent.service", "ufw.service")
# A record past its deadline by this much, whose revert process still has not acted, is stale.
STALE_GRACE = 30
# Tokens of confirmed changes remembered for a repeated confirm (a lost reply, then a retry).
CONFIRMED_KEPT = 20

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
    # Foreign rules may hold any bytes: a strict decode would crash on them. Ours are validated text.
    proc = subprocess.run(argv, input=data, capture_output=True, text=True, errors="replace", check=False)
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


def check_iptables_payload(payload: str, where: str) -> None:
    """Refuse an ``iptables-restore --noflush`` payload that does more than fill our chains.

    The module can be called directly, so the host checks what the renderer promises: one
    ``*filter`` table, declarations of our chains only, ``-A`` to our chains only, jumps to plain
    targets (never to another chain), set matches on our sets only, then ``COMMIT``.
    """
    seen_table = committed = False
    for number, line in enumerate(payload.splitlines(), 1):
        problem = None
        if not line.strip() or line.startswith("#"):
            continue
        if committed:
            problem = "text after COMMIT"
        elif not seen_table:
            seen_table = line == "*filter"
            problem = None if seen_table else "the payload must start with *filter (no other table)"
        elif line == "COMMIT":
            committed = True
        elif line.startswith(":"):
            if not re.fullmatch(r":(PORTGUARD-IN|PORTGUARD-OUT) - \[\d+:\d+\]", line):
                problem = "declares a chain that is not ours"
        elif line.startswith("-A "):
            problem = _iptables_rule_problem(line)
        else:
            problem = "not a line portguard renders"
        if problem:
            raise HostError(f"refused {where} line {number} ({problem}): {line[:120]!r}")
    if payload.strip() and not committed:
        raise HostError(f"refused {where}: it does not end with COMMIT")


def _iptables_rule_problem(line):
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return f"unparsable: {exc}"
    if len(words) < 2 or words[1] not in CHAINS:
        return "appends to a chain that is not ours"
    for index, word in enumerate(words):
        following = words[index + 1] if index + 1 < len(words) else ""
        if word in ("-t", "--table", "-g", "--goto") or word.startswith("--table="):
            return f"{word} is not allowed"
        if word in ("-j", "--jump") and following not in IPTABLES_TARGETS:
            return f"jumps to {following!r}, not one of {sorted(IPTABLES_TARGETS)}"
        if word == "--match-set" and following not in SETS:
            return f"matches set {following!r}, not one of portguard's own sets"
    return None


def check_nft_payload(payload: str, where: str) -> None:
    """Refuse nftables text that does anything outside ``table inet portguard``.

    At the top level only ``table inet portguard``, ``delete table inet portguard`` and that table's
    block; no ``include``. Scanned the way nft's lexer reads it (a quoted string runs to the next quote,
    across lines too; ``#`` starts a comment outside strings), so that a brace, quote or ``#`` in a
    string or comment cannot shift what counts as the top level.
    """
    depth, state = 0, "code"
    tops, codes = [""], [""]  # per line: the text at the top level, and the code outside strings and comments
    for char in payload:
        if char == "\n":
            state = "string" if state == "string" else "code"
            tops.append("")
            codes.append("")
            continue
        if state == "comment":
            continue
        if state == "string":
            state = "code" if char == '"' else "string"
            continue
        if char == "#":
            state = "comment"
            continue
        if char == '"':
            state = "string"
            char = " "
        codes[-1] += char
        if char == "}":
            depth -= 1
        if depth == 0:
            tops[-1] += char
        if char == "{":
            depth += 1
        if depth < 0:
            raise HostError(f"refused {where} line {len(tops)} (unbalanced braces)")
    lines = payload.splitlines()
    for number, (top, code) in enumerate(zip(tops, codes), 1):
        problem = None
        if re.search(r"\binclude\b", code):
            problem = "include is not allowed"
        elif not re.fullmatch(rf"\s*((delete )?table inet {TABLE}|table inet {TABLE} \{{\}}?|\}})?\s*", top):
            problem = f"only table inet {TABLE} may be written"
        if problem:
            raise HostError(f"refused {where} line {number} ({problem}): {lines[number - 1][:120]!r}")
    if depth or state == "string":
        raise HostError(f"refused {where}: unbalanced braces or quotes")


def check_jumps(jumps, where: str) -> None:
    """Only the jumps the renderer makes: INPUT to PORTGUARD-IN, OUTPUT to PORTGUARD-OUT."""
    if not isinstance(jumps, list):
        raise HostError(f"{where} must be a list of [builtin, chain] pairs")
    for index, pair in enumerate(jumps):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and tuple(pair) in
                {(builtin, chain) for chain, builtin in BUILTIN.items()}):
            raise HostError(f"refused {where}[{index}] {pair!r}: only "
                            + ", ".join(f"[{builtin}, {chain}]" for chain, builtin in BUILTIN.items()))
    if len({tuple(pair) for pair in jumps}) != len(jumps):
        raise HostError(f"refused {where}: a jump is listed twice")


def check_ruleset(backend: str, value, where: str) -> None:
    """A ruleset (or fallback) of the form ``backend`` takes, with payloads that touch only what is ours."""
    if backend == "nftables":
        if not isinstance(value, str):
            raise HostError(f"{where} must be the rendered nftables text (a string), not {type(value).__name__}")
        check_nft_payload(value, where)
        return
    if not isinstance(value, dict):
        raise HostError(f"{where} must be a dict with ipv4, ipv6 and jumps (and ipset, sets), "
                        f"not {type(value).__name__}")
    unknown = sorted(set(value) - {"ipv4", "ipv6", "jumps", "ipset", "sets"})
    missing = sorted({"ipv4", "ipv6", "jumps"} - set(value))
    if unknown or missing:
        raise HostError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    for key in ("ipv4", "ipv6", "ipset"):
        if key in value and not isinstance(value[key], str) and not (key == "ipset" and value[key] is None):
            raise HostError(f"{where}.{key} must be a string, not {type(value[key]).__name__}")
    for family in ("ipv4", "ipv6"):
        check_iptables_payload(value[family], f"{where}.{family}")
    check_jumps(value["jumps"], f"{where}.jumps")
    sets = value.get("sets") or []
    if not isinstance(sets, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
            for pair in sets):
        raise HostError(f"{where}.sets must be a list of [name, family] pairs")
    check_ipset_payload(value.get("ipset") or "", [tuple(pair) for pair in sets])


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
            return [[["nft", "delete", "table", "inet", TABLE], None]]
        return [[["nft", "-f", "-"], f"table inet {TABLE}\ndelete table inet {TABLE}\n{snapshot}"]]

    def persist_files(self, ruleset, fallback) -> dict:
        return {"ruleset.nft": ruleset, "fallback.nft": fallback}

    def loader(self, persist_dir=PERSIST_DIR) -> str:
        return (
            "#!/bin/sh\n"
            "# portguard.hardening boot loader: the persisted ruleset, or the management-only fallback.\n"
            f"if nft -f {persist_dir}/ruleset.nft; then exit 0; fi\n"
            "echo 'portguard: persisted ruleset failed to load, loading the management-only fallback' >&2\n"
            f"nft -f {persist_dir}/fallback.nft\n"
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
        return [[["sh", "-c", f"while {tool} -D {BUILTIN[chain]} -j {chain} 2>/dev/null; do :; done; "
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

    def loader(self, persist_dir=PERSIST_DIR) -> str:
        # The fallback is rendered without sets: it loads even where ipset fails.
        return (
            "#!/bin/sh\n"
            "# portguard.hardening boot loader: the persisted sets and rules, or the management-only fallback.\n"
            "load() {\n"
            f"  if [ \"$1\" = ruleset ] && [ -s {persist_dir}/ruleset.ipset ]; then\n"
            "    while read -r name family; do\n"
            "      ipset destroy \"$name-new\" 2>/dev/null\n"
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
            f"while read -r builtin chain; do\n"
            "  for tool in iptables ip6tables; do\n"
            "    $tool -C \"$builtin\" -j \"$chain\" 2>/dev/null || $tool -I \"$builtin\" 1 -j \"$chain\"\n"
            "  done\n"
            f"done < {persist_dir}/jumps\n"
        )


BACKENDS = {"nftables": NftablesBackend, "iptables": IptablesBackend}


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
                    _run_steps(pending["restore"])
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
        confirm persists.
        """
        if state == "present":
            backend.validate(ruleset)
        lock, stale = self._wait_for_pending(timeout + 15, check_mode)
        try:
            live = backend.live()
            before, after = backend.compare(ruleset) if state == "present" else (_lines(live), [])
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
            # The token also tells confirm which change is the latest, the only one it persists.
            _write_atomic(os.path.join(self.state_dir, "applied.json"),
                          json.dumps({"at": time.time(), "token": token, "state": state}), mode=0o644)
            return result if arm else self._persisted(result, persist, check_mode)
        finally:
            lock.close()

    def _missing(self, backend, live, state):
        """Why our table or chains are gone although a confirmed ruleset is persisted (None when not so).

        The persisted files are the evidence: a change that was reverted, never confirmed, was never persisted.
        """
        if state != "present" or live is not None or not any(
                os.path.exists(os.path.join(self.persist_dir, name)) for name in ("ruleset.nft", "jumps")):
            return None
        what = f"table inet {TABLE}" if backend.name == "nftables" else "our chains " + "/".join(CHAINS)
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
            record = {"token": token, "pid": proc.pid, "start": _start_time(proc.pid), "deadline": deadline,
                      "timeout": timeout, "restore": restore}
            _write_atomic(os.path.join(self.state_dir, "pending.json"), json.dumps(record))
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

    def confirm(self, token, persist=None):
        """Disarm the revert of ``token`` and, when it is the latest applied change, persist under the lock.

        A repeated confirm of a confirmed token (its reply was lost) answers "confirmed" again.
        """
        lock = self._locked()
        try:
            pending = self._pending()
            confirmed = self._read_json("confirmed.json").get("tokens", [])
            if pending is not None and pending.get("token") == token:
                os.unlink(os.path.join(self.state_dir, "pending.json"))
                _terminate(pending)
                _write_atomic(os.path.join(self.state_dir, "confirmed.json"),
                              json.dumps({"tokens": [*confirmed, token][-CONFIRMED_KEPT:]}))
                result = {"state": "confirmed"}
            elif token in confirmed:
                result = {"state": "confirmed", "repeated": True}
            else:
                reverted = self.status(token)
                if reverted.get("state") == "reverted":
                    raise HostError(f"too late to confirm: the host already reverted ({reverted['reason']})")
                raise HostError("nothing to confirm: no pending change with this token")
            if persist is not None:
                if self._read_json("applied.json").get("token") == token:
                    result.update(self._persist_reported(persist))
                else:
                    result["persistence"] = {"changed": False,
                                             "skipped": "a later change was applied since; its confirm persists it"}
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
        """Write our files atomically, and the boot unit where systemd runs; True when something changed."""
        if state == "absent":
            # Only the files portguard writes: an admin's file (or directory) in PERSIST_DIR stays.
            paths = [path for path in (*(os.path.join(self.persist_dir, name) for name in PERSIST_FILES),
                                       self.unit_path, self.loader_path) if os.path.isfile(path)]
            if paths and not check_mode:
                if systemd and os.path.exists(self.unit_path):
                    run(["systemctl", "disable", "portguard.service"], check=False)
                for path in paths:
                    os.unlink(path)
                with contextlib.suppress(OSError):  # left where it holds anything else
                    os.rmdir(self.persist_dir)
            return {"changed": bool(paths), "unit": "removed" if paths else "absent"}
        files = {os.path.join(self.persist_dir, name): text for name, text in backend.persist_files(ruleset, fallback).items()}
        files[self.loader_path] = backend.loader(self.persist_dir)
        if systemd:
            files[self.unit_path] = unit_text(self.loader_path)
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
            elif self.unit_path in changed:
                run(["systemctl", "reenable", "portguard.service"])  # an [Install] section of an older unit
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


def _start_time(pid):
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot): with the pid, a process identity."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def _revert_alive(record) -> bool:
    """The revert process of ``record`` runs: same pid, same start time, its token on its command line."""
    pid, start = record.get("pid"), record.get("start")
    if not isinstance(pid, int) or pid <= 0 or not start or _start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return str(record.get("token")).encode() in handle.read().split(b"\0")
    except OSError:
        return False


def _terminate(record):
    """SIGTERM the record's revert process, never a stranger that got its pid."""
    if _revert_alive(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record["pid"], signal.SIGTERM)


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
