"""Every catalog warning that looks at more than one entry: redundant flows, unused networks and
services, overlapping networks, family gaps, a management floor without sources, expiring flows.

The compiler reports the redundant flows itself; the lint adds the others.
"""

import re

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import MANAGEMENT_FLOW
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import CatalogError
from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import (
    interval_text,
    intervals_within,
    merge_intervals,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import FAMILIES, FAMILY_NAMES, Finding
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import parse_expiry, parse_network

LEVELS = ("error", "warning", "info")
SECTIONS = ("groups", "portguard_networks", "portguard_services", "portguard_flows", "portguard_management",
            "portguard_deny_all", "hostvars")


def _path_key(path: str):
    """Catalog order: sections as a catalog is written, then hosts; ``[2]`` before ``[10]``."""
    section = next((rank for rank, name in enumerate(SECTIONS) if path == name or path.startswith((f"{name}.", f"{name}["))),
                   len(SECTIONS))
    return section, [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


def sort_findings(findings) -> list[Finding]:
    """Errors first, then by path in catalog order, code and message; no duplicates."""
    unique = {(f.level, f.code, f.path, f.message): f for f in findings}
    return sorted(unique.values(), key=lambda f: (LEVELS.index(f.level), _path_key(f.path), f.code, f.message))


def names_of(value) -> list:
    """The names a ``from``, ``to``, ``services`` or network entry lists, as written."""
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, list) else []


def _ports_within(inner: frozenset, outer: frozenset) -> bool:
    return all(any(p == o[0] and o[1] <= lo and hi <= o[2] for o in outer) for p, lo, hi in inner)


def redundant_flows(flows) -> list[Finding]:
    """Flows that another single flow already covers (duplicates and shadowed ones)."""
    findings = []
    by_target: dict[str, list[int]] = {}
    for index, flow in enumerate(flows):
        for host in flow.targets:
            by_target.setdefault(host, []).append(index)
    port_sets = [frozenset(p for s in f.services for p in s.ports) for f in flows]
    for index, flow in enumerate(flows):
        if not flow.targets or not any(flow.sources[f] for f in FAMILIES):
            continue
        first = min(flow.targets)
        for other_index in by_target.get(first, ()):
            if other_index == index:
                continue
            other = flows[other_index]
            if not flow.targets <= other.targets or not _ports_within(port_sets[index], port_sets[other_index]):
                continue
            if not all(intervals_within(flow.sources[f], other.sources[f]) for f in FAMILIES):
                continue
            same = flow.targets == other.targets and port_sets[index] == port_sets[other_index] and all(
                flow.sources[f] == other.sources[f] for f in FAMILIES)
            if same and other_index > index:
                continue  # report a duplicate pair once, on the later entry
            code, word = ("flow-duplicate", "duplicates") if same else ("flow-shadowed", "is covered by")
            findings.append(Finding("warning", code, flow.path, f"flow {flow.name} {word} flow {other.name}"))
            break
    return findings


def management_without_source(management) -> list[Finding]:
    if management is None or any(management.sources[family] for family in FAMILIES):
        return []
    return [Finding("error", "management-without-source", "portguard_management.from",
                    "the management floor resolves to no address: nobody can reach the hosts to manage them")]


def unused(catalog: dict, broken_networks=(), broken_services=()) -> list[Finding]:
    """Networks and services that nothing refers to (expired flows count: they are reported already)."""
    networks = catalog.get("portguard_networks")
    services = catalog.get("portguard_services")
    networks = networks if isinstance(networks, dict) else {}
    services = services if isinstance(services, dict) else {}
    used_names, used_services = set(), set()
    for entries in networks.values():
        used_names.update(entry for entry in names_of(entries) if isinstance(entry, str))
    flows = catalog.get("portguard_flows")
    sources = [flow for flow in flows if isinstance(flow, dict)] if isinstance(flows, list) else []
    management = catalog.get("portguard_management")
    if isinstance(management, dict):
        sources.append(management)
    for item in sources:
        used_names.update(name for name in names_of(item.get("from")) if isinstance(name, str))
        used_services.update(name for name in names_of(item.get("services")) if isinstance(name, str))
    findings = [Finding("warning", "network-unused", f"portguard_networks.{name}",
                        f"network {name} is referenced by no flow, no other network and not by the management floor")
                for name in networks if name not in used_names and name not in broken_networks]
    findings += [Finding("warning", "service-unused", f"portguard_services.{name}",
                         f"service {name} is allowed by no flow and not by the management floor")
                 for name in services if name not in used_services and name not in broken_services]
    return findings


def overlapping_networks(raw, broken_networks=()) -> list[Finding]:
    """Networks whose own addresses overlap, unless one includes the other by name.

    Only the addresses written in each network count: a network that includes an
    overlapping one by name would only repeat the finding of the one it includes.
    """
    raw = raw if isinstance(raw, dict) else {}
    includes: dict[str, set] = {}

    def members(name, seen=()):
        if name not in includes:
            found = set()
            for entry in names_of(raw.get(name)):
                if isinstance(entry, str) and entry in raw and entry not in seen:
                    found |= {entry, *members(entry, (*seen, name))}
            includes[name] = found
        return includes[name]

    own = {}
    for name in sorted(raw):
        if name in broken_networks:
            continue
        per_family = {family: [] for family in FAMILIES}
        for entry in names_of(raw[name]):
            if isinstance(entry, str) and entry not in raw:
                try:
                    family, low, high = parse_network(entry, "")
                except CatalogError:
                    continue  # reported as an error
                per_family[family].append((low, high, 0))
        own[name] = {family: [(lo, hi) for lo, hi, _tags in merge_intervals(items)]
                     for family, items in per_family.items()}
    names = sorted(own)
    findings = []
    for position, first in enumerate(names):
        for second in names[position + 1:]:
            if second in members(first) or first in members(second):
                continue
            shared = _shared(own[first], own[second])
            if shared:
                findings.append(Finding("warning", "network-overlap", f"portguard_networks.{second}",
                                        f"network {second} shares addresses with network {first}: {shared}"))
    return findings


def _shared(first: dict, second: dict) -> str:
    """The first range two networks share, per family, as text ('' when disjoint)."""
    parts = []
    for family in FAMILIES:
        a, b = first[family], second[family]
        i = j = 0
        while i < len(a) and j < len(b):
            low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if low <= high:
                parts.append(interval_text(family, low, high))
                break
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
    return ", ".join(parts)


def family_gaps(flows, host_intervals, flow_path=str) -> list[Finding]:
    """A flow to hosts with addresses of a family, from sources with none of that family (nor any address).

    ``flow_path`` maps a compiled flow's path to the catalog's (when the compile saw only part of it).
    """
    findings = []
    for flow in flows:
        have = {family for family in FAMILIES if flow.sources[family]}
        if not have:
            continue  # flow-without-source says it already
        for family in FAMILIES:
            if family in have:
                continue
            hosts = sorted(host for host in flow.targets if host_intervals[host][family])
            if not hosts:
                continue
            other = FAMILY_NAMES[FAMILIES[1 - FAMILIES.index(family)]]
            shown = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
            name = "management floor" if flow.name == MANAGEMENT_FLOW else f"flow {flow.name}"
            path = "portguard_management.from" if flow.name == MANAGEMENT_FLOW else flow_path(f"{flow.path}.from")
            findings.append(Finding(
                "warning", f"flow-{FAMILY_NAMES[family]}-gap", path,
                f"{name} allows only {other} sources, but targets with {FAMILY_NAMES[family]} addresses "
                f"({shown}) are reached over {FAMILY_NAMES[family]} too: those connections are denied"))
    return findings


def days_left(expires, today) -> int:
    """Days until a flow's last day (0 on it, negative once expired)."""
    return (expires - today).days


def expiring(flows, today, days: int, compiled=None) -> list[Finding]:
    """Flows of the catalog (raw entries) expiring within ``days``; the expired ones the compile left out.

    ``compiled`` are the indexes of the flows that the compile saw (it reports their expiry itself);
    None means all of them.
    """
    findings = []
    flows = flows if isinstance(flows, list) else []
    compiled = set(range(len(flows))) if compiled is None else set(compiled)
    for index, flow in enumerate(flows):
        if not isinstance(flow, dict) or "expires" not in flow:
            continue
        try:
            expires = parse_expiry(flow["expires"], "")
        except CatalogError:
            continue  # reported as an error
        path = f"portguard_flows[{index}].expires"
        name = flow.get("name") if isinstance(flow.get("name"), str) else f"portguard_flows[{index}]"
        left = days_left(expires, today)
        if left < 0 and index not in compiled:
            findings.append(Finding("warning", "flow-expired", path,
                                    f"flow {name} expired on {expires.isoformat()}: not rendered"))
        elif 0 <= left <= days:
            when = "today (its last day)" if left == 0 else f"in {left} day{'s' if left != 1 else ''}"
            findings.append(Finding("warning", "flow-expiring", path,
                                    f"flow {name} expires {when}, on {expires.isoformat()}: recertify or remove it"))
    return findings


def expiring_flows(flows, today, days: int) -> list[dict]:
    """Compiled flows (still rendered) that expire within ``days`` days: the report's list."""
    soon = []
    for flow in flows:
        if flow.expires is None:
            continue
        left = days_left(flow.expires, today)
        if 0 <= left <= days:
            soon.append({"name": flow.name, "path": flow.path, "expires": flow.expires.isoformat(), "days_left": left,
                         "owners": sorted({s.owner for s in flow.services if s.owner})})
    return sorted(soon, key=lambda f: (f["expires"], f["name"]))
