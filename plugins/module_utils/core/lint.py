"""Lint the catalog: what ``compile_catalog`` refuses, and what it accepts but is likely a mistake.

``lint_catalog`` never raises on a bad catalog: every refusal becomes an error
finding (code derived from the error class: ``UnknownNameError`` becomes
``unknown-name``), so that a report is always written. The compiler, asked to
collect its errors, compiles each entry on its own and leaves out the entries
that do not compile and the flows that name them: one run lists the errors of
independent entries without cascades, and the warnings are those of the rest.

Levels: ``error`` (the catalog would be refused, or it leaves no management
floor), ``warning`` (accepted, probably a mistake or due for recertification).
"""

import datetime
import re

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog import findings as catalog_findings
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.findings import LEVELS, sort_findings
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import catalog_vars
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import CatalogError
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import Finding
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import parse_int

DEFAULT_EXPIRING_DAYS = 14
# Compiler warnings that lint raises to errors. A missing floor is only a warning in a play: the
# controller's own connection stays open and the firewall action refuses changes that cut it. Lint runs
# before any host is touched, and there it is a mistake: the next admin who connects from elsewhere,
# or the controller after an address change, is locked out.
_RAISED_TO_ERROR = {"management-missing"}


def error_code(error: CatalogError) -> str:
    """``UnknownNameError`` -> ``unknown-name``; ``AddressError`` -> ``address``."""
    name = type(error).__name__.removesuffix("Error") or "catalog"
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _error(error: CatalogError) -> Finding:
    return Finding("error", error_code(error), error.path, error.message)


def _host_ports(policy, hostvars) -> list[Finding]:
    """``ansible_port``: the compile checks it only when it allows the controller's connection."""
    findings = []
    for host in sorted(policy.hosts):
        variables = hostvars.get(host)
        if isinstance(variables, dict) and variables.get("ansible_port") is not None:
            try:
                parse_int(variables["ansible_port"], f"hostvars.{host}.ansible_port", 1, 65535)
            except CatalogError as exc:
                findings.append(_error(exc))
    return findings


def _warnings(policy, catalog, today, expiring_days) -> list[Finding]:
    unresolvable = policy.unresolvable
    findings = []
    sourceless = {f.path.removesuffix(".from") for f in policy.findings if f.code == "flow-without-source"}
    for finding in policy.findings:
        if finding.code in ("flow-shadowed", "flow-duplicate") and finding.path in sourceless:
            continue  # a flow without sources is trivially covered by any other: flow-without-source says it
        level = "error" if finding.code in _RAISED_TO_ERROR else finding.level
        findings.append(Finding(level, finding.code, finding.path, finding.message))
    findings.extend(catalog_findings.management_without_source(policy.management))
    findings.extend(catalog_findings.unused(catalog, unresolvable["networks"], unresolvable["services"]))
    networks = catalog.get("portguard_networks")
    if isinstance(networks, dict):  # as compiled: a network that does not resolve stands for no address
        networks = {name: [] if name in unresolvable["networks"] else entries
                    for name, entries in networks.items() if name in policy.networks}
    findings.extend(catalog_findings.overlapping_networks(networks, unresolvable["networks"]))
    findings.extend(catalog_findings.family_gaps([*policy.flows, *([policy.management] if policy.management else [])],
                                                 policy.host_intervals))
    flows = catalog.get("portguard_flows")
    compiled = [index for index in range(len(flows)) if index not in unresolvable["flows"]] \
        if isinstance(flows, list) else None
    findings.extend(catalog_findings.expiring(flows, today, expiring_days, compiled))
    return findings


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
    catalog = catalog_vars(variables or {})
    groups = groups if isinstance(groups, dict) else {}
    hostvars = hostvars if isinstance(hostvars, dict) else {}
    policy, errors = compile_catalog(catalog, groups, hostvars, today=today, collect_errors=True)
    findings = [_error(error) for error in errors]
    findings.extend(_host_ports(policy, hostvars))
    findings.extend(_warnings(policy, catalog, today, expiring_days))
    return sort_findings(findings)


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
