"""Property tests over random catalogs.

- Reordering or duplicating catalog entries changes neither renderer's output.
- The entries of one host, family and protocol never overlap.
- ``allowed()`` and ``allowed_out()`` agree with a brute-force reading of the
  catalog written here independently of the compiler (``Reference``), and every
  rendered entry is justified by a flow its labels name, in the entry's family:
  a flow whose sources have no address of a family renders nothing for it.

Addresses and ports are drawn from small pools so that random networks,
hosts and port ranges overlap often.
"""

import copy
import datetime
import ipaddress
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

TODAY = datetime.date(2026, 11, 26)
V4_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
V6_BASE = int(ipaddress.IPv6Address("fd00::"))
POOL = 64  # addresses per family: 10.0.0.0/26 and fd00::/122
MAX_PORT = 30
PROTOS = ("tcp", "udp")
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cidr(family, offset, prefix):
    """The network of the given prefix length that holds pool address ``offset``."""
    if family == 4:
        return str(ipaddress.ip_network((V4_BASE + offset, prefix), strict=False))
    return str(ipaddress.ip_network((V6_BASE + offset, prefix), strict=False))


def address(family, offset):
    return str(ipaddress.ip_address((V4_BASE if family == 4 else V6_BASE) + offset))


networks_4 = st.builds(cidr, st.just(4), st.integers(0, POOL - 1), st.integers(26, 32))
networks_6 = st.builds(cidr, st.just(6), st.integers(0, POOL - 1), st.integers(122, 128))
port_items = st.one_of(
    st.integers(1, MAX_PORT),
    st.tuples(st.integers(1, MAX_PORT), st.integers(0, 8)).map(lambda t: f"{t[0]}-{min(MAX_PORT, t[0] + t[1])}"),
)
expiries = st.sampled_from([None, None, TODAY - datetime.timedelta(days=1), TODAY, TODAY + datetime.timedelta(days=1)])


@st.composite
def catalogs(draw):
    hosts = [f"h{index}" for index in range(draw(st.integers(1, 4)))]
    hostvars = {}
    for host in hosts:
        addresses = draw(st.lists(st.builds(address, st.just(4), st.integers(0, POOL - 1)), max_size=2))
        addresses += draw(st.lists(st.builds(address, st.just(6), st.integers(0, POOL - 1)), max_size=1))
        hostvars[host] = {"portguard_addresses": addresses, "portguard_egress": draw(st.booleans())}
    groups = {f"g{index}": draw(st.lists(st.sampled_from(hosts), max_size=3)) for index in range(draw(st.integers(0, 3)))}
    groups["all"] = list(hosts)

    networks = {}
    for index in range(draw(st.integers(0, 4))):
        entry = st.one_of(networks_4, networks_6, *([st.sampled_from(sorted(networks))] if networks else []))
        networks[f"n{index}"] = draw(st.lists(entry, min_size=1, max_size=3))

    services = {}
    for index in range(draw(st.integers(1, 4))):
        port = draw(st.one_of(port_items, st.lists(port_items, min_size=1, max_size=3)))
        proto = draw(st.sampled_from(["tcp", "udp", ["tcp", "udp"], ["udp", "tcp"]]))
        services[f"s{index}"] = {"port": port, "proto": proto, "purpose": f"purpose {index}", "owner": "team"}

    source_names = st.sampled_from([*networks, *groups, *hosts, "any"])
    sources = st.one_of(source_names, networks_4, networks_6)
    flows = []
    for index in range(draw(st.integers(0, 5))):
        flow = {
            "from": draw(st.lists(sources, min_size=1, max_size=3)),
            "to": draw(st.lists(st.sampled_from([*groups, *hosts]), min_size=1, max_size=2)),
            "services": draw(st.lists(st.sampled_from(sorted(services)), min_size=1, max_size=3)),
        }
        if draw(st.booleans()):
            flow["name"] = f"f{index}"
        expires = draw(expiries)
        if expires is not None:
            flow["expires"] = expires
        flows.append(flow)
    catalog = {"portguard_networks": networks, "portguard_services": services, "portguard_flows": flows}
    if not flows:
        catalog["portguard_deny_all"] = True
    if draw(st.booleans()):
        catalog["portguard_management"] = {"from": draw(st.lists(sources, min_size=1, max_size=2)),
                                           "services": [draw(st.sampled_from(sorted(services)))]}
    return catalog, groups, hostvars


def shuffled(items, rng):
    """``items`` in another order, some of them twice."""
    items = list(items) + [item for item in items if rng.random() < 0.3]
    rng.shuffle(items)
    return items


def reordered_dict(mapping, rng):
    keys = list(mapping)
    rng.shuffle(keys)
    return {key: mapping[key] for key in keys}


def scramble(catalog, groups, hostvars, rng):
    """The same catalog and inventory, with every list reordered and partly duplicated."""
    catalog, groups, hostvars = copy.deepcopy((catalog, groups, hostvars))
    catalog["portguard_networks"] = reordered_dict(
        {name: shuffled(entries, rng) for name, entries in catalog["portguard_networks"].items()}, rng)
    for spec in catalog["portguard_services"].values():
        if isinstance(spec["port"], list):
            spec["port"] = shuffled(spec["port"], rng)
    catalog["portguard_services"] = reordered_dict(catalog["portguard_services"], rng)
    for flow in catalog["portguard_flows"]:
        for key in ("from", "to", "services"):
            flow[key] = shuffled(flow[key], rng)
    catalog["portguard_flows"] = shuffled(catalog["portguard_flows"], rng)
    if "portguard_management" in catalog:
        catalog["portguard_management"]["from"] = shuffled(catalog["portguard_management"]["from"], rng)
    groups = reordered_dict({name: shuffled(members, rng) for name, members in groups.items()}, rng)
    for variables in hostvars.values():
        variables["portguard_addresses"] = shuffled(variables["portguard_addresses"], rng)
    return reordered_dict(catalog, rng), groups, reordered_dict(hostvars, rng)


def render_all(catalog, groups, hostvars):
    policy = compile_catalog(catalog, groups, hostvars, today=TODAY)
    return {host: (render_nftables(policy.host(host)), render_iptables(policy.host(host)).as_dict())
            for host in sorted(policy.hosts)}


@SETTINGS
@given(catalogs(), st.randoms(use_true_random=False))
def test_reordering_or_duplicating_entries_changes_nothing(generated, rng):
    catalog, groups, hostvars = generated
    original = render_all(catalog, groups, hostvars)
    assert render_all(*scramble(catalog, groups, hostvars, rng)) == original
    assert render_all(catalog, groups, hostvars) == original


@SETTINGS
@given(catalogs())
def test_entries_never_overlap(generated):
    policy = compile_catalog(*generated, today=TODAY)
    for host in policy.hosts:
        host_policy = policy.host(host)
        for pool in (host_policy.ingress, host_policy.egress):
            for index, first in enumerate(pool):
                for second in pool[index + 1:]:
                    if (first.family, first.proto) != (second.family, second.proto):
                        continue
                    assert (first.addr_hi < second.addr_lo or second.addr_hi < first.addr_lo
                            or first.port_hi < second.port_lo or second.port_hi < first.port_lo), (first, second)


class Reference:
    """What the catalog allows, read naively from the raw variables (no merging, no intervals)."""

    def __init__(self, catalog, groups, hostvars):
        self.catalog, self.groups, self.hostvars = catalog, groups, hostvars
        self.flows = []  # (name, source networks, target hosts, {(proto, port)})
        for index, flow in enumerate(catalog["portguard_flows"]):
            if flow.get("expires") is not None and flow["expires"] < TODAY:
                continue
            name = flow.get("name", f"unnamed{index}")
            self.flows.append((name, self.networks(flow["from"]), self.targets(flow["to"]), self.ports(flow["services"])))
        management = catalog.get("portguard_management")
        if management:
            self.flows.append(("management", self.networks(management["from"]), set(hostvars),
                               self.ports(management["services"])))

    def host_networks(self, host):
        return [ipaddress.ip_network(value) for value in self.hostvars[host]["portguard_addresses"]]

    def host_addresses(self, host):
        return {ipaddress.ip_address(value) for value in self.hostvars[host]["portguard_addresses"]}

    def networks(self, names):
        result = []
        for name in names:
            if name == "any":
                result += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            elif name in self.catalog["portguard_networks"]:
                result += self.networks(self.catalog["portguard_networks"][name])
            elif name in self.groups:
                for host in self.groups[name]:
                    result += self.host_networks(host)
            elif name in self.hostvars:
                result += self.host_networks(name)
            else:
                result.append(ipaddress.ip_network(name))
        return result

    def targets(self, names):
        return {host for name in names for host in (self.groups[name] if name in self.groups else [name])}

    def ports(self, names):
        result = set()
        for name in names:
            spec = self.catalog["portguard_services"][name]
            protos = spec["proto"] if isinstance(spec["proto"], list) else [spec["proto"]]
            items = spec["port"] if isinstance(spec["port"], list) else [spec["port"]]
            for item in items:
                low, _unused, high = str(item).partition("-")
                for port in range(int(low), int(high or low) + 1):
                    result.update((proto, port) for proto in protos)
        return result

    def why_in(self, src, host, port, proto):
        src = ipaddress.ip_address(src)
        return {name for name, networks, targets, ports in self.flows
                if host in targets and (proto, port) in ports and any(src in net for net in networks)}

    def allowed_out(self, host, dst, port, proto):
        dst = ipaddress.ip_address(dst)
        if not self.hostvars[host]["portguard_egress"]:
            return True
        mine = [ipaddress.ip_address(a) for a in self.hostvars[host]["portguard_addresses"]]
        for _unused, networks, targets, ports in self.flows:
            if (proto, port) not in ports:
                continue
            if not any(a.version == dst.version and any(a in net for net in networks) for a in mine):
                continue
            if any(dst in self.host_addresses(target) for target in targets - {host}):
                return True
        return False


samples = st.lists(st.tuples(
    st.builds(address, st.sampled_from([4, 6]), st.integers(0, POOL + 3)),
    st.integers(1, MAX_PORT + 1),
    st.sampled_from(PROTOS),
), min_size=20, max_size=60)


def boundaries(policy, reference):
    """Addresses and ports at and just beside every edge of the catalog and of the rendered entries.

    Random points rarely hit an edge that is off by one; these always do.
    """
    addresses, ports = {4: set(), 6: set()}, set()
    for host in policy.hosts:
        host_policy = policy.host(host)
        for entry in (*host_policy.ingress, *host_policy.egress):
            addresses[entry.family].update((entry.addr_lo - 1, entry.addr_lo, entry.addr_hi, entry.addr_hi + 1))
            ports.update((entry.port_lo - 1, entry.port_lo, entry.port_hi, entry.port_hi + 1))
    for _unused, networks, _unused, flow_ports in reference.flows:
        for net in networks:
            low, high = int(net.network_address), int(net.broadcast_address)
            addresses[net.version].update((low - 1, low, high, high + 1))
        for _unused, port in flow_ports:
            ports.update((port - 1, port, port + 1))
    texts = []
    for family, cls, top in ((4, ipaddress.IPv4Address, 2**32 - 1), (6, ipaddress.IPv6Address, 2**128 - 1)):
        texts += [str(cls(value)) for value in sorted(addresses[family]) if 0 <= value <= top]
    return texts, sorted(port for port in ports if 1 <= port <= 65535)


@SETTINGS
@given(catalogs(), samples)
def test_allowed_agrees_with_a_brute_force_reading(generated, points):
    policy = compile_catalog(*generated, today=TODAY)
    reference = Reference(*generated)
    edge_addresses, edge_ports = boundaries(policy, reference)
    points = [*points, *((src, port, proto) for src in edge_addresses for port in edge_ports for proto in PROTOS)]
    for host in sorted(policy.hosts):
        host_policy = policy.host(host)
        for src, port, proto in points:
            assert policy.allowed(src, host, port, proto) == bool(reference.why_in(src, host, port, proto)), \
                (host, src, port, proto)
            assert host_policy.allowed_out(src, port, proto) == reference.allowed_out(host, src, port, proto), \
                (host, src, port, proto)


@SETTINGS
@given(catalogs())
def test_every_entry_is_justified_by_its_labels(generated):
    """Each corner of an ingress entry is allowed by one of the flows its labels name, in the entry's family.

    Not by all of them: merged neighbours carry the labels of every flow that contributed.
    """
    catalog = copy.deepcopy(generated[0])
    for index, flow in enumerate(catalog["portguard_flows"]):
        flow["name"] = f"unnamed{index}" if "name" not in flow else flow["name"]
    policy = compile_catalog(catalog, generated[1], generated[2], today=TODAY)
    reference = Reference(catalog, generated[1], generated[2])
    for host in sorted(policy.hosts):
        for entry in policy.host(host).ingress:
            cls = ipaddress.IPv4Address if entry.family == 4 else ipaddress.IPv6Address
            for addr in (entry.addr_lo, entry.addr_hi):
                for port in (entry.port_lo, entry.port_hi):
                    why = reference.why_in(str(cls(addr)), host, port, entry.proto)
                    assert {label.flow for label in entry.labels} & why, (host, entry)


def test_reference_is_not_trivial():
    """Guard against a vacuous reference: a hand-made case with both answers."""
    catalog = {
        "portguard_networks": {"n0": ["10.0.0.0/30"]},
        "portguard_services": {"s0": {"port": "5-6", "proto": "udp"}},
        "portguard_flows": [{"from": ["n0"], "to": ["h1"], "services": ["s0"]}],
    }
    hostvars = {"h0": {"portguard_addresses": ["10.0.0.1"], "portguard_egress": True},
                "h1": {"portguard_addresses": ["10.0.0.9", "fd00::9"], "portguard_egress": False}}
    reference = Reference(catalog, {"all": ["h0", "h1"]}, hostvars)
    policy = compile_catalog(catalog, {"all": ["h0", "h1"]}, hostvars, today=TODAY)
    assert reference.why_in("10.0.0.3", "h1", 6, "udp") == {"unnamed0"}
    assert policy.allowed("10.0.0.3", "h1", 6, "udp")
    assert not reference.why_in("10.0.0.4", "h1", 6, "udp") and not policy.allowed("10.0.0.4", "h1", 6, "udp")
    assert reference.allowed_out("h0", "10.0.0.9", 5, "udp") and policy.host("h0").allowed_out("10.0.0.9", 5, "udp")
    assert not reference.allowed_out("h0", "fd00::9", 5, "udp") and not policy.host("h0").allowed_out("fd00::9", 5, "udp")


def test_scramble_really_reorders():
    rng = random.Random(1)
    catalog = {"portguard_networks": {"a": ["10.0.0.0/30", "10.0.0.8/30", "fd00::/126"]}, "portguard_services": {},
               "portguard_flows": []}
    seen = {tuple(scramble(catalog, {}, {}, rng)[0]["portguard_networks"]["a"]) for _unused in range(20)}
    assert len(seen) > 1
