"""Compile the catalog and the inventory into a policy.

``compile_catalog`` does the work shared by all hosts once (names resolved,
addresses merged, flows indexed by destination host); the whitelist of one
host is then built on demand by ``Policy.host(name)`` and cached.
"""

import bisect
import datetime
import hashlib
import ipaddress
import json
from dataclasses import dataclass

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    AddressError,
    AmbiguousNameError,
    EmptyCatalogError,
    NameCycleError,
    SchemaError,
    UnknownNameError,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import (
    FAMILIES,
    Finding,
    HostPolicy,
    HostSettings,
    Label,
    Policy,
    address_in,
    address_text,
    disjoint_entries,
    gc_paused,
    merge_ranges,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    check_host_target,
    check_inventory_name,
    check_name,
    check_text,
    key_path,
    looks_like_address,
    parse_bool,
    parse_choice,
    parse_expiry,
    parse_int,
    parse_log_prefix,
    parse_network,
    parse_ports,
    parse_protocols,
    truncate_utf8,
    type_name,
)

CATALOG_VARS = (
    "portguard_networks",
    "portguard_services",
    "portguard_flows",
    "portguard_management",
    "portguard_deny_all",
)
RESERVED = ("all", "any")
SERVICE_KEYS = {"port", "proto", "purpose", "owner", "description"}
FLOW_KEYS = {"name", "from", "to", "services", "expires", "description"}
MANAGEMENT_KEYS = {"from", "services"}
MANAGEMENT_FLOW = "management"
CONTROLLER_FLOW = "controller"
NETWORK_CONNECTIONS = ("ssh", "ansible.builtin.ssh", "paramiko", "paramiko_ssh", "ansible.builtin.paramiko_ssh",
                       "ansible.netcommon.libssh", "winrm", "ansible.builtin.winrm", "psrp", "ansible.builtin.psrp")
_ANY = {4: [(0, 2**32 - 1)], 6: [(0, 2**128 - 1)]}
ROLLBACK_TIMEOUT_RANGE = (5, 3600)  # seconds; the firewall action's rollback_timeout takes the same bounds


@dataclass(frozen=True)
class Service:
    name: str
    ports: tuple[tuple[str, int, int], ...]  # (proto, lo, hi)
    purpose: str
    owner: str


@dataclass
class Flow:
    name: str
    path: str
    sources: dict  # family -> sorted disjoint [(lo, hi)]
    source_names: tuple[str, ...]
    targets: frozenset  # destination hosts
    services: tuple[Service, ...]
    expires: "datetime.date | None" = None


def _as_list(value, path):
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise SchemaError(path, "an empty list")
        return value
    raise SchemaError(path, f"expected a name or a list of names, got {type_name(value)}")


def _mapping(value, path, default=None):
    if value is None:
        return {} if default is None else default
    if not isinstance(value, dict):
        raise SchemaError(path, f"expected a mapping, got {type_name(value)}")
    return value


def _unknown_keys(item: dict, allowed: set, path: str):
    extra = sorted((key for key in item if key not in allowed), key=str)
    if extra:
        raise SchemaError(key_path(path, extra[0]), f"unknown key; expected one of {', '.join(sorted(allowed))}")


def check_inventory(groups, hostvars) -> dict[str, list[str]]:
    """The inventory's groups (members sorted), after checking every group and host name.

    Host and group names reach rule comments, flow names and report file names, and
    dynamic inventories (cloud tags, CMDB exports) let other people choose them: a bad
    one refuses the whole play, even when no flow names it.
    """
    groups = _mapping(groups, "groups")
    hostvars = _mapping(hostvars, "hostvars")
    result, checked = {}, set()
    for name, members in groups.items():
        check_inventory_name(name, "group")
        members = [] if members is None else members
        if not isinstance(members, (list, tuple)):
            raise SchemaError(key_path("groups", name), f"expected a list of inventory hosts, got {type_name(members)}")
        for host in members:
            if not isinstance(host, str) or host not in checked:  # a host is in several groups: checked once
                checked.add(check_inventory_name(host, "host"))
        result[name] = sorted(set(members))
    for host, variables in hostvars.items():
        if host not in checked:
            check_inventory_name(host, "host")
        if variables is not None and not isinstance(variables, dict):
            _mapping(variables, key_path("hostvars", host))
    return result


def host_addresses(host: str, hostvars: dict) -> tuple[str, ...]:
    """The plain addresses that stand for ``host`` in flows (see DESIGN.md)."""
    variables = hostvars.get(host, {}) or {}
    base = key_path("hostvars", host)
    if variables.get("portguard_addresses") is not None:
        raw = variables["portguard_addresses"]
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list):
            raise SchemaError(f"{base}.portguard_addresses", f"expected a list of addresses, got {type_name(raw)}")
        parsed = set()
        for index, value in enumerate(values):
            family, number = parse_network(value, f"{base}.portguard_addresses[{index}]", plain=True)[:2]
            parsed.add((family, number))
        # address_text writes what str(ipaddress.ip_address()) writes; sorted as (version, address) sorts them
        return tuple(address_text(family, number) for family, number in sorted(parsed))
    ansible_host = variables.get("ansible_host")
    if ansible_host is not None:
        try:
            address = ipaddress.ip_address(ansible_host)
        except ValueError:
            address = None  # a hostname: the facts below say what it stands for
            check_host_target(ansible_host, f"{base}.ansible_host")
        if address is not None:
            # The same checks as any other address: an IPv4-mapped IPv6 value
            # would render as IPv6 and never match the host's IPv4 traffic.
            parse_network(ansible_host, f"{base}.ansible_host", plain=True)
            return (str(address),)
    result = []
    for family, key in ((4, "ansible_default_ipv4"), (6, "ansible_default_ipv6")):
        facts = variables.get(key) or {}
        address = facts.get("address") if isinstance(facts, dict) else None
        if address:
            path = f"{base}.{key}.address"
            found, _unused, _unused = parse_network(address, path, plain=True)
            if found != family:
                raise AddressError(path, f"IPv{found} address {address!r} where an IPv{family} address is expected")
            result.append(str(ipaddress.ip_address(address)))
    return tuple(result)


def host_settings(host: str, hostvars: dict) -> HostSettings:
    variables = hostvars.get(host, {}) or {}
    base = key_path("hostvars", host)

    def get(name, parse, *args):
        value = variables.get(name)
        if value is None:
            return getattr(HostSettings, name.removeprefix("portguard_"))
        return parse(value, f"{base}.{name}", *args)

    return HostSettings(
        backend=get("portguard_backend", parse_choice, ("auto", "nftables", "iptables")),
        mode=get("portguard_mode", parse_choice, ("enforce", "audit")),
        deny=get("portguard_deny", parse_choice, ("reject", "drop")),
        egress=get("portguard_egress", parse_bool),
        allow_ping=get("portguard_allow_ping", parse_bool),
        rollback_timeout=get("portguard_rollback_timeout", parse_int, *ROLLBACK_TIMEOUT_RANGE),
        log_rate=get("portguard_log_rate", parse_int, 1, 100000),
        log_burst=get("portguard_log_burst", parse_int, 1, 100000),
        log_prefix=get("portguard_log_prefix", parse_log_prefix),
        addresses=host_addresses(host, hostvars),
    )


class _Compiler:
    """Holds the once-per-play state and builds host policies from it."""

    def __init__(self, variables, groups, hostvars, today, controller_addresses):
        self.variables = variables
        self.hostvars = hostvars
        self.today = today
        self.findings: list[Finding] = []
        self.expired: list[dict] = []
        self.groups = check_inventory(groups, hostvars)
        all_hosts = set(self.groups.get("all", []))
        for members in self.groups.values():
            all_hosts.update(members)
        all_hosts.update(hostvars)
        self.groups["all"] = sorted(all_hosts)
        self.hosts = {host: host_settings(host, hostvars) for host in self.groups["all"]}
        self.host_intervals = {}
        for host, settings in self.hosts.items():
            per_family = {4: [], 6: []}
            for address in settings.addresses:  # written by host_addresses: valid plain addresses
                family, number = parse_network(address, key_path("hostvars", host), plain=True)[:2]
                per_family[family].append((number, number))
            self.host_intervals[host] = per_family
            if not settings.addresses:
                self.findings.append(Finding("warning", "host-without-address", key_path("hostvars", host),
                                             f"host {host} has no address: flows from it render nothing"))
        self.controller = self._controller(controller_addresses or ())
        self.networks = self._networks()
        self.services = self._services()
        self.flows = self._flows()
        self.management = self._management()
        self.labels: list[Label] = []
        self.label_ids: dict[tuple, int] = {}  # by the label's fields: cheaper to hash than the Label
        self.flows_to: dict[str, list[Flow]] = {}
        self._ingress_memo: dict[tuple, tuple] = {}
        self._source_starts: dict[tuple, list] = {}
        self._egress_memo: dict[tuple, list] = {}
        self._egress_results: dict[tuple, tuple] = {}
        for flow in self.flows:
            for host in flow.targets:
                self.flows_to.setdefault(host, []).append(flow)
        self._report_redundant()

    # names ------------------------------------------------------------
    def _controller(self, addresses):
        result = {4: [], 6: []}
        for index, address in enumerate(addresses):
            family, low, high = parse_network(address, f"controller_addresses[{index}]", plain=True)
            result[family].append((low, high))
        return result

    def _networks(self):
        raw = _mapping(self.variables.get("portguard_networks"), "portguard_networks")
        for name in raw:
            path = key_path("portguard_networks", name)
            check_name(name, path, "network")
            if name in RESERVED:
                raise AmbiguousNameError(path, f"{name!r} is reserved ('all' is every inventory host, 'any' every address)")
            if name in self.groups:
                raise AmbiguousNameError(path, f"{name!r} is both a network and an inventory group")
            if name in self.hosts:
                raise AmbiguousNameError(path, f"{name!r} is both a network and an inventory host")
        resolved: dict[str, dict] = {}

        def resolve(name, stack):
            if name in resolved:
                return resolved[name]
            path = key_path("portguard_networks", name)
            if name in stack:
                cycle = " -> ".join([*stack[stack.index(name):], name])
                raise NameCycleError(path, f"networks refer to each other in a loop: {cycle}")
            entries = raw[name]
            if isinstance(entries, (str, int)) and not isinstance(entries, bool):
                entries = [entries]
            if not isinstance(entries, list):
                raise SchemaError(path, f"expected a list of addresses or network names, got {type_name(entries)}")
            per_family = {4: [], 6: []}
            for index, entry in enumerate(entries):
                entry_path = f"{path}[{index}]"
                if isinstance(entry, str) and entry in raw:
                    sub = resolve(entry, [*stack, name])
                    for family in FAMILIES:
                        per_family[family].extend(sub[family])
                    continue
                if isinstance(entry, str) and entry in RESERVED:
                    raise SchemaError(entry_path, f"{entry!r} cannot be part of a network; use it in flows")
                if isinstance(entry, str) and not looks_like_address(entry):
                    check_text(entry, entry_path)
                    hint = " (networks list addresses and other networks, not groups or hosts)" \
                        if entry in self.groups or entry in self.hosts else ""
                    raise UnknownNameError(entry_path, f"unknown network {entry!r}{hint}")
                family, low, high = parse_network(entry, entry_path)
                per_family[family].append((low, high))
            result = {family: merge_ranges(per_family[family]) for family in FAMILIES}
            resolved[name] = result
            return result

        for name in sorted(raw):
            resolve(name, [])
        return resolved

    def _services(self):
        raw = _mapping(self.variables.get("portguard_services"), "portguard_services")
        services = {}
        for name, spec in raw.items():
            path = key_path("portguard_services", name)
            check_name(name, path, "service")
            spec = _mapping(spec, path)
            _unknown_keys(spec, SERVICE_KEYS, path)
            if "port" not in spec:
                raise SchemaError(f"{path}.port", "missing; every service needs a port or a range")
            ports = parse_ports(spec["port"], f"{path}.port")
            protos = parse_protocols(spec.get("proto", "tcp"), f"{path}.proto")
            purpose = check_text(spec.get("purpose", ""), f"{path}.purpose")
            owner = check_text(spec.get("owner", ""), f"{path}.owner")
            if "description" in spec:
                check_text(spec["description"], f"{path}.description")
            if not purpose or not owner:
                missing = "purpose" if not purpose else "owner"
                self.findings.append(Finding("warning", "service-undocumented", path, f"service {name} has no {missing}"))
            merged = []
            for proto in protos:
                for low, high in merge_ranges(ports):
                    merged.append((proto, low, high))
            services[name] = Service(name, tuple(merged), purpose, owner)
        return services

    def resolve_sources(self, raw, path):
        names = _as_list(raw, path)
        per_family = {4: [], 6: []}
        for index, name in enumerate(names):
            item_path = f"{path}[{index}]" if isinstance(raw, list) else path
            if isinstance(name, bool) or not isinstance(name, str):
                raise SchemaError(item_path, f"expected a name, got {type_name(name)}")
            if name == "any":
                for family in FAMILIES:
                    per_family[family].extend(_ANY[family])
                continue
            kinds = [kind for kind, table in (("network", self.networks), ("group", self.groups), ("host", self.hosts))
                     if name in table]
            if len(kinds) > 1 and not (kinds == ["group", "host"] and name == "all"):
                raise AmbiguousNameError(item_path, f"{name!r} is both an inventory {kinds[0]} and {kinds[1]}")
            if kinds == ["network"]:
                for family in FAMILIES:
                    per_family[family].extend(self.networks[name][family])
            elif kinds:
                members = self.groups[name] if kinds[0] == "group" else [name]
                for host in members:
                    for family in FAMILIES:
                        per_family[family].extend(self.host_intervals[host][family])
            elif looks_like_address(name):
                family, low, high = parse_network(name, item_path)
                per_family[family].append((low, high))
            else:
                check_text(name, item_path)
                raise UnknownNameError(item_path, f"unknown name {name!r}: not a network, an inventory group or a host")
        return {family: merge_ranges(per_family[family]) for family in FAMILIES}

    def resolve_targets(self, names, path, raw):
        targets = set()
        for index, name in enumerate(names):
            item_path = f"{path}[{index}]" if isinstance(raw, list) else path
            if isinstance(name, bool) or not isinstance(name, str):
                raise SchemaError(item_path, f"expected an inventory group or host, got {type_name(name)}")
            if name == "any":
                raise SchemaError(item_path, "'any' means every address; 'to' takes inventory groups or hosts (use 'all')")
            if name in self.networks:
                raise SchemaError(item_path, f"{name!r} is a network; 'to' takes inventory groups or hosts, "
                                             "the hosts that enforce the flow")
            in_group, is_host = name in self.groups, name in self.hosts
            if in_group and is_host and name != "all":
                raise AmbiguousNameError(item_path, f"{name!r} is both an inventory group and host")
            if in_group:
                targets.update(self.groups[name])
            elif is_host:
                targets.add(name)
            else:
                check_text(name, item_path)
                raise UnknownNameError(item_path, f"unknown inventory group or host {name!r}")
        return frozenset(targets)

    def _service_list(self, raw, path):
        names = _as_list(raw, path)
        result = []
        for index, name in enumerate(names):
            item_path = f"{path}[{index}]" if isinstance(raw, list) else path
            if isinstance(name, bool) or not isinstance(name, str):
                raise SchemaError(item_path, f"expected a service name, got {type_name(name)}")
            if name not in self.services:
                check_text(name, item_path)
                raise UnknownNameError(item_path, f"unknown service {name!r}")
            result.append(self.services[name])
        return tuple(sorted(set(result), key=lambda s: s.name))

    def _flows(self):
        raw = self.variables.get("portguard_flows")
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise SchemaError("portguard_flows", f"expected a list of flows, got {type_name(raw)}")
        deny_all = self.variables.get("portguard_deny_all")
        deny_all = parse_bool(deny_all, "portguard_deny_all") if deny_all is not None else False
        if not raw and not deny_all:
            raise EmptyCatalogError(
                "portguard_flows", "no flows: every port would be closed; set portguard_deny_all: true if that is meant"
            )
        flows = []
        for index, item in enumerate(raw):
            path = f"portguard_flows[{index}]"
            item = _mapping(item, path)
            _unknown_keys(item, FLOW_KEYS, path)
            for key in ("from", "to", "services"):
                if key not in item:
                    raise SchemaError(f"{path}.{key}", "missing")
            sources = self.resolve_sources(item["from"], f"{path}.from")
            targets = self.resolve_targets(_as_list(item["to"], f"{path}.to"), f"{path}.to", item["to"])
            services = self._service_list(item["services"], f"{path}.services")
            source_names = tuple(_as_list(item["from"], f"{path}.from"))
            target_names = _as_list(item["to"], f"{path}.to")
            if "name" in item:
                name = check_text(item["name"], f"{path}.name")
            else:
                # Sorted and deduplicated: reordering or repeating names must not change the output.
                name = f"{'+'.join(sorted(set(source_names)))}->{'+'.join(sorted(set(target_names)))}"
                name = check_text(truncate_utf8(name), f"{path}.from")
            if "description" in item:
                check_text(item["description"], f"{path}.description")
            expires = parse_expiry(item["expires"], f"{path}.expires") if "expires" in item else None
            flow = Flow(name, path, sources, source_names, targets, services, expires)
            if expires is not None and expires < self.today:
                self.expired.append({"name": name, "path": path, "expires": expires.isoformat(),
                                     "owners": sorted({s.owner for s in services if s.owner})})
                self.findings.append(Finding("warning", "flow-expired", f"{path}.expires",
                                             f"flow {name} expired on {expires.isoformat()}: not rendered"))
                continue
            if not targets:
                self.findings.append(Finding("warning", "flow-without-target", f"{path}.to",
                                             f"flow {name} reaches no host (empty group)"))
            if not any(sources[family] for family in FAMILIES):
                self.findings.append(Finding("warning", "flow-without-source", f"{path}.from",
                                             f"flow {name} has no source address: it renders nothing"))
            flows.append(flow)
        return flows

    def _management(self):
        raw = self.variables.get("portguard_management")
        if raw is None:
            self.findings.append(Finding("warning", "management-missing", "portguard_management",
                                         "no management floor: only the controller's own connection is kept open"))
            return None
        raw = _mapping(raw, "portguard_management")
        _unknown_keys(raw, MANAGEMENT_KEYS, "portguard_management")
        for key in ("from", "services"):
            if key not in raw:
                raise SchemaError(f"portguard_management.{key}", "missing")
        sources = self.resolve_sources(raw["from"], "portguard_management.from")
        services = self._service_list(raw["services"], "portguard_management.services")
        return Flow(MANAGEMENT_FLOW, "portguard_management", sources, tuple(_as_list(raw["from"], "")),
                    frozenset(self.hosts), services)

    # analysis ----------------------------------------------------------
    def _report_redundant(self):
        """Report flows that another single flow already covers (duplicates and shadowed ones)."""
        by_target: dict[str, list[int]] = {}
        for index, flow in enumerate(self.flows):
            for host in flow.targets:
                by_target.setdefault(host, []).append(index)
        port_sets = [frozenset(p for s in f.services for p in s.ports) for f in self.flows]
        for index, flow in enumerate(self.flows):
            if not flow.targets or not any(flow.sources[f] for f in FAMILIES):
                continue
            first = min(flow.targets)
            for other_index in by_target.get(first, ()):
                if other_index == index:
                    continue
                other = self.flows[other_index]
                if not flow.targets <= other.targets or not _ports_within(port_sets[index], port_sets[other_index]):
                    continue
                if not all(_intervals_within(flow.sources[f], other.sources[f]) for f in FAMILIES):
                    continue
                same = flow.targets == other.targets and port_sets[index] == port_sets[other_index] and all(
                    flow.sources[f] == other.sources[f] for f in FAMILIES)
                if same and other_index > index:
                    continue  # report a duplicate pair once, on the later entry
                code, word = ("flow-duplicate", "duplicates") if same else ("flow-shadowed", "is covered by")
                self.findings.append(Finding("warning", code, flow.path, f"flow {flow.name} {word} flow {other.name}"))
                break

    # per host ------------------------------------------------------------
    def _label(self, flow_name, service) -> int:
        key = (flow_name, service.name, service.purpose, service.owner)
        found = self.label_ids.get(key)
        if found is None:
            found = self.label_ids[key] = len(self.labels)
            self.labels.append(Label(*key))
        return found

    def _ingress_rects(self, host, flows):
        rects: dict[tuple[int, str], list] = {}
        for flow in flows:
            for service in flow.services:
                label = self._label(flow.name, service)
                for proto, port_lo, port_hi in service.ports:
                    for family in FAMILIES:
                        target = rects.setdefault((family, proto), [])
                        for addr_lo, addr_hi in flow.sources[family]:
                            target.append((addr_lo, addr_hi, port_lo, port_hi, label))
        return rects

    def _entries(self, rects):
        entries = []
        for (family, proto), items in sorted(rects.items()):
            if items:
                entries.extend(disjoint_entries(family, proto, items, self.labels))
        return tuple(entries)

    def _controller_rects(self, host, controller, port=None):
        variables = self.hostvars.get(host, {}) or {}
        if not any(controller[f] for f in FAMILIES):
            return {}
        connection = variables.get("ansible_connection", "ssh")
        if connection not in NETWORK_CONNECTIONS:
            return {}
        if port is None:  # the action passes the connection's effective port
            port = parse_int(variables.get("ansible_port", 22), f"{key_path('hostvars', host)}.ansible_port", 1, 65535)
        label = self._label(CONTROLLER_FLOW, Service("connection", (("tcp", port, port),), "Ansible controller", ""))
        return {(family, "tcp"): [(lo, hi, port, port, label) for lo, hi in controller[family]]
                for family in FAMILIES}

    def build(self, host: str, controller_addresses=None, controller_port=None) -> HostPolicy:
        if host not in self.hosts:
            raise UnknownNameError("inventory_hostname", f"{host!r} is not an inventory host")
        settings = self.hosts[host]
        controller = self.controller if controller_addresses is None else self._controller(controller_addresses)
        controller_rects = self._controller_rects(host, controller, controller_port)
        # Hosts of one group usually get the same flows: their whitelists are built once and shared
        # (entries are immutable), which makes a play over many hosts cost about one build per group.
        flows = self.flows_to.get(host, [])
        memo_key = (tuple(map(id, flows)), tuple((key, tuple(items)) for key, items in sorted(controller_rects.items())))
        if memo_key not in self._ingress_memo:
            floor = [self.management] if self.management else []
            management_rects = self._ingress_rects(host, floor)
            for key, items in controller_rects.items():
                management_rects.setdefault(key, []).extend(items)
            rects = self._ingress_rects(host, flows)
            for key, items in management_rects.items():
                rects.setdefault(key, []).extend(items)
            self._ingress_memo[memo_key] = (self._entries(rects), self._entries(management_rects))
        ingress, management = self._ingress_memo[memo_key]
        egress = self._egress(host) if settings.egress else ()
        return HostPolicy(host, settings, ingress, egress, management)

    def _egress(self, host):
        """Destinations this host may open connections to: flows whose sources include one of its addresses."""
        mine = self.host_intervals[host]
        flows = [*self.flows, *([self.management] if self.management else [])]
        matching = []
        for flow in flows:
            for family in FAMILIES:
                starts = self._source_starts.get((id(flow), family))
                if starts is None:  # computed once per flow, not once per egress host
                    starts = self._source_starts[id(flow), family] = [lo for lo, _unused in flow.sources[family]]
                if any(address_in(flow.sources[family], starts, lo) for lo, _unused in mine[family]):
                    matching.append((flow, family))
        # Hosts that are sources of the same flows get the same destinations, unless a host is one of
        # them (it is left out of its own): such whitelists are built once and shared, as for ingress.
        targeted = any(host in pair[0].targets for pair in matching)
        memo_key = (tuple((id(flow), family) for flow, family in matching), host if targeted else None)
        found = self._egress_results.get(memo_key)
        if found is None:
            rects: dict[tuple[int, str], list] = {}
            for flow, family in matching:
                for target, proto, items in self._egress_rects(flow, family):
                    if target != host:
                        rects.setdefault((family, proto), []).extend(items)
            found = self._egress_results[memo_key] = self._entries(rects)
        return found

    def _egress_rects(self, flow, family):
        """``(target, proto, rects)`` of a flow's destinations, the same for every egress host: made once per flow."""
        key = (id(flow), family)  # flows live as long as the compiler
        found = self._egress_memo.get(key)
        if found is None:
            found = []
            for target in sorted(flow.targets):
                addresses = self.host_intervals[target][family]
                for service in flow.services:
                    label = self._label(flow.name, service)
                    for proto, port_lo, port_hi in service.ports:
                        found.append((target, proto, [(lo, hi, port_lo, port_hi, label) for lo, hi in addresses]))
            self._egress_memo[key] = found
        return found


def _ports_within(inner: frozenset, outer: frozenset) -> bool:
    return all(any(p == o[0] and o[1] <= lo and hi <= o[2] for o in outer) for p, lo, hi in inner)


def _intervals_within(inner, outer) -> bool:
    starts = [lo for lo, _unused in outer]
    for low, high in inner:
        index = bisect.bisect_right(starts, low) - 1
        if index < 0 or outer[index][1] < high:
            return False
    return True


def catalog_vars(variables: dict) -> dict:
    """Only the catalog variables of a host's variables (the part shared by all hosts)."""
    return {name: variables[name] for name in CATALOG_VARS if name in variables}


def compile_catalog(variables, groups, hostvars, *, today=None, controller_addresses=()) -> Policy:
    """Validate and compile the catalog of ``variables`` against the inventory.

    ``variables`` holds the ``portguard_*`` catalog variables, ``groups`` and
    ``hostvars`` are Ansible's magic variables (plain dicts). ``today`` (UTC)
    decides which flows have expired. Raises a ``CatalogError`` naming the
    offending key; returns a ``Policy`` whose ``host(name)`` builds one host's
    whitelist on demand.
    """
    if today is None:
        today = datetime.datetime.now(datetime.UTC).date()
    with gc_paused():
        compiler = _Compiler(variables, groups, hostvars, today, controller_addresses)
    policy = Policy(hosts=dict(compiler.hosts), findings=compiler.findings, expired=compiler.expired)
    policy._builder = compiler
    return policy


HOST_KEYS = (
    "ansible_host",
    "ansible_port",
    "ansible_connection",
    "ansible_default_ipv4",
    "ansible_default_ipv6",
    "portguard_backend",
    "portguard_mode",
    "portguard_deny",
    "portguard_egress",
    "portguard_allow_ping",
    "portguard_addresses",
    "portguard_rollback_timeout",
    "portguard_log_rate",
    "portguard_log_burst",
    "portguard_log_prefix",
)
_COMPILED: dict = {}


def select_hostvars(hostvars, hosts) -> dict:
    """Only the per-host variables the compiler reads, as plain data."""
    result = {}
    for host in hosts:
        variables = hostvars[host]
        result[host] = {key: variables[key] for key in HOST_KEYS if key in variables}
    return result


def compile_cached(variables, groups, hostvars, *, today=None, controller_addresses=()) -> Policy:
    """``compile_catalog`` memoized on its inputs: one compile per play, not per host."""
    if today is None:
        today = datetime.datetime.now(datetime.UTC).date()
    key_data = [catalog_vars(variables), groups, hostvars, today.isoformat(), list(controller_addresses)]
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()
    if key not in _COMPILED:
        _COMPILED.clear()  # one catalog per play: keep memory bounded
        _COMPILED[key] = compile_catalog(catalog_vars(variables), groups, hostvars, today=today,
                                         controller_addresses=controller_addresses)
    return _COMPILED[key]
