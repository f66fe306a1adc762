"""The compiled policy model: what each host lets in (and out).

A whitelist entry is a rectangle of source (or destination) addresses times
destination ports for one family and protocol, with the catalog labels (flow,
service, purpose, owner) that put it there. Entries of one host, family and
protocol never overlap: overlapping and duplicate catalog entries are merged,
so that they load into nftables interval sets and the output does not depend
on the order of the catalog.
"""

import contextlib
import gc
import ipaddress
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import (
    interval_cidrs,
    interval_text,
    merge_intervals,
)

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
class HostPolicy:
    host: str
    settings: object  # a catalog.inventory.HostSettings
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

    hosts: dict[str, object]  # host -> catalog.inventory.HostSettings
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

    # What the policy was compiled from, read-only (the reports, the verify plan and the lint read it).
    @property
    def groups(self) -> Mapping[str, list[str]]:
        """Inventory groups and their members (sorted); ``all`` is every inventory host."""
        return MappingProxyType(self._builder.groups)

    @property
    def networks(self) -> Mapping[str, dict]:
        """Each network's addresses: family -> sorted disjoint ``(lo, hi)``."""
        return MappingProxyType(self._builder.networks)

    @property
    def services(self) -> Mapping[str, object]:
        """The catalog's services by name (``catalog.schema.Service``)."""
        return MappingProxyType(self._builder.services)

    @property
    def flows(self) -> tuple:
        """The flows that are rendered (expired ones left out), in catalog order (``catalog.schema.Flow``)."""
        return tuple(self._builder.flows)

    @property
    def management(self):
        """The management floor as a flow to every host, or None when the catalog has none."""
        return self._builder.management

    @property
    def unresolvable(self) -> Mapping[str, object]:
        """What a ``collect_errors`` compile left out: the ``groups``, ``hosts``, ``networks``, ``services``
        (names) and ``flows`` (indexes) that did not compile or name such an entry; ``management`` (bool)."""
        return MappingProxyType({key: value if isinstance(value, bool) else frozenset(value)
                                 for key, value in self._builder.unresolvable.items()})

    @property
    def host_intervals(self) -> Mapping[str, dict]:
        """Each host's own addresses: family -> ``(lo, hi)`` intervals."""
        return MappingProxyType(self._builder.host_intervals)


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
_ADDR_PORT = operator.attrgetter("addr_lo", "port_lo")


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
