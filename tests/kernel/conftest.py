"""Fixtures of the kernel tests: the compiled example catalog, its probe sample and the namespaces."""

import copy

import pytest
from kernel_backends import Iptables, Nftables
from kernel_lab import HOSTS, TODAY, NetLab, build_sample
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

LAB_TOOLS = ("ip", "nft", "sysctl")
BACKENDS = {"nftables": Nftables, "iptables": lambda: Iptables("default"),
            "iptables-rules": lambda: Iptables("default", ipset=False),
            "iptables-legacy": lambda: Iptables("legacy"),
            "iptables-legacy-rules": lambda: Iptables("legacy", ipset=False)}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request):
    """nftables; iptables through the default iptables-restore (iptables-nft on Debian 12) and iptables-legacy,
    each with the whitelist in ipsets and with the per-source rules fallback (``-rules``)."""
    chosen = BACKENDS[request.param]()
    require(*chosen.tools)
    return chosen


@pytest.fixture(scope="session")
def compile_example(example_inventory):
    """``compile_example(**overrides)``: the example catalog compiled with per-host variable overrides.

    ``compile_example(db1={"portguard_mode": "audit"})`` is the example with db1 in audit mode.
    """
    variables, groups, hostvars = example_inventory

    def build(**overrides):
        changed = copy.deepcopy(hostvars)
        for host, values in overrides.items():
            changed[host].update(values)
        return compile_catalog(variables, groups, changed, today=TODAY)

    return build


@pytest.fixture(scope="session")
def sample(example_inventory, compile_example):
    return build_sample(compile_example(), example_inventory[0])


@pytest.fixture(scope="module")
def netlab(sample):
    """Two namespaces joined by a veth pair, listeners on every sampled port in both, checked to pass traffic."""
    require(*LAB_TOOLS)
    lab = NetLab(sample)
    try:
        lab.setup()
        lab.become(HOSTS[0])
        lab.check_reachability()
        yield lab
    finally:
        lab.teardown()
