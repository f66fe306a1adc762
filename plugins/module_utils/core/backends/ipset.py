"""The ipsets of the iptables backend: render their ``ipset restore`` payload, normalize, check, parse counters.

Pure: text in, text out. The whitelist lives in sets of type ``hash:net,port`` (one per direction and
family, named by contract.set_name), with per-element counters and comments. The payload fills
``<set>-new`` and swaps it with the live set, which must exist first (the host creates it when absent).
ipset stores a port range as one element per port: ranges wider than ``SET_PORT_SPAN`` ports stay
iptables rules next to the set rule.
"""

import ipaddress
import re

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    IPT_CHAINS,
    IPT_FAMILIES,
    SET_COMMENT_BYTES,
    SET_FAMILIES,
    SET_KEYS,
    SET_SWAP_SUFFIX,
    SET_TYPE,
    SETS,
    PayloadRefused,
    set_name,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import HostPolicy
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import rule_text, truncate_utf8

SET_PORT_SPAN = 64  # ports per entry at most in a set (one element per port); wider ranges stay rules
SET_MAXELEM = 65536  # ipset's default; raised to the next power of two for more elements
# hash:net refuses a /0: "any" is stored as its two halves.
_HALVES = {"0.0.0.0/0": ("0.0.0.0/1", "128.0.0.0/1"), "::/0": ("::/1", "8000::/1")}
_SET_NAME = "|".join(re.escape(name) for name in SET_KEYS)
_NEW = re.escape(SET_SWAP_SUFFIX)
# The lines a rendered payload holds; check_ipset_payload checks their values and order too.
_IPSET_LINE_RE = re.compile(
    rf"create (?P<create>{_SET_NAME}){_NEW} {re.escape(SET_TYPE)} family (?P<family>inet6?) hashsize (?P<hashsize>\d+) "
    r"maxelem (?P<maxelem>\d+) counters comment"
    rf"|add (?P<add>{_SET_NAME}){_NEW} (?P<address>[0-9a-fA-F.:/]+),(?P<proto>tcp|udp):(?P<lo>\d+)(?:-(?P<hi>\d+))? "
    r'comment "(?P<comment>[^"\\\n]*)"'
    rf"|swap (?P<swap>{_SET_NAME}){_NEW} (?P=swap)|destroy (?P<destroy>{_SET_NAME}){_NEW}")
_SET_COUNTERS_RE = re.compile(r" packets \d+ bytes \d+")
_PORT_RANGE_RE = re.compile(r"^(\S+),(\w+):(\d+)-(\d+)$")
_SAVED_ADD_RE = re.compile(r'^add (\S+) (\S+),(\S+) packets (\d+) bytes (\d+)(?: comment "([^"]*)")?')


# Rendering ----------------------------------------------------------------------------------


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


def render_ipset(policy: HostPolicy, directions) -> str:
    """The ``ipset restore`` payload that fills and swaps in the sets of ``directions``."""
    lines = [f"# portguard.hardening ipsets for {rule_text(policy.host, 'the host name')}; generated, do not edit"]
    for direction in directions:
        pool = policy.ingress if direction == "in" else policy.egress
        for family in SET_FAMILIES:
            name, entries = set_name(direction, family), [e for e in pool if e.family == family]
            new = name + SET_SWAP_SUFFIX
            size = set_size(entries)
            # hashsize only sizes the first table (the kernel grows it); maxelem is a hard limit.
            lines.append(f"create {new} {SET_TYPE} family {SET_FAMILIES[family]} hashsize {max(64, _pow2(size // 4))} "
                         f"maxelem {max(SET_MAXELEM, _pow2(size))} counters comment")
            lines += [f"add {new} {element}" for element in set_elements(entries)]
            lines += [f"swap {new} {name}", f"destroy {new}"]
    return "\n".join(lines) + "\n"


def rendered_sets(directions) -> tuple[tuple[str, str], ...]:
    """(set, ipset family) of every set render_ipset fills."""
    return tuple((set_name(d, f), SET_FAMILIES[f]) for d in directions for f in SET_FAMILIES)


# Reading back -------------------------------------------------------------------------------


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
        name = words[1].removesuffix(SET_SWAP_SUFFIX) if rendered else words[1]
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
            raise PayloadRefused(f"refused set {name!r} ({family!r}): not one of portguard's own sets")
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
                else f"add to {name}{SET_SWAP_SUFFIX} outside its create/swap"
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
            raise PayloadRefused(f"refused ipset payload line {number} ({problem}): {line[:120]!r}")
    if payload and sorted(state) != sorted(expected) or any(value[0] != "done" for value in state.values()):
        raise PayloadRefused("refused ipset payload: it does not fill and swap in exactly the listed sets")


def _element_problem(match, family):
    try:
        network = ipaddress.ip_network(match["address"] if "/" in match["address"] else match["address"] + "/"
                                       + ("32" if "." in match["address"] else "128"))
    except ValueError as exc:
        return str(exc)
    if network.version != (4 if family == SET_FAMILIES[4] else 6) or network.prefixlen == 0:
        return "address of another family, or a /0 (hash:net refuses it)"
    if str(network.network_address) != match["address"].split("/")[0]:
        return "address not as ipset prints it"
    low, high = int(match["lo"]), int(match["hi"] or match["lo"])
    if not low <= high <= 65535:
        return "port out of range"
    if len(match["comment"].encode("utf-8")) > SET_COMMENT_BYTES:
        return f"comment over {SET_COMMENT_BYTES} bytes"
    return None


def parse_ipset_save(text: str) -> list[dict]:
    """Per-element counters of our sets (``ipset save``), named like the chain that matches them."""
    elements = []
    for line in text.splitlines():
        match = _SAVED_ADD_RE.match(line.strip())
        if match and match.group(1) in SET_KEYS:
            direction, family = SET_KEYS[match.group(1)]
            elements.append({"set": f"{IPT_CHAINS[direction]}/{IPT_FAMILIES[family]}", "addresses": match.group(2),
                             "ports": match.group(3), "comment": match.group(6) or "",
                             "packets": int(match.group(4)), "bytes": int(match.group(5))})
    return elements
