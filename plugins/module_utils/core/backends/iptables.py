"""Render one host's policy as iptables-restore / ip6tables-restore payloads.

Contract (see docs/rendering.md): the same semantics as the nftables
renderer, in chains of our own (contract.IPT_CHAINS: one inbound, and one
outbound with egress) of the ``filter`` table, loaded with ``iptables-restore --noflush``
and ``ip6tables-restore --noflush``: declaring the chains flushes and refills
them in one commit, and no other chain is named. The built-in chains only get
a jump to ours, which the host module inserts once (``jumps``). Both families
are always rendered; a family without sources accepts no new connection.

Two variants, chosen by the caller (the firewall action, from what the host
offers):

- ``ipset=True``: the whitelist lives in ipsets (ipset.py, one per direction
  and family, contract.set_name), matched by one rule per chain, so that the
  per-packet cost does not grow with the catalog. The sets must be loaded
  before the chains that reference them. Port ranges wider than
  ``ipset.SET_PORT_SPAN`` ports stay rules next to the set rule.
- ``ipset=False`` (hosts without the ``ipset`` tool or kernel support): one
  rule per distinct source, its ports grouped with ``multiport`` (15 slots
  per rule).

In both, established traffic is accepted first.

Also here, pure like the rendering: normalize_iptables (live text for the diff), the checks of a
payload the host loads as root, and parse_iptables_save (the counters).
"""

import re
import shlex
from dataclasses import dataclass, field

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    DENIED_COUNTERS,
    IPT_BUILTINS,
    IPT_CHAIN_DIRECTIONS,
    IPT_CHAINS,
    IPT_COMMENT_BYTES,
    IPT_FAMILIES,
    IPT_JUMPS,
    IPT_TABLE,
    IPT_TARGETS,
    SETS,
    PayloadRefused,
    default_verdict,
    denied_counter,
    set_name,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.ipset import (
    check_ipset_payload,
    in_set,
    render_ipset,
    rendered_sets,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import HostPolicy
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import rule_text, truncate_utf8

MULTIPORT_SLOTS = 15
COMMENT_BYTES = IPT_COMMENT_BYTES
# The remote end's address and our port: the source for inbound, the destination for outbound.
SET_MATCH = {"in": "src,dst", "out": "dst,dst"}
# The default verdict's target, per family.
VERDICTS = {"accept": {4: "-j ACCEPT", 6: "-j ACCEPT"}, "drop": {4: "-j DROP", 6: "-j DROP"},
            "reject": {4: "-j REJECT --reject-with icmp-admin-prohibited",
                       6: "-j REJECT --reject-with icmp6-adm-prohibited"}}
# ICMP types by number, as iptables-save prints them.
ICMP4 = ("3", "8", "11", "12")
ICMP4_NO_PING = ("3", "11", "12")
ICMP6 = ("1", "2", "3", "4", "128")
ICMP6_NO_PING = ("1", "2", "3", "4")
ND6 = ("133", "134", "135", "136")
MLD6 = ("130", "131", "132", "143")
# Strings that iptables-save prints without quotes (xtables_save_string); anything else is quoted.
_BARE_SAVE_STRING = re.compile(r"[A-Za-z0-9_-]+\Z", re.ASCII)


def _save_string(value: str, what: str) -> str:
    """``value`` as an iptables-restore argument, written as iptables-save writes it, so that they compare equal."""
    rule_text(value, what)
    return value if _BARE_SAVE_STRING.match(value) else f'"{value}"'


@dataclass(frozen=True)
class IptablesRuleset:
    ipv4: str
    ipv6: str
    jumps: tuple[tuple[str, str], ...]  # (built-in chain, our chain)
    ipset: str = ""  # payload for ``ipset restore``; empty for the per-source rules variant
    sets: tuple[tuple[str, str], ...] = field(default=())  # (set, "inet" or "inet6") that ``ipset`` fills

    def as_dict(self) -> dict:
        return {"ipv4": self.ipv4, "ipv6": self.ipv6, "jumps": [list(j) for j in self.jumps],
                "ipset": self.ipset, "sets": [list(s) for s in self.sets]}


def _address_match(entry, direction: str) -> str:
    """The address and protocol part of a rule, in the order iptables-save prints it."""
    cidrs = entry.cidrs()
    if cidrs in (["0.0.0.0/0"], ["::/0"]):
        # iptables-save omits a match on every address; render what it prints, so drift checks compare equal.
        return f"-p {entry.proto}"
    if len(cidrs) == 1:
        return f"{'-s' if direction == 'in' else '-d'} {cidrs[0]} -p {entry.proto}"
    flag = "--src-range" if direction == "in" else "--dst-range"
    return f"-p {entry.proto} -m iprange {flag} {entry.address_text()}"


def _port_chunks(entries):
    """Chunks of at most 15 multiport slots (a range takes two)."""
    chunk, used = [], 0
    for entry in entries:
        cost = 1 if entry.port_lo == entry.port_hi else 2
        if used + cost > MULTIPORT_SLOTS:
            yield chunk
            chunk, used = [], 0
        chunk.append(entry)
        used += cost
    if chunk:
        yield chunk


def _whitelist(chain: str, entries, direction: str) -> list[str]:
    by_source: dict[tuple, list] = {}
    for entry in entries:
        by_source.setdefault((entry.addr_lo, entry.addr_hi, entry.proto), []).append(entry)
    rules = []
    for key in sorted(by_source):
        proto = key[2]
        for chunk in _port_chunks(sorted(by_source[key], key=lambda e: e.port_lo)):
            if len(chunk) == 1:
                ports = f"-m {proto} --dport {chunk[0].port_text(':')}"
            else:
                ports = f"-m multiport --dports {','.join(e.port_text(':') for e in chunk)}"
            comment = truncate_utf8("; ".join(dict.fromkeys(label.text() for e in chunk for label in e.labels)), COMMENT_BYTES)
            rules.append(f"-A {chain} {_address_match(chunk[0], direction)} {ports} "
                         f"-m comment --comment {_save_string(comment, 'a comment')} -j ACCEPT")
    return rules


def _chain_rules(policy: HostPolicy, family: int, direction: str, ipset: bool) -> list[str]:
    settings = policy.settings
    chain = IPT_CHAINS[direction]
    iface = "-i lo" if direction == "in" else "-o lo"
    rules = [f"-A {chain} {iface} -j ACCEPT"]
    if family == 6:
        rules += [f"-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq 255 -j ACCEPT" for t in ND6]
        mld_match = "-s fe80::/10" if direction == "in" else "-d ff02::/16"
        rules += [f"-A {chain} {mld_match} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in MLD6]
    rules += [
        f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A {chain} -m conntrack --ctstate INVALID -j DROP",
    ]
    if family == 4:
        types = ICMP4 if settings.allow_ping else ICMP4_NO_PING
        rules += [f"-A {chain} -p icmp -m icmp --icmp-type {t} -j ACCEPT" for t in types]
    else:
        types = ICMP6 if settings.allow_ping else ICMP6_NO_PING
        rules += [f"-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in types]
    pool = [e for e in (policy.ingress if direction == "in" else policy.egress) if e.family == family]
    if ipset:
        rules.append(f"-A {chain} -m set --match-set {set_name(direction, family)} {SET_MATCH[direction]} -j ACCEPT")
        pool = [e for e in pool if not in_set(e)]
    rules += _whitelist(chain, pool, direction)
    burst = f" --limit-burst {settings.log_burst}" if settings.log_burst != 5 else ""
    rules.append(f"-A {chain} -m limit --limit {settings.log_rate}/min{burst} "
                 f"-j LOG --log-prefix {_save_string(settings.log_prefix, 'the log prefix')} --log-level 6")
    rules.append(f"-A {chain} -m comment --comment {denied_counter(direction)} "
                 f"{VERDICTS[default_verdict(settings)][family]}")
    return rules


def _payload(policy: HostPolicy, family: int, directions, ipset: bool) -> str:
    lines = [f"# portguard.hardening IPv{family} chains for {rule_text(policy.host, 'the host name')}; generated, do not edit",
             f"*{IPT_TABLE}"]
    lines += [f":{IPT_CHAINS[d]} - [0:0]" for d in directions]
    for direction in directions:
        lines += _chain_rules(policy, family, direction, ipset)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_iptables(policy: HostPolicy, ipset: bool = False) -> IptablesRuleset:
    """Payloads for ``iptables-restore --noflush`` and ``ip6tables-restore --noflush`` (and ``ipset restore``).

    ``ipset`` selects the set variant; the per-source rules are the fallback for
    hosts without ipset.
    """
    directions = ("in", "out") if policy.settings.egress else ("in",)
    return IptablesRuleset(
        ipv4=_payload(policy, 4, directions, ipset),
        ipv6=_payload(policy, 6, directions, ipset),
        jumps=tuple((IPT_BUILTINS[d], IPT_CHAINS[d]) for d in directions),
        ipset=render_ipset(policy, directions) if ipset else "",
        sets=rendered_sets(directions) if ipset else (),
    )


# Reading back -------------------------------------------------------------------------------

_SAVE_RE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")
_LOG_SAVE_RE = re.compile(r"-j LOG\b")
_COMMENT_RE = re.compile(r'--comment (?:"([^"]*)"|(\S+))')
_DECLARE_RE = re.compile("|".join(rf":{re.escape(chain)} - \[\d+:\d+\]" for chain in IPT_JUMPS))


def normalize_iptables(save_output: str) -> list[str]:
    """Our chains (declarations, jumps to them, their rules in order) from ``iptables-save`` or a payload."""
    declared, jumps, rules = set(), set(), {chain: [] for chain in IPT_JUMPS}
    for line in save_output.splitlines():
        line = line.strip()
        for chain, builtin in IPT_JUMPS.items():
            if line.startswith(f":{chain} "):
                declared.add(f":{chain}")
            elif line == f"-A {builtin} -j {chain}":
                jumps.add(line)
            elif line.startswith(f"-A {chain} "):
                rules[chain].append(line)
    return [*sorted(declared), *sorted(jumps), *(line for chain in IPT_JUMPS for line in rules[chain])]


def holds_ours(save_output: str) -> bool:
    """Whether an ``iptables-save`` text names one of our chains."""
    return any(chain in save_output for chain in IPT_JUMPS)


def restore_payload(normalized) -> tuple[str, list[tuple[str, str]]]:
    """From normalize_iptables lines: the payload that declares and fills our chains, and the (builtin, chain) jumps."""
    chains = [line for line in normalized if line.startswith(":")]
    rules = [line for line in normalized if line.split(" ")[:2] in (["-A", chain] for chain in IPT_JUMPS)]
    jumps = [tuple(line.split(" ")[1::2]) for line in normalized if line.startswith("-A ") and line not in rules]
    payload = "\n".join([f"*{IPT_TABLE}", *[f"{c} - [0:0]" for c in chains], *rules, "COMMIT"]) + "\n"
    return payload, jumps


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
            seen_table = line == f"*{IPT_TABLE}"
            problem = None if seen_table else f"the payload must start with *{IPT_TABLE} (no other table)"
        elif line == "COMMIT":
            committed = True
        elif line.startswith(":"):
            if not _DECLARE_RE.fullmatch(line):
                problem = "declares a chain that is not ours"
        elif line.startswith("-A "):
            problem = _iptables_rule_problem(line)
        else:
            problem = "not a line portguard renders"
        if problem:
            raise PayloadRefused(f"refused {where} line {number} ({problem}): {line[:120]!r}")
    if payload.strip() and not committed:
        raise PayloadRefused(f"refused {where}: it does not end with COMMIT")


def _iptables_rule_problem(line):
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return f"unparsable: {exc}"
    if len(words) < 2 or words[1] not in IPT_JUMPS:
        return "appends to a chain that is not ours"
    for index, word in enumerate(words):
        following = words[index + 1] if index + 1 < len(words) else ""
        if word in ("-t", "--table", "-g", "--goto") or word.startswith("--table="):
            return f"{word} is not allowed"
        if word in ("-j", "--jump") and following not in IPT_TARGETS:
            return f"jumps to {following!r}, not one of {sorted(IPT_TARGETS)}"
        if word == "--match-set" and following not in SETS:
            return f"matches set {following!r}, not one of portguard's own sets"
    return None


def check_jumps(jumps, where: str) -> None:
    """Only the jumps the renderer makes: from each built-in chain to our chain of its direction (IPT_JUMPS)."""
    if not isinstance(jumps, list):
        raise PayloadRefused(f"{where} must be a list of [builtin, chain] pairs")
    for index, pair in enumerate(jumps):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and tuple(pair) in
                {(builtin, chain) for chain, builtin in IPT_JUMPS.items()}):
            raise PayloadRefused(f"refused {where}[{index}] {pair!r}: only "
                                 + ", ".join(f"[{builtin}, {chain}]" for chain, builtin in IPT_JUMPS.items()))
    if len({tuple(pair) for pair in jumps}) != len(jumps):
        raise PayloadRefused(f"refused {where}: a jump is listed twice")


def check_iptables_ruleset(value, where: str) -> None:
    """A ruleset (or fallback) dict as render_iptables(...).as_dict() makes it, touching only what is ours."""
    if not isinstance(value, dict):
        raise PayloadRefused(f"{where} must be a dict with ipv4, ipv6 and jumps (and ipset, sets), "
                             f"not {type(value).__name__}")
    unknown = sorted(set(value) - {"ipv4", "ipv6", "jumps", "ipset", "sets"})
    missing = sorted({"ipv4", "ipv6", "jumps"} - set(value))
    if unknown or missing:
        raise PayloadRefused(f"{where}: unknown keys {unknown}, missing keys {missing}")
    for key in ("ipv4", "ipv6", "ipset"):
        if key in value and not isinstance(value[key], str) and not (key == "ipset" and value[key] is None):
            raise PayloadRefused(f"{where}.{key} must be a string, not {type(value[key]).__name__}")
    for family in IPT_FAMILIES.values():
        check_iptables_payload(value[family], f"{where}.{family}")
    check_jumps(value["jumps"], f"{where}.jumps")
    sets = value.get("sets") or []
    if not isinstance(sets, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
            for pair in sets):
        raise PayloadRefused(f"{where}.sets must be a list of [name, family] pairs")
    check_ipset_payload(value.get("ipset") or "", [tuple(pair) for pair in sets])


def parse_iptables_save(texts: dict) -> dict:
    """Counters from ``iptables-save -c`` / ``ip6tables-save -c`` of the filter table, per family."""
    result = {"backend": "iptables", "denied_in": None, "denied_out": None, "logged_in": None, "logged_out": None,
              "elements": []}
    for family, text in sorted(texts.items()):
        for line in text.splitlines():
            match = _SAVE_RE.match(line.strip())
            if not match or match.group(3) not in IPT_CHAIN_DIRECTIONS:
                continue
            packets, size, chain, rule = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
            comment_match = _COMMENT_RE.search(rule)
            comment = (comment_match.group(1) or comment_match.group(2)) if comment_match else ""
            if comment in DENIED_COUNTERS:
                result[comment] = (result[comment] or 0) + packets
            elif _LOG_SAVE_RE.search(rule):
                key = f"logged_{IPT_CHAIN_DIRECTIONS[chain]}"
                result[key] = (result[key] or 0) + packets
            elif "-j ACCEPT" in rule and comment:
                result["elements"].append({"set": f"{chain}/{family}", "addresses": rule.split(" -p ")[0],
                                           "ports": rule, "comment": comment, "packets": packets, "bytes": size})
    return result
