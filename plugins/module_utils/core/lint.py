"""Lint the catalog: what ``compile_catalog`` refuses, and what it accepts but is likely a mistake.

``lint_catalog`` never raises on a bad catalog: every refusal becomes an error
finding (code derived from the error class: ``UnknownNameError`` becomes
``unknown-name``), so that a report is always written. The compiler stops at
its first error; the lint then checks each section on its own (each host's
variables, the networks, each service, each flow, the management floor) with
the broken entries of the other sections replaced by harmless stand-ins, so
that one run lists the errors of independent entries without cascades. The
warnings are those of a compile of the valid part of the catalog.

Levels: ``error`` (the catalog would be refused, or it leaves no management
floor), ``warning`` (accepted, probably a mistake or due for recertification).
"""

import datetime
import re

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import (
    MANAGEMENT_FLOW,
    catalog_vars,
    check_inventory,
    compile_catalog,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import CatalogError
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import (
    FAMILIES,
    FAMILY_NAMES,
    Finding,
    interval_text,
    merge_intervals,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    check_inventory_name,
    check_name,
    key_path,
    parse_bool,
    parse_expiry,
    parse_int,
    parse_network,
)

LEVELS = ("error", "warning", "info")
DEFAULT_EXPIRING_DAYS = 14
# Stand-ins for broken entries while another section is checked: valid, and referenced names still resolve.
_STANDIN_SERVICE = {"port": 1, "proto": "tcp", "purpose": "lint stand-in", "owner": "lint"}
_FLOW_PATH = re.compile(r"^portguard_flows\[(\d+)\]")
# Compiler warnings that lint raises to errors. A missing floor is only a warning in a play: the
# controller's own connection stays open and the firewall action refuses changes that cut it. Lint runs
# before any host is touched, and there it is a mistake: the next admin who connects from elsewhere,
# or the controller after an address change, is locked out.
_RAISED_TO_ERROR = {"management-missing"}


def error_code(error: CatalogError) -> str:
    """``UnknownNameError`` -> ``unknown-name``; ``AddressError`` -> ``address``."""
    name = type(error).__name__.removesuffix("Error") or "catalog"
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _error(error: CatalogError, path=None) -> Finding:
    return Finding("error", error_code(error), error.path if path is None else path, error.message)


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


def _as_names(value) -> list:
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, list) else []


class _Linter:
    def __init__(self, variables, groups, hostvars, today, expiring_days):
        self.catalog = catalog_vars(variables or {})
        self.today = today
        self.expiring_days = expiring_days
        self.errors: list[Finding] = []
        self.broken_hosts: set[str] = set()
        self.broken_groups: set[str] = set()
        self.groups, self.hostvars = self._inventory(groups or {}, hostvars or {})
        self.broken_networks: set[str] = set()
        self.broken_services: set[str] = set()
        self.broken_flows: set[int] = set()
        self.broken_management = False
        self.kept_flows = None  # indexes of the flows compiled for the warnings, when some were left out
        self.valid_catalog = self.catalog

    def compile(self, catalog, hostvars=None, groups=None):
        return compile_catalog(catalog, self.groups if groups is None else groups,
                               self.hostvars if hostvars is None else hostvars, today=self.today)

    # errors ------------------------------------------------------------------
    def _inventory(self, groups, hostvars):
        """The inventory without the names the compiler refuses (each an error finding).

        A refused host leaves the groups that list it (they are then tainted: their flows are
        not linted for warnings); a refused group goes; a group whose members are not a list,
        or a host whose variables are not a mapping, stays, emptied and tainted.
        """
        groups = dict(groups) if isinstance(groups, dict) else {}
        hostvars = dict(hostvars) if isinstance(hostvars, dict) else {}
        while True:  # each round removes or empties what one error names, so it ends
            error = _inventory_error(groups, hostvars)
            if error is None or any(f.path == error.path for f in self.errors):
                return groups, hostvars
            self.errors.append(_error(error))

            def refused(host, path=error.path):
                return key_path("hostvars", host) == path

            for name, members in list(groups.items()):
                if key_path("groups", name) == error.path:
                    if _valid_name(name, "group"):
                        groups[name] = []
                        self.broken_groups.add(name)
                    else:
                        del groups[name]
                elif isinstance(members, list) and any(map(refused, members)):
                    groups[name] = [host for host in members if not refused(host)]
                    self.broken_groups.add(name)
            for host in [host for host in hostvars if refused(host)]:
                if _valid_name(host, "host"):
                    hostvars[host] = {}
                    self.broken_hosts.add(host)
                else:
                    del hostvars[host]

    def run(self) -> list[Finding]:
        policy = None
        if not self.errors:  # inventory errors (see _inventory) refuse the catalog already
            try:
                policy = self.compile(self.catalog)
            except CatalogError as exc:
                self.errors.append(_error(exc))
                self._mark(exc.path)
        if self.errors:
            self._sections()
            policy = self._valid_part()
        self._host_ports()
        findings = list(self.errors)
        if policy is not None:
            findings.extend(self._warnings(policy))
        return sort_findings(findings)

    def _host_ports(self):
        """``ansible_port``: the compile checks it only when it allows the controller's connection."""
        for host in sorted(self.hostvars):
            variables = self.hostvars[host] or {}
            if isinstance(variables, dict) and variables.get("ansible_port") is not None:
                try:
                    parse_int(variables["ansible_port"], f"hostvars.{host}.ansible_port", 1, 65535)
                except CatalogError as exc:
                    self.errors.append(_error(exc))

    def _mark(self, path: str):
        """Remember which entry an error belongs to, so that the other sections can stand in for it."""
        for section, names, target in (("hostvars", self.hostvars, self.broken_hosts),
                                       ("portguard_networks", self.catalog.get("portguard_networks"), self.broken_networks),
                                       ("portguard_services", self.catalog.get("portguard_services"), self.broken_services)):
            if not path.startswith(section) or not isinstance(names, dict):
                continue
            # Names may contain dots: the longest one whose path prefixes the error's.
            found = [(len(key_path(section, name)), name) for name in names if _within(path, key_path(section, name))]
            if found:
                target.add(max(found, key=lambda pair: pair[0])[1])
            return
        match = _FLOW_PATH.match(path)
        if match:
            self.broken_flows.add(int(match.group(1)))
        elif path.startswith("portguard_management"):
            self.broken_management = True

    def _check(self, catalog, hostvars=None, groups=None, remap=None) -> bool:
        """Compile one section; record its error (with ``remap`` applied to the path). True when valid."""
        try:
            self.compile(catalog, hostvars, groups)
        except CatalogError as exc:
            path = remap(exc.path) if remap else exc.path
            self.errors.append(_error(exc, path))
            self._mark(path)
            return False
        return True

    def _clean_hostvars(self):
        return {host: ({"portguard_addresses": []} if host in self.broken_hosts else variables)
                for host, variables in self.hostvars.items()}

    def _networks(self):
        raw = self.catalog.get("portguard_networks")
        if not isinstance(raw, dict):
            return {}
        result = {}
        for name, entries in raw.items():
            if name not in self.broken_networks:
                result[name] = entries
                continue
            try:
                check_name(name, "", "network")
            except CatalogError:
                continue  # not a valid name: nothing can refer to it
            if name in ("all", "any") or name in self.groups or name in self.hostvars:
                continue  # ambiguous: references resolve to the group or host
            result[name] = []  # references still resolve, to no address
        return result

    def _services(self, standins=True):
        raw = self.catalog.get("portguard_services")
        if not isinstance(raw, dict):
            return {}
        result = {}
        for name, spec in raw.items():
            if name not in self.broken_services:
                result[name] = spec
            elif standins:
                try:
                    check_name(name, "", "service")
                except CatalogError:
                    continue
                result[name] = dict(_STANDIN_SERVICE)
        return result

    def _broken_count(self) -> int:
        return (len(self.broken_hosts) + len(self.broken_networks) + len(self.broken_services) + len(self.broken_flows)
                + self.broken_management)

    def _repeat(self, attempt, limit: int):
        """Run a section check until it passes or finds nothing new; each round leaves one more broken entry out.

        A compile costs about as much as the whole catalog, so this costs one compile per broken entry
        (plus one) rather than one per entry.
        """
        for _round in range(limit + 1):
            known = self._broken_count()
            if attempt() or self._broken_count() == known:
                return

    def _sections(self):
        """Check each section on its own, with stand-ins for what is already known to be broken."""
        # Hosts' variables (an error in one stops the whole compile).
        hosts = sorted(self.hostvars)
        self._repeat(lambda: self._check({"portguard_deny_all": True}, hostvars=self._clean_hostvars(),
                                         groups={"all": hosts}), len(hosts))
        # Networks, with the inventory's names (a network may not be named like a group or host).
        no_hosts = {host: {} for host in self.hostvars}
        raw_networks = self.catalog.get("portguard_networks")
        self._repeat(lambda: self._check({"portguard_networks": self._networks() if isinstance(raw_networks, dict)
                                          else raw_networks, "portguard_deny_all": True}, hostvars=no_hosts),
                     len(raw_networks) if isinstance(raw_networks, dict) else 0)
        # Services: they do not refer to anything.
        raw_services = self.catalog.get("portguard_services")
        self._repeat(lambda: self._check({"portguard_services": self._services(standins=False)
                                          if isinstance(raw_services, dict) else raw_services,
                                          "portguard_deny_all": True}, hostvars={}, groups={}),
                     len(raw_services) if isinstance(raw_services, dict) else 0)
        deny_all = self.catalog.get("portguard_deny_all")
        if deny_all is not None:
            try:
                parse_bool(deny_all, "portguard_deny_all")
            except CatalogError as exc:
                self.errors.append(_error(exc))
        # Flows and the floor, against the valid rest (broken names stand in, so references resolve).
        base = {"portguard_networks": self._networks(), "portguard_services": self._services(),
                "portguard_deny_all": True}
        clean = self._clean_hostvars()
        flows = self.catalog.get("portguard_flows")
        if isinstance(flows, list) and flows:
            def attempt():
                remaining = [index for index in range(len(flows)) if index not in self.broken_flows]

                def remap(path):
                    return _FLOW_PATH.sub(lambda m: f"portguard_flows[{remaining[int(m.group(1))]}]", path, count=1)

                return self._check({**base, "portguard_flows": [flows[index] for index in remaining]},
                                   hostvars=clean, remap=remap)

            self._repeat(attempt, len(flows))
        elif isinstance(flows, list) or flows is None:
            self._check({"portguard_flows": flows, "portguard_deny_all": deny_all}, hostvars={}, groups={})
        else:
            self._check({"portguard_flows": flows, "portguard_deny_all": True}, hostvars={}, groups={})
        if not self.broken_management and self.catalog.get("portguard_management") is not None:
            self._check({**base, "portguard_management": self.catalog["portguard_management"]}, hostvars=clean)

    def _tainted(self) -> set:
        """Names whose addresses or ports a broken entry changed: broken networks, services and hosts,
        the groups of broken hosts and the networks that include a broken network."""
        tainted = self.broken_networks | self.broken_services | self.broken_hosts | self.broken_groups
        tainted |= {group for group, members in self.groups.items() if set(members) & self.broken_hosts}
        raw = self.catalog.get("portguard_networks")
        raw = raw if isinstance(raw, dict) else {}
        grown = True
        while grown:  # bounded: each round adds a name or stops
            grown = False
            for name, entries in raw.items():
                if name not in tainted and {e for e in _as_names(entries) if isinstance(e, str)} & tainted:
                    tainted.add(name)
                    grown = True
        return tainted

    def _valid_part(self):
        """The compiled policy of what is valid: only its warnings are reported, with paths put back.

        Flows (and the management floor) that name a broken entry are left out: their warnings
        (no source, a family gap...) would only repeat its error.
        """
        tainted = self._tainted()
        flows = self.catalog.get("portguard_flows")
        kept = []
        if isinstance(flows, list):
            for index, flow in enumerate(flows):
                if index in self.broken_flows or not isinstance(flow, dict):
                    continue
                names = {name for key in ("from", "to", "services") for name in _as_names(flow.get(key))
                         if isinstance(name, str)}
                if names & tainted:
                    continue
                kept.append(index)
        catalog = {"portguard_networks": self._networks(), "portguard_services": self._services(standins=False),
                   "portguard_flows": [flows[index] for index in kept], "portguard_deny_all": True}
        management = self.catalog.get("portguard_management")
        if isinstance(management, dict) and not self.broken_management:
            names = {name for key in ("from", "services") for name in _as_names(management.get(key))
                     if isinstance(name, str)}
            if names & tainted:
                self.broken_management = True  # left out: not "missing" either
            else:
                catalog["portguard_management"] = management
        self.kept_flows = kept
        self.valid_catalog = catalog
        try:
            return self.compile(catalog, hostvars=self._clean_hostvars())
        except CatalogError:
            return None  # an error that only shows in the whole catalog: it is reported already

    # warnings ------------------------------------------------------------------
    def _flow_path(self, path: str) -> str:
        kept = self.kept_flows
        if kept is None:
            return path
        return _FLOW_PATH.sub(lambda m: f"portguard_flows[{kept[int(m.group(1))]}]", path, count=1)

    def _warnings(self, policy) -> list[Finding]:
        builder = policy._builder
        findings = []
        sourceless = {self._flow_path(f.path).removesuffix(".from") for f in policy.findings
                      if f.code == "flow-without-source"}
        for finding in policy.findings:
            path = self._flow_path(finding.path)
            if finding.code in ("flow-shadowed", "flow-duplicate") and path in sourceless:
                continue  # a flow without sources is trivially covered by any other: flow-without-source says it
            if finding.code == "host-without-address" and path.removeprefix("hostvars.") in self.broken_hosts:
                continue
            if finding.code == "management-missing" and self.broken_management:
                continue
            level = "error" if finding.code in _RAISED_TO_ERROR else finding.level
            findings.append(Finding(level, finding.code, path, finding.message))
        findings.extend(self._management(builder))
        findings.extend(self._unused(self.catalog))
        findings.extend(self._overlaps(self.valid_catalog))
        findings.extend(self._family_gaps(builder))
        findings.extend(self._expiring())
        return findings

    def _management(self, builder):
        flow = builder.management
        if flow is None or any(flow.sources[family] for family in FAMILIES):
            return []
        return [Finding("error", "management-without-source", "portguard_management.from",
                        "the management floor resolves to no address: nobody can reach the hosts to manage them")]

    def _unused(self, catalog):
        """Networks and services that nothing refers to (expired flows count: they are reported already)."""
        networks = catalog.get("portguard_networks")
        services = catalog.get("portguard_services")
        networks = networks if isinstance(networks, dict) else {}
        services = services if isinstance(services, dict) else {}
        used_names, used_services = set(), set()
        for entries in networks.values():
            used_names.update(entry for entry in _as_names(entries) if isinstance(entry, str))
        flows = catalog.get("portguard_flows")
        sources = [flow for flow in flows if isinstance(flow, dict)] if isinstance(flows, list) else []
        management = catalog.get("portguard_management")
        if isinstance(management, dict):
            sources.append(management)
        for item in sources:
            used_names.update(name for name in _as_names(item.get("from")) if isinstance(name, str))
            used_services.update(name for name in _as_names(item.get("services")) if isinstance(name, str))
        findings = [Finding("warning", "network-unused", f"portguard_networks.{name}",
                            f"network {name} is referenced by no flow, no other network and not by the management floor")
                    for name in networks if name not in used_names and name not in self.broken_networks]
        findings += [Finding("warning", "service-unused", f"portguard_services.{name}",
                             f"service {name} is allowed by no flow and not by the management floor")
                     for name in services if name not in used_services and name not in self.broken_services]
        return findings

    def _overlaps(self, catalog):
        """Networks whose own addresses overlap, unless one includes the other by name.

        Only the addresses written in each network count: a network that includes an
        overlapping one by name would only repeat the finding of the one it includes.
        """
        raw = catalog.get("portguard_networks")
        raw = raw if isinstance(raw, dict) else {}
        includes: dict[str, set] = {}

        def members(name, seen=()):
            if name not in includes:
                found = set()
                for entry in _as_names(raw.get(name)):
                    if isinstance(entry, str) and entry in raw and entry not in seen:
                        found |= {entry, *members(entry, (*seen, name))}
                includes[name] = found
            return includes[name]

        own = {}
        for name in sorted(raw):
            if name in self.broken_networks:
                continue
            per_family = {family: [] for family in FAMILIES}
            for entry in _as_names(raw[name]):
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

    def _family_gaps(self, builder):
        """A flow to hosts with addresses of a family, from sources with none of that family (nor any address)."""
        findings = []
        flows = [*builder.flows, *([builder.management] if builder.management else [])]
        for flow in flows:
            have = {family for family in FAMILIES if flow.sources[family]}
            if not have:
                continue  # flow-without-source says it already
            for family in FAMILIES:
                if family in have:
                    continue
                hosts = sorted(host for host in flow.targets if builder.host_intervals[host][family])
                if not hosts:
                    continue
                other = FAMILY_NAMES[FAMILIES[1 - FAMILIES.index(family)]]
                shown = ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else "")
                name = "management floor" if flow.name == MANAGEMENT_FLOW else f"flow {flow.name}"
                path = "portguard_management.from" if flow.name == MANAGEMENT_FLOW else \
                    self._flow_path(f"{flow.path}.from")
                findings.append(Finding(
                    "warning", f"flow-{FAMILY_NAMES[family]}-gap", path,
                    f"{name} allows only {other} sources, but targets with {FAMILY_NAMES[family]} addresses "
                    f"({shown}) are reached over {FAMILY_NAMES[family]} too: those connections are denied"))
        return findings

    def _expiring(self):
        """Flows expiring within ``expiring_days``; expired flows the compile of the valid part left out."""
        findings = []
        flows = self.catalog.get("portguard_flows")
        kept = set(range(len(flows))) if self.kept_flows is None else set(self.kept_flows)
        for index, flow in enumerate(flows if isinstance(flows, list) else []):
            if not isinstance(flow, dict) or "expires" not in flow:
                continue
            try:
                expires = parse_expiry(flow["expires"], "")
            except CatalogError:
                continue  # reported as an error
            path = f"portguard_flows[{index}].expires"
            name = flow.get("name") if isinstance(flow.get("name"), str) else f"portguard_flows[{index}]"
            days = (expires - self.today).days
            if days < 0 and index not in kept:  # the compiler reports the others
                findings.append(Finding("warning", "flow-expired", path,
                                        f"flow {name} expired on {expires.isoformat()}: not rendered"))
            elif 0 <= days <= self.expiring_days:
                when = "today (its last day)" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"
                findings.append(Finding("warning", "flow-expiring", path,
                                        f"flow {name} expires {when}, on {expires.isoformat()}: recertify or remove it"))
        return findings


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith((f"{prefix}.", f"{prefix}["))


def _valid_name(name, kind: str) -> bool:
    try:
        check_inventory_name(name, kind)
    except CatalogError:
        return False
    return True


def _inventory_error(groups, hostvars):
    """The compiler's first refusal of the inventory's names, or None."""
    try:
        check_inventory(groups, hostvars)
    except CatalogError as exc:
        return exc
    return None


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


def lint_catalog(variables, groups, hostvars, today=None, expiring_days=DEFAULT_EXPIRING_DAYS) -> list[Finding]:
    """Findings about the catalog of ``variables`` with the inventory, errors first; never raises on a bad catalog.

    ``variables`` holds the catalog variables (other keys are ignored), ``groups`` and
    ``hostvars`` are plain dicts like Ansible's magic variables. ``today`` (UTC) decides
    which flows have expired and which expire within ``expiring_days`` days.
    """
    if today is None:
        today = datetime.datetime.now(datetime.UTC).date()
    if isinstance(expiring_days, bool) or not isinstance(expiring_days, int) or expiring_days < 0:
        raise ValueError(f"expiring_days must be a whole number of days >= 0, got {expiring_days!r}")
    return _Linter(variables, groups, hostvars, today, expiring_days).run()


def lint_report(findings, today=None, expiring_days=DEFAULT_EXPIRING_DAYS) -> dict:
    """The machine-readable report: counts, the findings as dicts, and readable lines."""
    counts = {level: sum(1 for f in findings if f.level == level) for level in LEVELS}
    return {
        "ok": counts["error"] == 0,
        "errors": counts["error"],
        "warnings": counts["warning"],
        "infos": counts["info"],
        "today": today.isoformat() if today else None,
        "expiring_days": expiring_days,
        "findings": [f.as_dict() for f in findings],
        "lines": [f"{f.level.upper()} {f.code} {f.path}: {f.message}" for f in findings],
    }
