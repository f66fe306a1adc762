"""The catalog lint as a filter: findings about the catalog and the inventory, without contacting a host."""

import datetime

from ansible.errors import AnsibleFilterError

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.inventory import select_hostvars
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import CATALOG_VARS
from ansible_collections.portguard.hardening.plugins.module_utils.core.lint import (
    DEFAULT_EXPIRING_DAYS,
    lint_catalog,
    lint_report,
)


def _today(value):
    if value is None or value == "":
        return datetime.datetime.now(datetime.UTC).date()
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.date.fromisoformat(str(value))
    except ValueError:
        raise AnsibleFilterError(f"today: expected a date (YYYY-MM-DD), got {value!r}") from None


def _days(value):
    try:
        days = int(value)
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"expiring_days: expected a whole number of days, got {value!r}") from None
    if days < 0 or isinstance(value, bool):
        raise AnsibleFilterError(f"expiring_days: expected a whole number of days >= 0, got {value!r}")
    return days


def lint(hostvars, groups, expiring_days=DEFAULT_EXPIRING_DAYS, today=None, host=None):
    """Lint report of the inventory's catalog; a refused catalog is an error finding, never an exception."""
    today = _today(today)
    days = _days(expiring_days)
    all_hosts = list(groups.get("all") or [])
    plain_groups = {name: list(members) for name, members in groups.items()}
    source = host if host is not None else (all_hosts[0] if all_hosts else None)
    if source is None and "localhost" in hostvars:
        source = "localhost"  # an inventory without hosts: the implicit localhost still gets group_vars/all
    variables = {}
    if source is not None:
        own = hostvars[source]
        variables = {name: own[name] for name in CATALOG_VARS if name in own}
    findings = lint_catalog(variables, plain_groups, select_hostvars(hostvars, all_hosts), today=today,
                            expiring_days=days)
    return lint_report(findings, today=today, expiring_days=days)


class FilterModule:
    def filters(self):
        return {"lint": lint}
