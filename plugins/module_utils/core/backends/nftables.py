"""Render one host's policy as an nftables ruleset.

Contract (see docs/rendering.md):

- one ``inet`` table (contract.NFT_TABLE_REF), replaced in one transaction (declare,
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
can be compared with the rendered one line by line (drift detection):
normalize_nft, next to check_nft_payload (what the host loads as root) and
parse_nft_json (the counters), all pure.
"""

import json
import re

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    DENIED_COUNTERS,
    DIRECTIONS,
    FAMILIES,
    NFT_ADDRESS_TYPES,
    NFT_CHAIN_DIRECTIONS,
    NFT_CHAINS,
    NFT_COMMENT_BYTES,
    NFT_SET_KEYS,
    NFT_TABLE_REF,
    PROTOCOLS,
    PayloadRefused,
    default_verdict,
    denied_counter,
    nft_set_name,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import interval_text
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import HostPolicy
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import rule_text, truncate_utf8

ICMP4 = ("destination-unreachable", "time-exceeded", "parameter-problem")
ICMP6 = ("destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem")
ND6 = ("nd-router-solicit", "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")
MLD6 = ("mld-listener-query", "mld-listener-report", "mld-listener-done", "mld2-listener-report")
VERDICTS = {"accept": "accept", "drop": "drop", "reject": "reject with icmpx admin-prohibited"}


def element_comment(entry) -> str:
    return rule_text(truncate_utf8("; ".join(label.text() for label in entry.labels), NFT_COMMENT_BYTES), "a comment")


def _set_lines(name: str, family: int, entries) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {NFT_ADDRESS_TYPES[family][1]} . inet_service", "\t\tflags interval", "\t\tcounter"]
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
# its id cannot be reused while cached; bounded in size.
_SETS_CACHE: dict[tuple[str, int], tuple[tuple, list[str]]] = {}
_SETS_CACHE_MAX = 256


def _direction_sets(direction: str, pool) -> list[str]:
    """The four sets of one direction, each followed by an empty line."""
    key = (direction, id(pool))
    cached = _SETS_CACHE.get(key)
    if cached is not None and cached[0] is pool:
        return cached[1]
    buckets: dict[tuple[int, str], list] = {(family, proto): [] for family in FAMILIES for proto in PROTOCOLS}
    for entry in pool:
        bucket = buckets.get((entry.family, entry.proto))
        if bucket is not None:
            bucket.append(entry)
    lines = []
    for (family, proto), entries in buckets.items():
        lines += _set_lines(nft_set_name(direction, family, proto), family, entries)
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
    for family in FAMILIES:
        keyword = NFT_ADDRESS_TYPES[family][0]
        for proto in PROTOCOLS:
            rules.append(f"{keyword} {addr} . {proto} dport @{nft_set_name(direction, family, proto)} accept")
    burst = f" burst {settings.log_burst} packets" if settings.log_burst != 5 else ""
    prefix = rule_text(settings.log_prefix, "the log prefix")
    rules.append(f'limit rate {settings.log_rate}/minute{burst} counter log prefix "{prefix}" level info')
    rules.append(f'counter name "{denied_counter(direction)}" {VERDICTS[default_verdict(settings)]}')
    return rules


def render_nftables(policy: HostPolicy) -> str:
    """The ``nft -f`` input that atomically replaces our table."""
    directions = list(DIRECTIONS) if policy.settings.egress else ["in"]
    lines = [
        f"# portguard.hardening ruleset for {rule_text(policy.host, 'the host name')}; generated, do not edit",
        f"table {NFT_TABLE_REF}",
        f"delete table {NFT_TABLE_REF}",
        f"table {NFT_TABLE_REF} {{",
    ]
    for direction in directions:
        lines += [f"\tcounter {denied_counter(direction)} {{", "\t}", ""]
    for direction in directions:
        lines += _direction_sets(direction, policy.ingress if direction == "in" else policy.egress)
    for direction in directions:
        chain = hook = NFT_CHAINS[direction]
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\ttype filter hook {hook} priority filter; policy accept;")
        lines += [f"\t\t{rule}" for rule in chain_rules(policy, direction)]
        lines.append("\t}")
        lines.append("")
    if lines[-1] == "":
        lines.pop()
    lines.append("}")
    return "\n".join(lines) + "\n"


# Reading back -------------------------------------------------------------------------------

_COUNTER_RE = re.compile(r"\s*counter packets \d+ bytes \d+")
_ELEMENTS_RE = re.compile(r"elements = \{(.*?)\}", re.S)
_TOP_RE = re.compile(rf"\s*((delete )?table {NFT_TABLE_REF}|table {NFT_TABLE_REF} \{{\}}?|\}})?\s*")


def normalize_nft(text) -> list[str]:
    """A table listing (or a rendered ruleset) as comparable lines: no counter values, elements sorted."""
    if not text:
        return []
    body = text
    start = body.find(f"table {NFT_TABLE_REF} {{")
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


def check_nft_payload(payload: str, where: str) -> None:
    """Refuse nftables text that does anything outside our table.

    At the top level only the declaration of our table (NFT_TABLE_REF), its deletion and its block;
    no ``include``. Scanned the way nft's lexer reads it (a quoted string runs to the next quote,
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
            raise PayloadRefused(f"refused {where} line {len(tops)} (unbalanced braces)")
    lines = payload.splitlines()
    for number, (top, code) in enumerate(zip(tops, codes), 1):
        problem = None
        if re.search(r"\binclude\b", code):
            problem = "include is not allowed"
        elif not _TOP_RE.fullmatch(top):
            problem = f"only table {NFT_TABLE_REF} may be written"
        if problem:
            raise PayloadRefused(f"refused {where} line {number} ({problem}): {lines[number - 1][:120]!r}")
    if depth or state == "string":
        raise PayloadRefused(f"refused {where}: unbalanced braces or quotes")


def check_nft_ruleset(value, where: str) -> None:
    """A ruleset (or fallback) as render_nftables makes it: text that touches only our table."""
    if not isinstance(value, str):
        raise PayloadRefused(f"{where} must be the rendered nftables text (a string), not {type(value).__name__}")
    check_nft_payload(value, where)


def _value_text(value) -> str:
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{_value_text(low)}-{_value_text(high)}"
    return str(value)


def parse_nft_json(text: str) -> dict:
    """Counters from ``nft -j list table`` of our table."""
    result = {"backend": "nftables", "denied_in": None, "denied_out": None, "logged_in": None, "logged_out": None,
              "elements": []}
    for item in json.loads(text).get("nftables", []):
        if "counter" in item and item["counter"].get("name", "") in DENIED_COUNTERS:
            result[item["counter"]["name"]] = item["counter"]["packets"]
        if "rule" in item:
            # The log rule's own counter sits after the limit: it counts the lines the kernel was asked to write.
            exprs = item["rule"].get("expr", [])
            direction = NFT_CHAIN_DIRECTIONS.get(item["rule"].get("chain"))
            if direction and any("log" in expr for expr in exprs):
                for expr in exprs:
                    if isinstance(expr.get("counter"), dict):
                        result[f"logged_{direction}"] = (result[f"logged_{direction}"] or 0) + expr["counter"]["packets"]
        if "set" in item and item["set"].get("name") in NFT_SET_KEYS:
            for element in item["set"].get("elem", []):
                body = element.get("elem", element)
                concat = body.get("val", {}).get("concat", [None, None])
                counter = body.get("counter", {})
                result["elements"].append({
                    "set": item["set"]["name"],
                    "addresses": _value_text(concat[0]),
                    "ports": _value_text(concat[1]),
                    "comment": body.get("comment", ""),
                    "packets": counter.get("packets", 0),
                    "bytes": counter.get("bytes", 0),
                })
    return result
