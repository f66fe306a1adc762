"""Resolution of the names a catalog uses: networks, inventory groups and hosts, ``all`` and ``any``.

Names in ``from`` resolve in one namespace (networks, groups, hosts) to address intervals per
family; ``to`` takes groups and hosts, the hosts that enforce a flow; ``services`` takes services.
"""

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import RESERVED, as_list
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    AmbiguousNameError,
    CatalogError,
    NameCycleError,
    SchemaError,
    UnknownNameError,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import merge_ranges
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import FAMILIES
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    check_name,
    check_text,
    key_path,
    looks_like_address,
    parse_network,
    type_name,
)

ANY = {4: [(0, 2**32 - 1)], 6: [(0, 2**128 - 1)]}


def is_name(value, kind: str) -> bool:
    """Is ``value`` a valid ``kind`` name (a network's or a service's)?"""
    try:
        check_name(value, "", kind)
    except CatalogError:
        return False
    return True


def check_network_name(name, groups, hosts):
    """A network's own name: valid, not reserved, not also a group or a host."""
    path = key_path("portguard_networks", name)
    check_name(name, path, "network")
    if name in RESERVED:
        raise AmbiguousNameError(path, f"{name!r} is reserved ('all' is every inventory host, 'any' every address)")
    if name in groups:
        raise AmbiguousNameError(path, f"{name!r} is both a network and an inventory group")
    if name in hosts:
        raise AmbiguousNameError(path, f"{name!r} is both a network and an inventory host")


def _owner(path: str, names):
    """The network an error path belongs to: names may contain dots, so the longest that prefixes it."""
    found = [name for name in names if _within(path, key_path("portguard_networks", name))]
    return max(found, key=len, default=None)


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((f"{prefix}.", f"{prefix}["))


def resolve_networks(raw: dict, groups, hosts, refuse=None, unresolvable=None) -> dict[str, dict]:
    """Every network as sorted disjoint intervals per family (networks may include networks).

    With ``refuse``, an error is recorded by ``refuse(error, name)`` instead of raised: a network whose
    own name is refused is left out; one that does not resolve stands for no address. Both go into
    ``unresolvable`` (a set), with the networks that include them.
    """
    names = {}
    for name in raw:
        try:
            check_network_name(name, groups, hosts)
        except CatalogError as exc:
            if refuse is None:
                raise
            refuse(exc, name)
            unresolvable.add(name)
            continue
        names[name] = raw[name]
    resolved: dict[str, dict] = {}

    def resolve(name, stack):
        if name in resolved:
            return resolved[name]
        path = key_path("portguard_networks", name)
        if name in stack:
            cycle = " -> ".join([*stack[stack.index(name):], name])
            raise NameCycleError(path, f"networks refer to each other in a loop: {cycle}")
        try:
            result = _resolve_one(name, path, stack)
        except CatalogError as exc:
            if refuse is None or _owner(exc.path, names) != name:
                raise
            refuse(exc, name)
            unresolvable.add(name)
            result = {family: [] for family in FAMILIES}
        resolved[name] = result
        return result

    def _resolve_one(name, path, stack):
        entries = names[name]
        if isinstance(entries, (str, int)) and not isinstance(entries, bool):
            entries = [entries]
        if not isinstance(entries, list):
            raise SchemaError(path, f"expected a list of addresses or network names, got {type_name(entries)}")
        per_family = {4: [], 6: []}
        for index, entry in enumerate(entries):
            entry_path = f"{path}[{index}]"
            if isinstance(entry, str) and entry in names:
                sub = resolve(entry, [*stack, name])
                if unresolvable is not None and entry in unresolvable:
                    unresolvable.add(name)
                for family in FAMILIES:
                    per_family[family].extend(sub[family])
                continue
            if isinstance(entry, str) and entry in RESERVED:
                raise SchemaError(entry_path, f"{entry!r} cannot be part of a network; use it in flows")
            if isinstance(entry, str) and not looks_like_address(entry):
                check_text(entry, entry_path)
                hint = " (networks list addresses and other networks, not groups or hosts)" \
                    if entry in groups or entry in hosts else ""
                raise UnknownNameError(entry_path, f"unknown network {entry!r}{hint}")
            family, low, high = parse_network(entry, entry_path)
            per_family[family].append((low, high))
        return {family: merge_ranges(per_family[family]) for family in FAMILIES}

    for name in sorted(names):
        resolve(name, [])
    return resolved


def _item_path(raw, path, index):
    return f"{path}[{index}]" if isinstance(raw, list) else path


def resolve_sources(raw, path, networks, groups, host_intervals) -> dict:
    """The addresses of ``from``: intervals per family."""
    per_family = {4: [], 6: []}
    for index, name in enumerate(as_list(raw, path)):
        item_path = _item_path(raw, path, index)
        if isinstance(name, bool) or not isinstance(name, str):
            raise SchemaError(item_path, f"expected a name, got {type_name(name)}")
        if name == "any":
            for family in FAMILIES:
                per_family[family].extend(ANY[family])
            continue
        kinds = [kind for kind, table in (("network", networks), ("group", groups), ("host", host_intervals))
                 if name in table]
        if len(kinds) > 1 and not (kinds == ["group", "host"] and name == "all"):
            raise AmbiguousNameError(item_path, f"{name!r} is both an inventory {kinds[0]} and {kinds[1]}")
        if kinds == ["network"]:
            for family in FAMILIES:
                per_family[family].extend(networks[name][family])
        elif kinds:
            members = groups[name] if kinds[0] == "group" else [name]
            for host in members:
                for family in FAMILIES:
                    per_family[family].extend(host_intervals[host][family])
        elif looks_like_address(name):
            family, low, high = parse_network(name, item_path)
            per_family[family].append((low, high))
        else:
            check_text(name, item_path)
            raise UnknownNameError(item_path, f"unknown name {name!r}: not a network, an inventory group or a host")
    return {family: merge_ranges(per_family[family]) for family in FAMILIES}


def resolve_targets(raw, path, networks, groups, hosts) -> frozenset:
    """The hosts of ``to``."""
    targets = set()
    for index, name in enumerate(as_list(raw, path)):
        item_path = _item_path(raw, path, index)
        if isinstance(name, bool) or not isinstance(name, str):
            raise SchemaError(item_path, f"expected an inventory group or host, got {type_name(name)}")
        if name == "any":
            raise SchemaError(item_path, "'any' means every address; 'to' takes inventory groups or hosts (use 'all')")
        if name in networks:
            raise SchemaError(item_path, f"{name!r} is a network; 'to' takes inventory groups or hosts, "
                                         "the hosts that enforce the flow")
        in_group, is_host = name in groups, name in hosts
        if in_group and is_host and name != "all":
            raise AmbiguousNameError(item_path, f"{name!r} is both an inventory group and host")
        if in_group:
            targets.update(groups[name])
        elif is_host:
            targets.add(name)
        else:
            check_text(name, item_path)
            raise UnknownNameError(item_path, f"unknown inventory group or host {name!r}")
    return frozenset(targets)


def resolve_services(raw, path, services) -> tuple:
    """The services of ``services``, sorted by name, each once."""
    result = []
    for index, name in enumerate(as_list(raw, path)):
        item_path = _item_path(raw, path, index)
        if isinstance(name, bool) or not isinstance(name, str):
            raise SchemaError(item_path, f"expected a service name, got {type_name(name)}")
        if name not in services:
            check_text(name, item_path)
            raise UnknownNameError(item_path, f"unknown service {name!r}")
        result.append(services[name])
    return tuple(sorted(set(result), key=lambda s: s.name))
