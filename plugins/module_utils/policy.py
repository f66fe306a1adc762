"""The compiled policy model: what each host lets in (and out).

A whitelist entry is a rectangle of source (or destination) addresses times
destination ports for one family and protocol, with the catalog labels (flow,
service, purpose, owner) that put it there. Entries of one host, family and
protocol never overlap: overlapping and duplicate catalog entries are merged,
so that they load into nftables interval sets and the output does not depend
on the order of the catalog.
"""

import bisect
import ipaddress
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

    def address_text(self) -> str:
        return interval_text(self.family, self.addr_lo, self.addr_hi)

    def cidrs(self) -> list[str]:
        return interval_cidrs(self.family, self.addr_lo, self.addr_hi)

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

    def host(self, name: str, controller_addresses=None) -> HostPolicy:
        """One host's whitelist (built once); ``controller_addresses`` overrides those given to the compile."""
        key = (name, None if controller_addresses is None else tuple(controller_addresses))
        if key not in self._cache:
            self._cache[key] = self._builder.build(name, controller_addresses)
        return self._cache[key]

    def allowed(self, src_address: str, dst_host: str, port: int, proto: str) -> bool:
        """Does the catalog let a new connection from ``src_address`` reach ``port/proto`` on ``dst_host``?"""
        return self.host(dst_host).allowed_in(src_address, port, proto)


def interval_text(family: int, low: int, high: int) -> str:
    """An address range as nft writes it: an address, a CIDR or ``a-b``."""
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    if low == high:
        return str(cls(low))
    size = high - low + 1
    if size & (size - 1) == 0 and low % size == 0:
        bits = 32 if family == 4 else 128
        return f"{cls(low)}/{bits - size.bit_length() + 1}"
    return f"{cls(low)}-{cls(high)}"


def interval_cidrs(family: int, low: int, high: int) -> list[str]:
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return [str(net) for net in ipaddress.summarize_address_range(cls(low), cls(high))]


def merge_intervals(intervals):
    """Union of ``(lo, hi, tag)`` intervals as sorted, disjoint ``(lo, hi, tags)``.

    Adjacent intervals are joined as well, so that the result is minimal.
    """
    merged = []
    for low, high, tag in sorted(intervals, key=lambda item: (item[0], item[1])):
        if merged and low <= merged[-1][1] + 1:
            last = merged[-1]
            if high > last[1]:
                last[1] = high
            last[2].add(tag)
        else:
            merged.append([low, high, {tag}])
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
        ((port_lo, port_hi), items), = by_ports.items()
        segments = [(port_lo, port_hi, merge_intervals(items))]
    else:
        cuts = sorted({p for lo, hi in by_ports for p in (lo, hi + 1)})
        segments = []
        for start, stop in zip(cuts, cuts[1:]):
            items = [item for (lo, hi), group in by_ports.items() if lo <= start and stop - 1 <= hi for item in group]
            if not items:
                continue
            merged = merge_intervals(items)
            shape = [(low, high) for low, high, _ in merged]
            last = segments[-1] if segments else None
            if last and last[1] + 1 == start and [(lo, hi) for lo, hi, _ in last[2]] == shape:
                for old, new in zip(last[2], merged):
                    old[2] |= new[2]
                segments[-1] = (last[0], stop - 1, last[2])
            else:
                segments.append((start, stop - 1, merged))
    entries = []
    for port_lo, port_hi, merged in segments:
        for addr_lo, addr_hi, tags in merged:
            entries.append(
                Entry(family, proto, addr_lo, addr_hi, port_lo, port_hi, tuple(sorted(labels[t] for t in tags)))
            )
    entries.sort(key=lambda e: (e.addr_lo, e.port_lo))
    return entries


def address_in(intervals: list[tuple[int, int]], starts: list[int], value: int) -> bool:
    """Is ``value`` inside sorted disjoint ``intervals`` (``starts`` are their lows)?"""
    index = bisect.bisect_right(starts, value) - 1
    return index >= 0 and intervals[index][1] >= value
