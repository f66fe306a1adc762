"""Render one host's policy as an nftables ruleset.

Contract (see docs/rendering.md):

- one ``inet`` table, ``portguard``, replaced in one transaction (declare,
  delete, define: the kernel swaps it atomically); no other table is named;
- stateful: loopback, neighbour discovery, established/related first, invalid
  dropped, then the ICMP that IPv4/IPv6 need;
- the whitelist lives in four named interval sets per direction
  (``in4_tcp``, ``in4_udp``, ``in6_tcp``, ``in6_udp``) of concatenated
  ``address . port`` elements with per-element counters and comments, so the
  number of rules does not depend on the catalog;
- default verdict: a counted, rate-limited log rule, then ``reject with icmpx
  admin-prohibited`` or ``drop`` (``enforce``) or ``accept`` (``audit``),
  counted in the named counter ``denied_in`` / ``denied_out``;
- an empty set matches nothing: a family without sources gets no access,
  never a port-only rule.

Rules are written in the form ``nft list`` prints them, so that a live table
can be compared with the rendered one line by line (drift detection).
"""

from ansible_collections.portguard.hardening.plugins.module_utils.policy import HostPolicy
from ansible_collections.portguard.hardening.plugins.module_utils.validate import truncate_utf8

TABLE = "portguard"
FAMILY_KEYWORDS = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}
ICMP4 = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMP6 = ("destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem")
ND6 = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")
MLD6 = ("mld-listener-query", "mld-listener-report", "mld-listener-done", "mld2-listener-report")


def set_name(direction: str, family: int, proto: str) -> str:
    return f"{direction}{family}_{proto}"


def element_comment(entry) -> str:
    return truncate_utf8("; ".join(label.text() for label in entry.labels))


def _set_lines(name: str, family: int, entries) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {FAMILY_KEYWORDS[family][1]} . inet_service", "\t\tflags interval", "\t\tcounter"]
    if entries:
        elements = [f'{e.address_text()} . {e.port_text()} counter comment "{element_comment(e)}"' for e in entries]
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(elements) + " }")
    lines.append("\t}")
    return lines


def chain_rules(policy: HostPolicy, direction: str) -> list[str]:
    """The rules of the ``input`` (``in``) or ``output`` (``out``) chain, as ``nft list`` prints them."""
    settings = policy.settings
    iface, addr = ("iif", "saddr") if direction == "in" else ("oif", "daddr")
    nd = ", ".join(ND6)
    rules = [
        f'{iface} "lo" accept',
        f"icmpv6 type {{ {nd} }} ip6 hoplimit 255 accept",
        f"ip6 {addr} fe80::/10 icmpv6 type {{ {', '.join(MLD6)} }} accept" if direction == "in"
        else f"ip6 daddr ff02::/16 icmpv6 type {{ {', '.join(MLD6)} }} accept",
        "ct state established,related accept",
        "ct state invalid counter drop",
    ]
    ping4 = ("echo-request",) if settings.allow_ping else ()
    ping6 = ("echo-request",) if settings.allow_ping else ()
    rules.append(f"icmp type {{ {', '.join(ICMP4[:1] + ping4 + ICMP4[1:])} }} accept" if ping4
                 else f"icmp type {{ {', '.join(ICMP4)} }} accept")
    rules.append(f"icmpv6 type {{ {', '.join(ICMP6 + ping6)} }} accept")
    for family in (4, 6):
        keyword = FAMILY_KEYWORDS[family][0]
        for proto in ("tcp", "udp"):
            rules.append(f"{keyword} {addr} . {proto} dport @{set_name(direction, family, proto)} accept")
    burst = f" burst {settings.log_burst} packets" if settings.log_burst != 5 else ""
    prefix = settings.log_prefix
    rules.append(f'limit rate {settings.log_rate}/minute{burst} counter log prefix "{prefix}" level info')
    counter = f'counter name "denied_{direction}"'
    if settings.mode == "audit":
        rules.append(f"{counter} accept")
    elif settings.deny == "drop":
        rules.append(f"{counter} drop")
    else:
        rules.append(f"{counter} reject with icmpx admin-prohibited")
    return rules


def render_nftables(policy: HostPolicy) -> str:
    """The ``nft -f`` input that atomically replaces the ``inet portguard`` table."""
    directions = ["in", "out"] if policy.settings.egress else ["in"]
    lines = [
        f"# portguard.hardening ruleset for {policy.host}; generated, do not edit",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
    ]
    for direction in directions:
        lines += [f"\tcounter denied_{direction} {{", "\t}", ""]
    for direction in directions:
        pool = policy.ingress if direction == "in" else policy.egress
        for family in (4, 6):
            for proto in ("tcp", "udp"):
                entries = [e for e in pool if e.family == family and e.proto == proto]
                lines += _set_lines(set_name(direction, family, proto), family, entries)
                lines.append("")
    for direction in directions:
        chain, hook = ("input", "input") if direction == "in" else ("output", "output")
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\ttype filter hook {hook} priority filter; policy accept;")
        lines += [f"\t\t{rule}" for rule in chain_rules(policy, direction)]
        lines.append("\t}")
        lines.append("")
    if lines[-1] == "":
        lines.pop()
    lines.append("}")
    return "\n".join(lines) + "\n"
