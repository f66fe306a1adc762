#!/usr/bin/env python
"""Generate a large, deterministic catalog and inventory for the benchmarks.

Shape (defaults; every number is an option):

- 10,000 network entries (addresses and CIDRs, about 70 % IPv4 and 30 % IPv6,
  some duplicated or covered by a wider entry of another network), in two kinds
  of networks: 20 large ``partnerNN`` lists of about 400 entries each, and about
  400 small ``netNNNN`` networks of about 5 entries (offices, VPNs, partners'
  single hosts). ``small_all`` names every small network; ``admin`` is the
  management network.
- 1,000 services (``ssh`` plus ``svcNNNN``): single ports and ranges, TCP, UDP
  or both; each group owns its share.
- 1,000 hosts in 20 groups. ``edge`` (2 hosts) is the big one: one flow from
  each partner list and one from ``small_all``, so its whitelist holds about
  10,000 elements: that is the "one host's ruleset from a 10,000-entry
  catalog". The other groups get a few flows from small networks, from other
  groups and from single hosts, a few with ``expires`` (some in the past).
  Half the hosts are dual-stack; the ``dmz`` group enforces egress too.

``python bench/gen_catalog.py --out DIR`` writes ``DIR/catalog.json``
(``variables``, ``groups``, ``hostvars``) and, for the big host, the
equivalent Aerleon inputs: ``DIR/aerleon/def/NETWORK.net``,
``DIR/aerleon/def/SERVICES.svc`` and ``DIR/aerleon/policies/pol/<host>.pol``
(one ``nftables mixed INPUT`` filter with one term per flow).
"""

import argparse
import datetime
import ipaddress
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("web", "api", "db", "cache", "queue", "search", "auth", "mail", "dns", "ldap", "log", "metrics",
         "backup", "build", "git", "chat", "files", "dmz", "batch")
BIG_GROUP = "edge"
TODAY = datetime.date(2026, 6, 1)  # the benchmarks compile with this date, so that expiry is deterministic


@dataclass
class Generated:
    variables: dict
    groups: dict
    hostvars: dict
    big_host: str
    network_entries: int
    aerleon: dict = field(default_factory=dict)  # relative path -> text


class _Addresses:
    """Random, mostly distinct entries, with a share of overlaps (duplicates and covering supernets)."""

    def __init__(self, rng: random.Random, v6_share: float, overlap_share: float):
        self.rng = rng
        self.v6_share = v6_share
        self.overlap_share = overlap_share
        self.made: list[ipaddress._BaseNetwork] = []

    def entry(self) -> str:
        rng = self.rng
        if self.made and rng.random() < self.overlap_share:
            base = rng.choice(self.made)
            if rng.random() < 0.5:
                net = base  # the same entry in a second network
            else:
                net = base.supernet(prefixlen_diff=min(base.prefixlen, rng.randint(2, 6)))
        elif rng.random() < self.v6_share:
            address = int(ipaddress.IPv6Address("2001:db8::")) + rng.getrandbits(64) * (1 << 32) + rng.getrandbits(32)
            prefix = 128 if rng.random() < 0.7 else rng.choice((64, 96, 112, 120))
            net = ipaddress.IPv6Network((address, prefix), strict=False)
        else:
            address = int(ipaddress.IPv4Address("172.16.0.0")) + rng.getrandbits(20)
            prefix = 32 if rng.random() < 0.8 else rng.randint(24, 30)
            net = ipaddress.IPv4Network((address, prefix), strict=False)
        self.made.append(net)
        if net.prefixlen == net.max_prefixlen:
            return str(net.network_address)
        return str(net)


def _services(rng: random.Random, count: int) -> dict:
    services = {"ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration", "owner": "platform"}}
    used = {22}
    index = 1
    while len(services) < count:
        port = rng.randint(1025, 64000)
        if port in used:
            continue
        used.add(port)
        roll = rng.random()
        proto = "tcp" if roll < 0.7 else "udp" if roll < 0.85 else ["tcp", "udp"]
        spec = {"port": port, "proto": proto, "purpose": f"Service {index}", "owner": f"team{index % 37}"}
        if rng.random() < 0.05:
            spec["port"] = f"{port}-{port + rng.randint(2, 20)}"
            used.update(range(port, port + 21))
        services[f"svc{index:04d}"] = spec
        index += 1
    return services


def generate(*, seed: int = 2026, network_entries: int = 10_000, services: int = 1_000, hosts: int = 1_000,
             groups: int = 20, partners: int = 20, partner_share: float = 0.8, small_size: int = 5,
             big_hosts: int = 2, v6_share: float = 0.3, overlap_share: float = 0.03) -> Generated:
    rng = random.Random(seed)
    addresses = _Addresses(rng, v6_share, overlap_share)

    # networks --------------------------------------------------------------
    networks: dict[str, list] = {"admin": ["10.99.0.0/24", "fd00:99::/64"]}
    remaining = network_entries - 2
    partner_total = int(remaining * partner_share)
    for index in range(partners):
        size = partner_total // partners + (1 if index < partner_total % partners else 0)
        networks[f"partner{index:02d}"] = [addresses.entry() for _number in range(size)]
    small_total = remaining - partner_total
    small_names = []
    while small_total > 0:
        size = min(small_total, max(1, round(rng.expovariate(1 / small_size))))
        name = f"net{len(small_names):04d}"
        networks[name] = [addresses.entry() for _number in range(size)]
        small_names.append(name)
        small_total -= size
    networks["small_all"] = list(small_names)
    entries = sum(len(v) for k, v in networks.items() if k != "small_all")
    assert entries == network_entries, entries

    # services ------------------------------------------------------------
    service_specs = _services(rng, services)
    service_names = sorted(service_specs)
    roles = [BIG_GROUP, *ROLES[: groups - 1]]
    while len(roles) < groups:
        roles.append(f"group{len(roles):02d}")
    owned = {role: service_names[1:][index::groups] for index, role in enumerate(roles)}

    # inventory -------------------------------------------------------------
    group_hosts: dict[str, list[str]] = {}
    hostvars: dict[str, dict] = {}
    others = hosts - big_hosts
    for index, role in enumerate(roles):
        count = big_hosts if role == BIG_GROUP else others // (groups - 1) + (1 if index - 1 < others % (groups - 1) else 0)
        members = []
        for number in range(count):
            name = f"{role}-{number:03d}"
            v4 = f"10.{128 + index}.{number // 200}.{number % 200 + 1}"
            variables = {"ansible_host": v4}
            if number % 2 == 0:
                variables["portguard_addresses"] = [v4, f"fd00:{128 + index:x}::{number + 1:x}"]
            if role == "dmz":
                variables["portguard_egress"] = True
            if number % 10 == 9:
                variables["portguard_backend"] = "iptables"
            hostvars[name] = variables
            members.append(name)
        group_hosts[role] = members
    group_hosts["all"] = sorted(hostvars)

    # flows -------------------------------------------------------------------
    flows = []
    # one protocol per edge service, so that the big host's whitelist holds about one element per network entry
    edge_services = [name for name in owned[BIG_GROUP] if isinstance(service_specs[name]["proto"], str)]
    for index in range(partners):
        flows.append({"name": f"partner{index:02d}-to-edge", "from": f"partner{index:02d}", "to": BIG_GROUP,
                      "services": [edge_services[index % len(edge_services)]]})
    flows.append({"name": "small-networks-to-edge", "from": "small_all", "to": BIG_GROUP,
                  "services": [edge_services[partners % len(edge_services)]]})
    for role in roles[1:]:
        mine = owned[role]
        for number in range(4):
            flow = {"name": f"nets-to-{role}-{number}", "from": rng.sample(small_names, rng.randint(1, 2)),
                    "to": role, "services": rng.sample(mine, rng.randint(1, 3))}
            roll = rng.random()
            if roll < 0.1:
                flow["expires"] = (TODAY - datetime.timedelta(days=rng.randint(1, 300))).isoformat()
            elif roll < 0.25:
                flow["expires"] = (TODAY + datetime.timedelta(days=rng.randint(1, 300))).isoformat()
            flows.append(flow)
        for peer in rng.sample([r for r in roles[1:] if r != role], 2):
            flows.append({"name": f"{peer}-to-{role}", "from": peer, "to": role,
                          "services": rng.sample(mine, rng.randint(1, 2))})
        peer_host = rng.choice(group_hosts[rng.choice(roles[1:])])
        flows.append({"from": peer_host, "to": role, "services": [rng.choice(mine)]})
    variables = {
        "portguard_networks": networks,
        "portguard_services": service_specs,
        "portguard_flows": flows,
        "portguard_management": {"from": ["admin"], "services": ["ssh"]},
    }
    big_host = group_hosts[BIG_GROUP][0]
    generated = Generated(variables, group_hosts, hostvars, big_host, entries)
    generated.aerleon = aerleon_inputs(variables, group_hosts, hostvars, big_host)
    return generated


# Aerleon -----------------------------------------------------------------------
def _token(name: str) -> str:
    return "PG_" + "".join(ch if ch.isalnum() else "_" for ch in name).upper()


def _host_addresses(host: str, hostvars: dict) -> list[str]:
    variables = hostvars[host]
    return list(variables.get("portguard_addresses") or [variables["ansible_host"]])


def aerleon_inputs(variables: dict, groups: dict, hostvars: dict, host: str) -> dict:
    """Definitions and one ``nftables mixed INPUT`` policy equivalent to ``host``'s whitelist.

    One term per flow that reaches the host (expired ones left out, as the
    compiler does), plus the management floor; default deny.
    """
    networks = variables["portguard_networks"]
    services = variables["portguard_services"]
    host_groups = {name for name, members in groups.items() if host in members}
    net_lines: list[str] = []
    used_networks: set[str] = set()

    def network_token(name: str) -> str:
        token = _token(name)
        if name in networks:
            if name not in used_networks:
                used_networks.add(name)
                members = [network_token(item) if item in networks else item for item in networks[name]]
                net_lines.append(f"{token} = " + "\n    ".join(members))
                net_lines.append("")
        elif name not in used_networks:
            used_networks.add(name)
            members = groups.get(name, [name])
            addresses = [a for h in members for a in _host_addresses(h, hostvars)]
            net_lines.append(f"{token} = " + "\n    ".join(addresses))
            net_lines.append("")
        return token

    svc_lines: list[str] = []
    used_services: set[str] = set()

    def service_token(name: str) -> tuple[str, set]:
        spec = services[name]
        protos = spec.get("proto", "tcp")
        protos = [protos] if isinstance(protos, str) else protos
        if name not in used_services:
            used_services.add(name)
            svc_lines.append(f"{_token(name)} = " + "\n    ".join(f"{spec['port']}/{p}" for p in protos))
            svc_lines.append("")
        return _token(name), set(protos)

    terms = []
    flows = [{"name": "management", **variables["portguard_management"], "to": "all"}, *variables["portguard_flows"]]
    for index, flow in enumerate(flows):
        targets = [flow["to"]] if isinstance(flow["to"], str) else flow["to"]
        if not any(t == host or t in host_groups for t in targets):
            continue
        if "expires" in flow and datetime.date.fromisoformat(flow["expires"]) < TODAY:
            continue
        sources = [flow["from"]] if isinstance(flow["from"], str) else flow["from"]
        source_tokens = [network_token(s) for s in sources]
        tokens, protos = [], set()
        for name in flow["services"]:
            token, proto = service_token(name)
            tokens.append(token)
            protos |= proto
        terms.append("\n".join([
            f"term flow-{index:04d} {{",
            f"  comment:: \"{flow.get('name', 'unnamed')}\"",
            f"  source-address:: {' '.join(source_tokens)}",
            f"  destination-port:: {' '.join(tokens)}",
            f"  protocol:: {' '.join(sorted(protos))}",
            "  action:: accept",
            "}",
        ]))
    header = "\n".join([
        "header {",
        f"  comment:: \"portguard benchmark: whitelist of {host}\"",
        "  target:: nftables mixed INPUT",
        "}",
    ])
    return {
        "def/NETWORK.net": "\n".join(net_lines) + "\n",
        "def/SERVICES.svc": "\n".join(svc_lines) + "\n",
        f"policies/pol/{host}.pol": header + "\n\n" + "\n\n".join(terms) + "\n",
    }


def write(generated: Generated, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"variables": generated.variables, "groups": generated.groups, "hostvars": generated.hostvars,
            "big_host": generated.big_host, "today": TODAY.isoformat()}
    (out / "catalog.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    for relative, text in generated.aerleon.items():
        path = out / "aerleon" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# a plain whitelist for the kernel and packet benchmarks ---------------------------
def whitelist_catalog(entries: int, *, client: str, server: str, server_address: str, port: int,
                      seed: int = 7, v6_share: float = 0.3) -> tuple[dict, dict, dict]:
    """A catalog whose host ``server`` admits ``entries`` distinct sources on ``port``/tcp.

    The sources are single addresses (about ``v6_share`` of them IPv6) drawn
    from 100.64.0.0/10 and 2001:db8:bee::/48, kept apart so that they do not
    merge; ``client`` is one of them, placed near the end of the list (give
    an address that sorts after 100.64.0.0/10, such as 198.18.0.2, to put it
    last in address order too).
    """
    rng = random.Random(seed)
    client_value = ipaddress.ip_address(client)
    chosen: set = {client_value}
    # even addresses only, so that no two sources are adjacent and merge into a range
    v4_base = int(ipaddress.IPv4Address("100.64.0.0"))  # 100.64.0.0/10: 2M even addresses
    v6_base = int(ipaddress.IPv6Address("2001:db8:bee::"))
    sources = []
    while len(sources) < entries - 1:
        if rng.random() < v6_share:
            value = ipaddress.IPv6Address(v6_base + 2 * rng.getrandbits(40))
        else:
            value = ipaddress.IPv4Address(v4_base + 2 * rng.getrandbits(21))
        if value in chosen:
            continue
        chosen.add(value)
        sources.append(str(value))
    sources.insert(max(0, len(sources) - 3), str(client_value))
    variables = {
        "portguard_networks": {"clients": sources},
        "portguard_services": {"bench": {"port": port, "proto": "tcp", "purpose": "Benchmark server", "owner": "bench"}},
        "portguard_flows": [{"name": "clients-to-server", "from": "clients", "to": "servers", "services": ["bench"]}],
    }
    groups = {"all": [server], "servers": [server]}
    hostvars = {server: {"ansible_connection": "local", "portguard_addresses": [server_address]}}
    return variables, groups, hostvars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write catalog.json and aerleon/ into")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--network-entries", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--hosts", type=int, default=1_000)
    parser.add_argument("--groups", type=int, default=20)
    args = parser.parse_args()
    generated = generate(seed=args.seed, network_entries=args.network_entries, services=args.services,
                         hosts=args.hosts, groups=args.groups)
    write(generated, args.out)
    print(f"wrote {args.out}/catalog.json ({generated.network_entries} network entries, "
          f"{len(generated.variables['portguard_services'])} services, {len(generated.hostvars)} hosts, "
          f"{len(generated.groups) - 1} groups, {len(generated.variables['portguard_flows'])} flows; "
          f"big host {generated.big_host}) and {args.out}/aerleon/")


if __name__ == "__main__":
    main()
