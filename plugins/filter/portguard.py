"""Filters over the pure core: render a host's ruleset, ask the decision function, name report files."""

from ansible.errors import AnsibleFilterError

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import DENIED_COUNTERS
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.core.summary import policy_summary
from ansible_collections.portguard.hardening.plugins.module_utils.core.verify import matrix
from ansible_collections.portguard.hardening.plugins.plugin_utils.compile_cache import (
    FILTER_SCOPE,
    CacheRefused,
    cached_compile,
)
from ansible_collections.portguard.hardening.plugins.plugin_utils.report_files import report_file_name


def _policy(hostvars, groups, host):
    try:
        return cached_compile(hostvars[host], groups, hostvars, FILTER_SCOPE)
    except PortguardError as exc:
        raise AnsibleFilterError(f"portguard catalog refused: {exc}") from exc
    except CacheRefused as exc:
        raise AnsibleFilterError(exc.message) from None  # the same words: no second "caused by"


def ruleset(hostvars, groups, host, backend="nftables"):
    policy = _policy(hostvars, groups, host).host(host)
    if backend == "nftables":
        return render_nftables(policy)
    if backend == "iptables":
        return render_iptables(policy).as_dict()
    raise AnsibleFilterError(f"unknown backend {backend!r}; expected nftables or iptables")


def allowed(hostvars, groups, src_address, dst_host, port, proto="tcp"):
    return _policy(hostvars, groups, dst_host).allowed(src_address, dst_host, int(port), proto)


def summary(hostvars, groups):
    hosts = groups["all"]
    return policy_summary(_policy(hostvars, groups, hosts[0]), hosts)


def probe_plan(hostvars, groups, hosts, random_port=47123):
    """Probes and their expectations from the catalog, listeners per target, targets per prober."""
    hosts = list(hosts)
    policy = _policy(hostvars, groups, hosts[0])
    plain_groups = {name: list(members) for name, members in groups.items()}
    plan = matrix.build_plan(policy, plain_groups, hosts, random_port=int(random_port))
    return {"plan": plan, "listeners": matrix.listener_ports(plan), "probes": matrix.probes_by_source(plan),
            "self_checks": matrix.self_checks(plan)}


def verify_matrix(hostvars, plan, hosts, probe_var="__portguard_probe", before_var="__portguard_counters_before",
                  after_var="__portguard_counters_after"):
    """Join the registered probe results and counters of ``hosts`` to the plan: the verdict and its reports."""
    results, before, after = {}, {}, {}
    for host in hosts:
        variables = hostvars[host]
        probe = variables.get(probe_var) or {}
        if probe.get("results"):
            results[host] = probe["results"]
        for store, name in ((before, before_var), (after, after_var)):
            counters = (variables.get(name) or {}).get("counters") or {}
            for name, direction in DENIED_COUNTERS.items():
                if counters.get(name) is not None:
                    store[f"{host}/{direction}"] = counters[name]
    cells, problems, counters = matrix.evaluate(plan, results, before, after)
    return {
        "ok": not problems,
        "problems": problems,
        "counters": counters,
        "cells": len(cells),
        "table": matrix.render_table(cells),
        "json": matrix.to_json(cells, problems, counters),
        "junit": matrix.to_junit(cells, problems, counters),
        "html": matrix.to_html(cells, problems, counters),
    }


class FilterModule:
    def filters(self):
        return {"ruleset": ruleset, "allowed": allowed, "summary": summary, "probe_plan": probe_plan,
                "verify_matrix": verify_matrix, "report_file_name": report_file_name}
