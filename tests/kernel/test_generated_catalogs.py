"""Generated catalogs in a real kernel: what the example inventory does not exercise.

Seeded random catalogs give the renderers address ranges that are no CIDR
(adjacent blocks merged), nested network names, raw CIDRs in flows, port
ranges and lists, TCP+UDP services, more ports from one source than one
iptables multiport rule holds, a port range wider than an ipset element
holds, a peer without IPv6, and an expired flow.
Each host ruleset is loaded (twice) into a namespace, must read back as
rendered, and real probes from every sampled source to every sampled port
must get through exactly as ``Policy.allowed`` says.
"""

import ipaddress
import random
import re

import pytest
from kernel_backends import check_traffic
from kernel_lab import TODAY, NetLab, build_sample, merge_samples
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

pytestmark = pytest.mark.kernel

SEEDS = (3, 7, 12)
TARGET = "target"
TARGET_ADDRESSES = ["10.70.0.1", "fd70::1"]


def generated_inventory(seed: int):
    """``(catalog variables, groups, hostvars)`` of one generated site; all addresses stay in 10/8 and fd00::/8."""
    rng = random.Random(seed)

    def v4():
        start = int(ipaddress.IPv4Address("10.64.0.0"))
        return ipaddress.ip_network(f"{ipaddress.IPv4Address(start + rng.getrandbits(22))}/{rng.randrange(20, 31)}",
                                    strict=False)

    def v6():
        start = int(ipaddress.IPv6Address("fd71::"))
        return ipaddress.ip_network(f"{ipaddress.IPv6Address(start + rng.getrandbits(112))}/{rng.randrange(56, 127)}",
                                    strict=False)

    peers = {f"peer{i}": [f"10.70.{i}.{rng.randrange(2, 250)}", f"fd70::{i}:{rng.randrange(2, 4096):x}"]
             for i in range(1, 4)}
    peers["peer4"] = [f"10.70.4.{rng.randrange(2, 250)}"]  # no IPv6: its flows render nothing for IPv6
    hostvars = {TARGET: {"portguard_addresses": TARGET_ADDRESSES, "portguard_deny": rng.choice(["reject", "drop"])}}
    hostvars.update({name: {"portguard_addresses": addresses} for name, addresses in peers.items()})
    groups = {"all": sorted(hostvars), "peers": sorted(peers), "targets": [TARGET], "ungrouped": []}

    networks = {}
    for index in range(4):
        entries = []
        for _unused in range(rng.randrange(1, 3)):
            network = rng.choice([v4, v6])()
            entries.append(str(network))
            if rng.random() < 0.5:  # the next block of the same size: together often a range, not a CIDR
                entries.append(f"{network.broadcast_address + 1}/{network.prefixlen}")
        networks[f"net{index}"] = entries
    networks["nested"] = ["net1", "net2"]

    services = {"ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration", "owner": "tests"}}
    for index in range(5):
        low = rng.randrange(1024, 30000)
        port = rng.choice([low, f"{low}-{low + rng.randrange(1, 12)}", sorted(rng.sample(range(30000, 31000), 3))])
        services[f"svc{index}"] = {"port": port, "proto": rng.choice(["tcp", "udp", ["tcp", "udp"]]),
                                   "purpose": f"Generated service {index}", "owner": "tests"}
    # One more single port than an iptables multiport rule holds.
    services["many"] = {"port": sorted(rng.sample(range(31000, 32000), 16)), "proto": "tcp",
                        "purpose": "Many ports", "owner": "tests"}

    # A range wider than an ipset element holds (core/backends/ipset.py, SET_PORT_SPAN): a rule next to the set.
    services["wide"] = {"port": "40000-40100", "proto": "tcp", "purpose": "Wide range", "owner": "tests"}

    names = [*networks, *peers, "peers"]
    service_names = [name for name in services if name not in ("ssh", "many", "wide")]
    flows = []
    for index in range(5):
        sources = rng.sample(names, rng.randrange(1, 3))
        if rng.random() < 0.3:
            sources.append(str(rng.choice([v4, v6])()))
        flows.append({"name": f"flow{index}", "from": sources, "to": rng.choice([TARGET, "targets"]),
                      "services": rng.sample(service_names, rng.randrange(1, 3))})
    flows.append({"name": "bulk", "from": rng.choice(sorted(peers)), "to": TARGET, "services": ["many"]})
    flows.append({"name": "gone", "from": "any", "to": TARGET, "services": service_names, "expires": "2020-01-31"})
    flows.append({"name": "wide", "from": "peers", "to": TARGET, "services": ["wide"]})
    variables = {"portguard_networks": networks, "portguard_services": services, "portguard_flows": flows,
                 "portguard_management": {"from": ["net0"], "services": ["ssh"]}}
    return variables, groups, hostvars


@pytest.fixture(scope="module")
def generated():
    """seed -> (policy, its probe sample)."""
    result = {}
    for seed in SEEDS:
        variables, groups, hostvars = generated_inventory(seed)
        policy = compile_catalog(variables, groups, hostvars, today=TODAY)
        result[seed] = (policy, build_sample(policy, variables, hosts=(TARGET,), extra_sources=()))
    return result


@pytest.fixture(scope="module")
def generated_lab(generated):
    require("ip", "nft", "sysctl")
    lab = NetLab(merge_samples(sample for _unused, sample in generated.values()))
    try:
        lab.setup()
        lab.become(TARGET)
        lab.check_reachability()
        yield lab
    finally:
        lab.teardown()


def test_generated_catalogs_cover_what_the_example_does_not(generated):
    """Guards the generator: the seeds must still produce the shapes this module is about."""
    policies = [policy.host(TARGET) for policy, _unused in generated.values()]
    iptables = "".join(render_iptables(p).ipv4 + render_iptables(p).ipv6 for p in policies)
    nftables = "".join(render_nftables(p) for p in policies)
    assert "--src-range" in iptables, "no address range that is not a CIDR"
    assert any(sum("bulk/many" in line for line in render_iptables(p).ipv4.splitlines()) > 1 for p in policies), \
        "no source with more ports than one multiport rule holds"
    assert "--dport" in iptables and any(":" in line.split("--dport")[-1].split()[0]
                                         for line in iptables.splitlines() if " --dport " in line), "no port range"
    assert "-p udp" in iptables and "fd71:" in iptables, "no UDP or no IPv6 network"
    assert "drop" in nftables and "reject" in nftables, "not both deny verdicts"
    assert all(policy.expired for policy, _unused in generated.values()), "the expired flow was not reported"
    with_sets = [render_iptables(p, ipset=True) for p in policies]
    assert any(re.search(r",(tcp|udp):\d+-\d+ ", r.ipset) for r in with_sets), "no port range in a set"
    assert all("--dport 40000:40100" in r.ipv4 and "--match-set portguard-in4" in r.ipv4 for r in with_sets), \
        "the wide range is not a rule next to the set"


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_catalog_in_the_kernel(generated_lab, backend, generated, seed):
    policy, sample = generated[seed]
    hp = policy.host(TARGET)
    lab = generated_lab
    lab.reset_firewall()
    lab.become(TARGET)
    backend.load(lab, hp)
    backend.load(lab, hp)
    assert backend.live(lab) == backend.expected(hp)
    assert backend.copies(lab) == backend.expected_copies(hp)
    check_traffic(lab, backend, policy, TARGET, sources=sample.sources, ports=sample.ports)
