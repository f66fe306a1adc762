"""Render one host's policy as iptables-restore / ip6tables-restore payloads.

Contract (see docs/rendering.md): the same semantics as the nftables
renderer, in chains of our own (``PORTGUARD-IN``, and ``PORTGUARD-OUT`` with
egress) of the ``filter`` table, loaded with ``iptables-restore --noflush``
and ``ip6tables-restore --noflush``: declaring the chains flushes and refills
them in one commit, and no other chain is named. The built-in chains only get
a jump to ours, which the host module inserts once (``jumps``). Both families
are always rendered; a family without sources accepts no new connection.

Per-packet cost: established traffic is accepted first, and the ports of one
source are grouped with ``multiport`` (15 slots per rule), so that a rule
stands for a source, not for one of its ports.
"""

from dataclasses import dataclass

from ansible_collections.portguard.hardening.plugins.module_utils.policy import HostPolicy
from ansible_collections.portguard.hardening.plugins.module_utils.validate import truncate_utf8

CHAINS = {"in": "PORTGUARD-IN", "out": "PORTGUARD-OUT"}
BUILTIN = {"in": "INPUT", "out": "OUTPUT"}
MULTIPORT_SLOTS = 15
COMMENT_BYTES = 256
# ICMP types by number, as iptables-save prints them.
ICMP4 = ("3", "8", "11", "12")
ICMP4_NO_PING = ("3", "11", "12")
ICMP6 = ("1", "2", "3", "4", "128")
ICMP6_NO_PING = ("1", "2", "3", "4")
ND6 = ("133", "134", "135", "136")
MLD6 = ("130", "131", "132", "143")


@dataclass(frozen=True)
class IptablesRuleset:
    ipv4: str
    ipv6: str
    jumps: tuple[tuple[str, str], ...]  # (built-in chain, our chain)

    def as_dict(self) -> dict:
        return {"ipv4": self.ipv4, "ipv6": self.ipv6, "jumps": [list(j) for j in self.jumps]}


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
            rules.append(f'-A {chain} {_address_match(chunk[0], direction)} {ports} '
                         f'-m comment --comment "{comment}" -j ACCEPT')
    return rules


def _chain_rules(policy: HostPolicy, family: int, direction: str) -> list[str]:
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
    pool = policy.ingress if direction == "in" else policy.egress
    rules += _whitelist(chain, [e for e in pool if e.family == family], direction)
    burst = f" --limit-burst {settings.log_burst}" if settings.log_burst != 5 else ""
    rules.append(f"-A {chain} -m limit --limit {settings.log_rate}/min{burst} "
                 f'-j LOG --log-prefix "{settings.log_prefix}" --log-level 6')
    counted = f"-A {chain} -m comment --comment denied_{direction}"
    if settings.mode == "audit":
        rules.append(f"{counted} -j ACCEPT")
    elif settings.deny == "drop":
        rules.append(f"{counted} -j DROP")
    else:
        reject = "icmp-admin-prohibited" if family == 4 else "icmp6-adm-prohibited"
        rules.append(f"{counted} -j REJECT --reject-with {reject}")
    return rules


def _payload(policy: HostPolicy, family: int, directions) -> str:
    lines = [f"# portguard.hardening IPv{family} chains for {policy.host}; generated, do not edit", "*filter"]
    lines += [f":{CHAINS[d]} - [0:0]" for d in directions]
    for direction in directions:
        lines += _chain_rules(policy, family, direction)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_iptables(policy: HostPolicy) -> IptablesRuleset:
    """Payloads for ``iptables-restore --noflush`` and ``ip6tables-restore --noflush``."""
    directions = ("in", "out") if policy.settings.egress else ("in",)
    return IptablesRuleset(
        ipv4=_payload(policy, 4, directions),
        ipv6=_payload(policy, 6, directions),
        jumps=tuple((BUILTIN[d], CHAINS[d]) for d in directions),
    )
