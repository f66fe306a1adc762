"""Filters over the pure core: render a host's ruleset, ask the decision function."""

from ansible.errors import AnsibleFilterError

from ansible_collections.portguard.hardening.plugins.module_utils.catalog import (
    CATALOG_VARS,
    compile_cached,
    select_hostvars,
)
from ansible_collections.portguard.hardening.plugins.module_utils.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.render_iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.render_nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.summary import policy_summary


def _policy(hostvars, groups, host):
    try:
        all_hosts = groups["all"]
        plain_groups = {name: list(members) for name, members in groups.items()}
        own = hostvars[host]
        variables = {name: own[name] for name in CATALOG_VARS if name in own}
        return compile_cached(variables, plain_groups, select_hostvars(hostvars, all_hosts))
    except PortguardError as exc:
        raise AnsibleFilterError(f"portguard catalog refused: {exc}") from exc


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


class FilterModule:
    def filters(self):
        return {"ruleset": ruleset, "allowed": allowed, "summary": summary}
