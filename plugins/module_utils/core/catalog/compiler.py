"""Compile the catalog and the inventory into a policy.

``compile_catalog`` does the work shared by all hosts once (names resolved,
addresses merged, flows indexed by destination host); the whitelist of one
host is then built on demand by ``Policy.host(name)`` and cached.
The sections' shapes are in ``schema``, the names' resolution in ``names``,
the per-host variables in ``inventory``, the warnings across entries in ``findings``.
"""

import datetime

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.findings import names_of, redundant_flows
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.inventory import (
    NETWORK_CONNECTIONS,
    HostSettings,
    address_intervals,
    check_inventory,
    collect_inventory,
    host_settings,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.names import (
    is_name,
    resolve_networks,
    resolve_services,
    resolve_sources,
    resolve_targets,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import (
    CONTROLLER_FLOW,
    FLOW_KEYS,
    MANAGEMENT_FLOW,
    MANAGEMENT_KEYS,
    Flow,
    Service,
    as_list,
    entry,
    mapping,
    parse_service,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    CatalogError,
    EmptyCatalogError,
    SchemaError,
    UnknownNameError,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import address_in
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import (
    FAMILIES,
    Finding,
    HostPolicy,
    Label,
    Policy,
    disjoint_entries,
    gc_paused,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    check_text,
    key_path,
    parse_bool,
    parse_expiry,
    parse_int,
    truncate_utf8,
    type_name,
)


class _Compiler:
    """Holds the once-per-play state and builds host policies from it."""

    def __init__(self, variables, groups, hostvars, today, controller_addresses, errors=None):
        self.variables = variables
        self.today = today
        self.errors = errors  # None: raise the first error; a list: record each one and go on
        self.findings: list[Finding] = []
        self.expired: list[dict] = []
        # Entries left out after an error (see compile_catalog), and the names whose flows are left out with them.
        self.unresolvable = {"groups": set(), "hosts": set(), "networks": set(), "services": set(), "flows": set(),
                             "management": False}
        self.tainted: set = set()
        if errors is None:
            self.groups = check_inventory(groups, hostvars)
        else:
            self.groups, hostvars, broken_groups, broken_hosts = collect_inventory(groups, hostvars, errors.append)
            self.unresolvable["groups"].update(broken_groups)
            self.unresolvable["hosts"].update(broken_hosts)
        self.hostvars = hostvars
        given = dict(self.groups)
        all_hosts = set(self.groups.get("all", []))
        for members in self.groups.values():
            all_hosts.update(members)
        all_hosts.update(hostvars)
        self.groups["all"] = sorted(all_hosts)
        self.hosts = {}
        for host in self.groups["all"]:
            try:
                self.hosts[host] = host_settings(host, hostvars)
            except CatalogError as exc:
                self._refuse(exc)
                self.unresolvable["hosts"].add(host)
                self.hosts[host] = HostSettings()
        broken_hosts = self.unresolvable["hosts"]
        if broken_hosts:
            self.unresolvable["groups"].update(name for name, members in given.items() if broken_hosts & set(members))
        self.tainted.update(broken_hosts, self.unresolvable["groups"])
        self.host_intervals = {}
        for host, settings in self.hosts.items():
            self.host_intervals[host] = address_intervals(settings.addresses, key_path("hostvars", host))
            if not settings.addresses and host not in broken_hosts:
                self.findings.append(Finding("warning", "host-without-address", key_path("hostvars", host),
                                             f"host {host} has no address: flows from it render nothing"))
        self.controller = address_intervals(controller_addresses or (), "controller_addresses", indexed=True)
        self.networks = resolve_networks(self._section("portguard_networks"), self.groups, self.hosts,
                                         None if errors is None else self._refuse_network, self.tainted)
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
        self.findings.extend(redundant_flows(self.flows))

    # errors -----------------------------------------------------------
    def _refuse(self, error):
        if self.errors is None:
            raise error
        self.errors.append(error)

    def _refuse_network(self, error, name):
        self.errors.append(error)
        self.unresolvable["networks"].add(name)

    def _section(self, name) -> dict:
        try:
            return mapping(self.variables.get(name), name)
        except CatalogError as exc:
            self._refuse(exc)
            return {}

    def _names_tainted(self, item: dict, keys) -> bool:
        """Does a flow (or the floor) name an entry that is unresolvable, or that includes one?"""
        return any(isinstance(name, str) and name in self.tainted for key in keys for name in names_of(item.get(key)))

    # names ------------------------------------------------------------
    def _sources(self, raw, path):
        return resolve_sources(raw, path, self.networks, self.groups, self.host_intervals)

    def _services(self):
        services = {}
        for name, spec in self._section("portguard_services").items():
            path = key_path("portguard_services", name)
            try:
                service = services[name] = parse_service(name, spec, path)
            except CatalogError as exc:
                self._refuse(exc)
                self.unresolvable["services"].add(name)
                self.tainted.add(name)
                continue
            if not service.purpose or not service.owner:
                missing = "purpose" if not service.purpose else "owner"
                self.findings.append(Finding("warning", "service-undocumented", path, f"service {name} has no {missing}"))
        return services

    def _named_services(self) -> dict:
        """The services flows may name: an unresolvable one with a valid name still resolves (to no port)."""
        if not self.unresolvable["services"]:
            return self.services
        named = dict(self.services)
        for name in self.unresolvable["services"]:
            if is_name(name, "service"):
                named[name] = Service(name, (), "", "")
        return named

    def _flows(self):
        raw = self.variables.get("portguard_flows")
        if raw is None:
            raw = []
        may_be_empty = isinstance(raw, list)
        if not may_be_empty:
            self._refuse(SchemaError("portguard_flows", f"expected a list of flows, got {type_name(raw)}"))
            raw = []
        deny_all = self.variables.get("portguard_deny_all")
        try:
            deny_all = parse_bool(deny_all, "portguard_deny_all") if deny_all is not None else False
        except CatalogError as exc:
            self._refuse(exc)
            may_be_empty = False
        if not raw and not deny_all and may_be_empty:
            self._refuse(EmptyCatalogError(
                "portguard_flows", "no flows: every port would be closed; set portguard_deny_all: true if that is meant"
            ))
        flows = []
        services = self._named_services()
        for index, item in enumerate(raw):
            path = f"portguard_flows[{index}]"
            try:
                flow = self._flow(item, path, services)
            except CatalogError as exc:
                self._refuse(exc)
                self.unresolvable["flows"].add(index)
                continue
            if self.tainted and self._names_tainted(item, ("from", "to", "services")):
                self.unresolvable["flows"].add(index)
                continue
            name, expires = flow.name, flow.expires
            if expires is not None and expires < self.today:
                self.expired.append({"name": name, "path": path, "expires": expires.isoformat(),
                                     "owners": sorted({s.owner for s in flow.services if s.owner})})
                self.findings.append(Finding("warning", "flow-expired", f"{path}.expires",
                                             f"flow {name} expired on {expires.isoformat()}: not rendered"))
                continue
            if not flow.targets:
                self.findings.append(Finding("warning", "flow-without-target", f"{path}.to",
                                             f"flow {name} reaches no host (empty group)"))
            if not any(flow.sources[family] for family in FAMILIES):
                self.findings.append(Finding("warning", "flow-without-source", f"{path}.from",
                                             f"flow {name} has no source address: it renders nothing"))
            flows.append(flow)
        return flows

    def _flow(self, item, path, services) -> Flow:
        item = entry(item, path, FLOW_KEYS, ("from", "to", "services"))
        sources = self._sources(item["from"], f"{path}.from")
        targets = resolve_targets(item["to"], f"{path}.to", self.networks, self.groups, self.hosts)
        services = resolve_services(item["services"], f"{path}.services", services)
        source_names = tuple(as_list(item["from"], f"{path}.from"))
        target_names = as_list(item["to"], f"{path}.to")
        if "name" in item:
            name = check_text(item["name"], f"{path}.name")
        else:
            # Sorted and deduplicated: reordering or repeating names must not change the output.
            name = f"{'+'.join(sorted(set(source_names)))}->{'+'.join(sorted(set(target_names)))}"
            name = check_text(truncate_utf8(name), f"{path}.from")
        if "description" in item:
            check_text(item["description"], f"{path}.description")
        expires = parse_expiry(item["expires"], f"{path}.expires") if "expires" in item else None
        return Flow(name, path, sources, source_names, targets, services, expires)

    def _management(self):
        raw = self.variables.get("portguard_management")
        if raw is None:
            self.findings.append(Finding("warning", "management-missing", "portguard_management",
                                         "no management floor: only the controller's own connection is kept open"))
            return None
        try:
            raw = entry(raw, "portguard_management", MANAGEMENT_KEYS, ("from", "services"))
            sources = self._sources(raw["from"], "portguard_management.from")
            services = resolve_services(raw["services"], "portguard_management.services", self._named_services())
        except CatalogError as exc:
            self._refuse(exc)
            self.unresolvable["management"] = True
            return None
        if self.tainted and self._names_tainted(raw, ("from", "services")):
            self.unresolvable["management"] = True
            return None
        return Flow(MANAGEMENT_FLOW, "portguard_management", sources, tuple(as_list(raw["from"], "")),
                    frozenset(self.hosts), services)

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
        controller = self.controller if controller_addresses is None else address_intervals(controller_addresses, "controller_addresses", indexed=True)
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


def compile_catalog(variables, groups, hostvars, *, today=None, controller_addresses=(), collect_errors=False):
    """Validate and compile the catalog of ``variables`` against the inventory.

    ``variables`` holds the ``portguard_*`` catalog variables, ``groups`` and
    ``hostvars`` are Ansible's magic variables (plain dicts). ``today`` (UTC)
    decides which flows have expired. Raises a ``CatalogError`` naming the
    offending key; returns a ``Policy`` whose ``host(name)`` builds one host's
    whitelist on demand.

    With ``collect_errors``, returns ``(policy, errors)`` and raises no ``CatalogError``:
    each entry is compiled on its own and each error recorded with its path; an entry
    that does not compile is left out as unresolvable (``policy.unresolvable``), and so
    is every flow that names it, so that the rest still compiles (what the lint reports on).
    """
    if today is None:
        today = datetime.datetime.now(datetime.UTC).date()
    errors = [] if collect_errors else None
    with gc_paused():
        compiler = _Compiler(variables, groups, hostvars, today, controller_addresses, errors)
    policy = Policy(hosts=dict(compiler.hosts), findings=compiler.findings, expired=compiler.expired)
    policy._builder = compiler
    return (policy, errors) if collect_errors else policy
