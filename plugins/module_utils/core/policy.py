"""The compiled policy model: what each host lets in (and out).

A whitelist entry is a rectangle of source (or destination) addresses times
destination ports for one family and protocol, with the catalog labels (flow,
service, purpose, owner) that put it there. Entries of one host, family and
protocol never overlap: overlapping and duplicate catalog entries are merged,
so that they load into nftables interval sets and the output does not depend
on the order of the catalog.
"""

import bisect
import contextlib
import gc
import ipaddress
import operator
import socket
from dataclasses import dataclass, field

FAMILIES = (4, 6)
FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}


@dataclass(frozen=True, order=True)
class Label:
    flow: str
    service: str
    purpose: str = ""
    owner: str = ""

    def text(self) -> str:
        return f"{self.flow}/{self.service}: {self.purpose}" if self.purpose else f"{self.flow}/{self.service}"


@dataclass(frozen=True)
class Entry:
    family: int
    proto: str
    addr_lo: int
    addr_hi: int
    port_lo: int
    port_hi: int
    labels: tuple[Label, ...]

    # The hosts of a group share their entries (see catalog.build): the texts are written once per
    # entry and kept outside the fields, so that equality, hashing and repr do not change.
    def address_text(self) -> str:
        text = self.__dict__.get("_address_text")
        if text is None:
            text = interval_text(self.family, self.addr_lo, self.addr_hi)
            object.__setattr__(self, "_address_text", text)
        return text

    def cidrs(self) -> list[str]:
        cidrs = self.__dict__.get("_cidrs")
        if cidrs is None:
            cidrs = tuple(interval_cidrs(self.family, self.addr_lo, self.addr_hi))
            object.__setattr__(self, "_cidrs", cidrs)
        return list(cidrs)

    def port_text(self, sep: str = "-") -> str:
        return str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}{sep}{self.port_hi}"

    def contains(self, address: int, port: int) -> bool:
        return self.addr_lo <= address <= self.addr_hi and self.port_lo <= port <= self.port_hi

    def as_dict(self) -> dict:
        return {
            "family": FAMILY_NAMES[self.family],
            "proto": self.proto,
            "addresses": self.address_text(),
            "ports": self.port_text(),
            "labels": [label.__dict__.copy() for label in self.labels],
        }


@dataclass(frozen=True)
class HostSettings:
    backend: str = "auto"
    mode: str = "enforce"
    deny: str = "reject"
    egress: bool = False
    allow_ping: bool = True
    rollback_timeout: int = 30
    log_rate: int = 10
    log_burst: int = 5
    log_prefix: str = "portguard-deny: "
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostPolicy:
    host: str
    settings: HostSettings
    ingress: tuple[Entry, ...]
    egress: tuple[Entry, ...] = ()
    management: tuple[Entry, ...] = ()

    def entries(self, direction: str, family: int, proto: str) -> list[Entry]:
        pool = self.ingress if direction == "in" else self.egress
        return [entry for entry in pool if entry.family == family and entry.proto == proto]

    def _matches(self, pool, address: str, port: int, proto: str) -> list[Entry]:
        parsed = ipaddress.ip_address(address)
        family, value = parsed.version, int(parsed)
        return [e for e in pool if e.family == family and e.proto == proto and e.contains(value, port)]

    def allowed_in(self, src: str, port: int, proto: str) -> bool:
        return bool(self._matches(self.ingress, src, port, proto))

    def allowed_out(self, dst: str, port: int, proto: str) -> bool:
        return not self.settings.egress or bool(self._matches(self.egress, dst, port, proto))

    def why_in(self, src: str, port: int, proto: str) -> list[Label]:
        return sorted({label for e in self._matches(self.ingress, src, port, proto) for label in e.labels})

    def management_only(self) -> "HostPolicy":
        """The fallback ruleset: only the anti-lockout floor."""
        return HostPolicy(self.host, self.settings, self.management, (), self.management)


@dataclass(frozen=True)
class Finding:
    level: str  # error, warning, info
    code: str
    path: str
    message: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Policy:
    """Everything compiled from one catalog and inventory, once per play."""

    hosts: dict[str, HostSettings]
    findings: list[Finding] = field(default_factory=list)
    expired: list[dict] = field(default_factory=list)
    _builder: object = None
    _cache: dict = field(default_factory=dict)

    def host(self, name: str, controller_addresses=None, controller_port=None) -> HostPolicy:
        """One host's whitelist (built once); ``controller_addresses`` overrides those given to the compile,
        ``controller_port`` the host's ``ansible_port`` (the port the controller's addresses are let in on)."""
        key = (name, None if controller_addresses is None else tuple(controller_addresses), controller_port)
        if key not in self._cache:
            with gc_paused():
                self._cache[key] = self._builder.build(name, controller_addresses, controller_port)
        return self._cache[key]

    def allowed(self, src_address: str, dst_host: str, port: int, proto: str) -> bool:
        """Does the catalog let a new connection from ``src_address`` reach ``port/proto`` on ``dst_host``?"""
        return self.host(dst_host).allowed_in(src_address, port, proto)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while compiling or building a whitelist.

    Both make tens of thousands of objects that live on and form no cycles; the
    collector would walk them several times over (10-15 % of the time) for nothing.
    Reference counting still frees everything; a collector that was off stays off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _v6_text_ipaddress(value: int) -> str:
    return str(ipaddress.IPv6Address(value))


def _v6_text_ntop(value: int) -> str:
    # ::/96 and ::ffff:0:0/96: inet_ntop writes an embedded IPv4 address there, ipaddress does not
    if value >> 32 in (0, 0xFFFF):
        return str(ipaddress.IPv6Address(value))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def _pick_v6_text():
    """inet_ntop is about 8x faster than ipaddress; use it only where it writes what ipaddress writes."""
    samples = ("2001:db8::1", "2001:db8:0:1:1:1:1:1", "1:0:0:2:0:0:0:3", "1:0:0:2:0:0:3:4", "fe80::", "::1:2:3:4:5",
               "2001:db8:ab:cd:ef:1234:5678:9abc", "1::", "0:1::", "ffff::ffff:1:2", "1:2:3:4:5:6:7:0")
    try:
        if all(_v6_text_ntop(int(ipaddress.IPv6Address(s))) == str(ipaddress.IPv6Address(s)) for s in samples):
            return _v6_text_ntop
    except (OSError, ValueError, AttributeError):
        pass
    return _v6_text_ipaddress


_v6_text = _pick_v6_text()


def address_text(family: int, value: int) -> str:
    """One address as ``ipaddress`` writes it (and as nft lists it), without building an address object."""
    if family == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    return _v6_text(value)


_NTOA = socket.inet_ntoa


def interval_text(family: int, low: int, high: int) -> str:
    """An address range as nft writes it: an address, a CIDR or ``a-b``."""
    if low == high:  # most entries: one address, written here without further calls
        return _NTOA(low.to_bytes(4, "big")) if family == 4 else _v6_text(low)
    size = high - low + 1
    if size & (size - 1) == 0 and low % size == 0:
        bits = 32 if family == 4 else 128
        return f"{address_text(family, low)}/{bits - size.bit_length() + 1}"
    return f"{address_text(family, low)}-{address_text(family, high)}"


def interval_cidrs(family: int, low: int, high: int) -> list[str]:
    size = high - low + 1
    if size & (size - 1) == 0 and low % size == 0:  # one block (most entries): no summarizing needed
        bits = 32 if family == 4 else 128
        return [f"{address_text(family, low)}/{bits - size.bit_length() + 1}"]
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return [str(net) for net in ipaddress.summarize_address_range(cls(low), cls(high))]


def _new_entry(family, proto, addr_lo, addr_hi, port_lo, port_hi, labels) -> Entry:
    """``Entry(...)`` without the frozen dataclass ``__init__`` (one setattr call per field).

    A big host has ten thousand entries and this is a third of its build time;
    the instance is the same (same fields in ``__dict__``, no ``__post_init__``).
    """
    entry = _NEW(Entry)
    fields = entry.__dict__
    fields["family"] = family
    fields["proto"] = proto
    fields["addr_lo"] = addr_lo
    fields["addr_hi"] = addr_hi
    fields["port_lo"] = port_lo
    fields["port_hi"] = port_hi
    fields["labels"] = labels
    return entry


_NEW = object.__new__
_LOW_HIGH = operator.itemgetter(0, 1)
_ADDR_PORT = operator.attrgetter("addr_lo", "port_lo")


def merge_intervals(intervals):
    """Union of ``(lo, hi, tag)`` intervals as sorted, disjoint ``(lo, hi, tags)``.

    Adjacent intervals are joined as well, so that the result is minimal.
    """
    merged = []
    for low, high, tag in sorted(intervals, key=_LOW_HIGH):
        if merged and low <= merged[-1][1] + 1:
            last = merged[-1]
            if high > last[1]:
                last[1] = high
            last[2].add(tag)
        else:
            merged.append([low, high, {tag}])
    return merged


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Union of ``(lo, hi)`` ranges as sorted, disjoint ``(lo, hi)``; adjacent ones are joined."""
    merged = []
    last_lo = last_hi = None
    for low, high in sorted(ranges):
        if last_hi is not None and low <= last_hi + 1:
            if high > last_hi:
                last_hi = high
        else:
            if last_hi is not None:
                merged.append((last_lo, last_hi))
            last_lo, last_hi = low, high
    if last_hi is not None:
        merged.append((last_lo, last_hi))
    return merged


def disjoint_entries(family: int, proto: str, rects, labels: list[Label]) -> list[Entry]:
    """Turn overlapping ``(addr_lo, addr_hi, port_lo, port_hi, label_id)`` into disjoint entries.

    The port axis is cut into elementary segments at every range boundary; the
    addresses of each segment are merged; neighbouring segments with the same
    address set become one port range again.
    """
    by_ports: dict[tuple[int, int], list] = {}
    for addr_lo, addr_hi, port_lo, port_hi, label in rects:
        by_ports.setdefault((port_lo, port_hi), []).append((addr_lo, addr_hi, label))
    if len(by_ports) == 1:
        (port_lo, port_hi), items = next(iter(by_ports.items()))
        segments = [(port_lo, port_hi, merge_intervals(items))]
    else:
        cuts = sorted({p for lo, hi in by_ports for p in (lo, hi + 1)})
        segments = []
        for start, stop in zip(cuts, cuts[1:]):
            items = [item for (lo, hi), group in by_ports.items() if lo <= start and stop - 1 <= hi for item in group]
            if not items:
                continue
            merged = merge_intervals(items)
            last = segments[-1] if segments else None
            if last and last[1] + 1 == start and [(lo, hi) for lo, hi, _unused in last[2]] == [
                    (low, high) for low, high, _unused in merged]:
                for old, new in zip(last[2], merged):
                    old[2] |= new[2]
                segments[-1] = (last[0], stop - 1, last[2])
            else:
                segments.append((start, stop - 1, merged))
    entries = []
    singles: dict[int, tuple[Label]] = {}  # most entries have one label: build each 1-tuple once
    for port_lo, port_hi, merged in segments:
        for addr_lo, addr_hi, tags in merged:
            if len(tags) == 1:
                (tag,) = tags
                found = singles.get(tag)
                if found is None:
                    found = singles[tag] = (labels[tag],)
            else:
                found = tuple(sorted(labels[t] for t in tags))
            entries.append(_new_entry(family, proto, addr_lo, addr_hi, port_lo, port_hi, found))
    entries.sort(key=_ADDR_PORT)
    return entries


def address_in(intervals: list[tuple[int, int]], starts: list[int], value: int) -> bool:
    """Is ``value`` inside sorted disjoint ``intervals`` (``starts`` are their lows)?"""
    index = bisect.bisect_right(starts, value) - 1
    return index >= 0 and intervals[index][1] >= value
