"""Render one host's policy as iptables-restore / ip6tables-restore payloads.

Contract (see docs/rendering.md): the same semantics as the nftables
renderer, in chains of our own (``PORTGUARD-IN``, and ``PORTGUARD-OUT`` with
egress) of the ``filter`` table, loaded with ``iptables-restore --noflush``
and ``ip6tables-restore --noflush``: declaring the chains flushes and refills
them in one commit, and no other chain is named. The built-in chains only get
a jump to ours, which the host module inserts once (``jumps``). Both families
are always rendered; a family without sources accepts no new connection.

Two variants, chosen by the caller (the firewall action, from what the host
offers):

- ``ipset=True``: the whitelist lives in ipsets of type ``hash:net,port``
  (``portguard-in4``/``-in6``, and ``-out4``/``-out6`` with egress), with
  per-element counters and comments, matched by one rule per chain, so that
  the per-packet cost does not grow with the catalog. The ``ipset`` payload
  (for ``ipset restore``) fills ``<set>-new`` and swaps it with the live set,
  which must exist first (the host module creates it when absent) and must
  be loaded before the chains that reference it. ipset stores a port range
  as one element per port: ranges wider than ``SET_PORT_SPAN`` ports stay
  rules next to the set rule.
- ``ipset=False`` (hosts without the ``ipset`` tool or kernel support): one
  rule per distinct source, its ports grouped with ``multiport`` (15 slots
  per rule).

In both, established traffic is accepted first.
"""

import re
from dataclasses import dataclass, field

from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import HostPolicy
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import rule_text, truncate_utf8

CHAINS = {"in": "PORTGUARD-IN", "out": "PORTGUARD-OUT"}
BUILTIN = {"in": "INPUT", "out": "OUTPUT"}
MULTIPORT_SLOTS = 15
# xt_comment holds 256 bytes with the terminating NUL: iptables keeps 255 and cuts the rest (inside a
# character, too), so a longer rendered comment would differ from the live one on every run.
COMMENT_BYTES = 255
# Sets by (direction, family); the host module refuses any other name.
SETS = {("in", 4): "portguard-in4", ("in", 6): "portguard-in6", ("out", 4): "portguard-out4", ("out", 6): "portguard-out6"}
SET_FAMILY = {4: "inet", 6: "inet6"}
SET_TYPE = "hash:net,port"
SET_COMMENT_BYTES = 255  # ipset refuses a longer element comment ("longer than the maximum allowed 255")
SET_PORT_SPAN = 64  # ports per entry at most in a set (one element per port); wider ranges stay rules
SET_MAXELEM = 65536  # ipset's default; raised to the next power of two for more elements
# The remote end's address and our port: the source for inbound, the destination for outbound.
SET_MATCH = {"in": "src,dst", "out": "dst,dst"}
# hash:net refuses a /0: "any" is stored as its two halves.
_HALVES = {"0.0.0.0/0": ("0.0.0.0/1", "128.0.0.0/1"), "::/0": ("::/1", "8000::/1")}
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


def in_set(entry) -> bool:
    """Whether ``entry`` goes into the set (ipset variant) rather than into a rule of its own."""
    return entry.port_hi - entry.port_lo < SET_PORT_SPAN


def _set_address(cidr: str) -> tuple[str, ...]:
    """A CIDR as ``ipset save`` prints it: hosts without a prefix length, /0 as two halves."""
    if cidr in _HALVES:
        return _HALVES[cidr]
    address, length = cidr.split("/")
    if length == ("32" if "." in address else "128"):
        return (address,)
    return (cidr,)


def set_elements(entries) -> list[str]:
    """``add`` arguments (without the set name) for the entries that go into a set, in a stable order."""
    elements = []
    for entry in sorted((e for e in entries if in_set(e)), key=lambda e: (e.addr_lo, e.addr_hi, e.proto, e.port_lo)):
        comment = rule_text(truncate_utf8("; ".join(dict.fromkeys(label.text() for label in entry.labels)),
                                          SET_COMMENT_BYTES), "a comment")
        port = f"{entry.proto}:{entry.port_text('-')}"
        elements += [f'{address},{port} comment "{comment}"'
                     for cidr in entry.cidrs() for address in _set_address(cidr)]
    return elements


def set_size(entries) -> int:
    """Elements in the kernel: ipset stores one per port of a range."""
    return sum(len(_set_address(c)) * (e.port_hi - e.port_lo + 1) for e in entries if in_set(e) for c in e.cidrs())


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _set_payload(policy: HostPolicy, directions) -> str:
    lines = [f"# portguard.hardening ipsets for {rule_text(policy.host, 'the host name')}; generated, do not edit"]
    for direction in directions:
        pool = policy.ingress if direction == "in" else policy.egress
        for family in (4, 6):
            name, entries = SETS[(direction, family)], [e for e in pool if e.family == family]
            size = set_size(entries)
            # hashsize only sizes the first table (the kernel grows it); maxelem is a hard limit.
            lines.append(f"create {name}-new {SET_TYPE} family {SET_FAMILY[family]} hashsize {max(64, _pow2(size // 4))} "
                         f"maxelem {max(SET_MAXELEM, _pow2(size))} counters comment")
            lines += [f"add {name}-new {element}" for element in set_elements(entries)]
            lines += [f"swap {name}-new {name}", f"destroy {name}-new"]
    return "\n".join(lines) + "\n"


def _chain_rules(policy: HostPolicy, family: int, direction: str, ipset: bool) -> list[str]:
    settings = policy.settings
    chain = CHAINS[direction]
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
        rules.append(f"-A {chain} -m set --match-set {SETS[(direction, family)]} {SET_MATCH[direction]} -j ACCEPT")
        pool = [e for e in pool if not in_set(e)]
    rules += _whitelist(chain, pool, direction)
    burst = f" --limit-burst {settings.log_burst}" if settings.log_burst != 5 else ""
    rules.append(f"-A {chain} -m limit --limit {settings.log_rate}/min{burst} "
                 f"-j LOG --log-prefix {_save_string(settings.log_prefix, 'the log prefix')} --log-level 6")
    counted = f"-A {chain} -m comment --comment denied_{direction}"
    if settings.mode == "audit":
        rules.append(f"{counted} -j ACCEPT")
    elif settings.deny == "drop":
        rules.append(f"{counted} -j DROP")
    else:
        reject = "icmp-admin-prohibited" if family == 4 else "icmp6-adm-prohibited"
        rules.append(f"{counted} -j REJECT --reject-with {reject}")
    return rules


def _payload(policy: HostPolicy, family: int, directions, ipset: bool) -> str:
    lines = [f"# portguard.hardening IPv{family} chains for {rule_text(policy.host, 'the host name')}; generated, do not edit",
             "*filter"]
    lines += [f":{CHAINS[d]} - [0:0]" for d in directions]
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
        jumps=tuple((BUILTIN[d], CHAINS[d]) for d in directions),
        ipset=_set_payload(policy, directions) if ipset else "",
        sets=tuple((SETS[(d, f)], SET_FAMILY[f]) for d in directions for f in (4, 6)) if ipset else (),
    )
