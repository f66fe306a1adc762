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

from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import HostPolicy, interval_text
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    MAX_TEXT_BYTES,
    rule_text,
    truncate_utf8,
)

TABLE = "portguard"
FAMILY_KEYWORDS = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}
ICMP4 = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMP6 = ("destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem")
ND6 = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")
MLD6 = ("mld-listener-query", "mld-listener-report", "mld-listener-done", "mld2-listener-report")
COMMENT_BYTES = MAX_TEXT_BYTES  # nft refuses a longer comment ("comment too long, 128 characters maximum")


def set_name(direction: str, family: int, proto: str) -> str:
    return f"{direction}{family}_{proto}"


def element_comment(entry) -> str:
    return rule_text(truncate_utf8("; ".join(label.text() for label in entry.labels), COMMENT_BYTES), "a comment")


def _set_lines(name: str, family: int, entries) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {FAMILY_KEYWORDS[family][1]} . inet_service", "\t\tflags interval", "\t\tcounter"]
    if entries:
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(_elements(entries)) + " }")
    lines.append("\t}")
    return lines


def _elements(entries) -> list[str]:
    """``address . port counter comment "..."`` of each entry: the bulk of a big ruleset, so written inline."""
    comments: dict[int, str] = {}  # by id of the labels tuple: entries of one flow and service share theirs
    elements = []
    append = elements.append
    for entry in entries:
        fields = entry.__dict__
        # Not stored on the entry: the set text is kept instead (_SETS_CACHE).
        address = fields.get("_address_text") or interval_text(fields["family"], fields["addr_lo"], fields["addr_hi"])
        labels = fields["labels"]
        comment = comments.get(id(labels))
        if comment is None:
            comment = comments[id(labels)] = element_comment(entry)
        port_lo, port_hi = fields["port_lo"], fields["port_hi"]
        port = str(port_lo) if port_lo == port_hi else f"{port_lo}-{port_hi}"
        append(f'{address} . {port} counter comment "{comment}"')
    return elements


# Hosts with the same flows share one ``ingress`` tuple (see catalog.build), so their sets are the
# same text: rendered once per tuple. Keyed by identity, the tuple itself kept in the value so that
# its id cannot be reused while cached; bounded like catalog._COMPILED.
_SETS_CACHE: dict[tuple[str, int], tuple[tuple, list[str]]] = {}
_SETS_CACHE_MAX = 256


def _direction_sets(direction: str, pool) -> list[str]:
    """The four sets of one direction, each followed by an empty line."""
    key = (direction, id(pool))
    cached = _SETS_CACHE.get(key)
    if cached is not None and cached[0] is pool:
        return cached[1]
    buckets: dict[tuple[int, str], list] = {(4, "tcp"): [], (4, "udp"): [], (6, "tcp"): [], (6, "udp"): []}
    for entry in pool:
        bucket = buckets.get((entry.family, entry.proto))
        if bucket is not None:
            bucket.append(entry)
    lines = []
    for (family, proto), entries in buckets.items():
        lines += _set_lines(set_name(direction, family, proto), family, entries)
        lines.append("")
    if isinstance(pool, tuple):  # immutable: safe to reuse the text while the tuple is alive
        if len(_SETS_CACHE) >= _SETS_CACHE_MAX:
            _SETS_CACHE.clear()
        _SETS_CACHE[key] = (pool, lines)
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
    prefix = rule_text(settings.log_prefix, "the log prefix")
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
        f"# portguard.hardening ruleset for {rule_text(policy.host, 'the host name')}; generated, do not edit",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
    ]
    for direction in directions:
        lines += [f"\tcounter denied_{direction} {{", "\t}", ""]
    for direction in directions:
        lines += _direction_sets(direction, policy.ingress if direction == "in" else policy.egress)
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
