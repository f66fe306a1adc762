"""The inventory as the compiler reads it: group and host names, each host's addresses, and the per-host
variables.

``HOST_VARIABLES`` is the one table of per-host variables: ``HostSettings``, ``host_settings()``, the
selection of host variables (``HOST_KEYS``, ``select_hostvars``) and the table in docs/catalog.md derive
from it; a unit test checks that the segmentation role's ``meta/argument_specs.yml`` lists the same.
"""

import dataclasses
import ipaddress
from dataclasses import dataclass

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import mapping
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    AddressError,
    CatalogError,
    SchemaError,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import address_text
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    check_host_target,
    check_inventory_name,
    key_path,
    parse_bool,
    parse_choice,
    parse_int,
    parse_log_prefix,
    parse_network,
    type_name,
)

NETWORK_CONNECTIONS = ("ssh", "ansible.builtin.ssh", "paramiko", "paramiko_ssh", "ansible.builtin.paramiko_ssh",
                       "ansible.netcommon.libssh", "winrm", "ansible.builtin.winrm", "psrp", "ansible.builtin.psrp")
ROLLBACK_TIMEOUT_RANGE = (5, 3600)  # seconds; the firewall action's rollback_timeout takes the same bounds
# Ansible's own variables the compiler reads: the host's address and the controller's connection.
CONNECTION_KEYS = ("ansible_host", "ansible_port", "ansible_connection", "ansible_default_ipv4", "ansible_default_ipv6")


@dataclass(frozen=True)
class HostVariable:
    """One per-host variable: ``kind`` is its argument_specs type; ``choices`` or ``bounds`` limit it."""

    name: str
    kind: str
    default: object
    doc: str
    choices: tuple = ()
    bounds: tuple = ()

    @property
    def field(self) -> str:
        return self.name.removeprefix("portguard_")

    def parse(self, value, path: str):
        if self.choices:
            return parse_choice(value, path, self.choices)
        if self.kind == "bool":
            return parse_bool(value, path)
        if self.kind == "int":
            return parse_int(value, path, *self.bounds)
        return parse_log_prefix(value, path)  # the one free-text setting

    def doc_row(self) -> str:
        """Its row of the per-host table in docs/catalog.md."""
        if self.kind == "list":
            default = "see below"
        else:
            default = f"`{str(self.default).lower() if self.kind == 'bool' else self.default}`"
        return f"| `{self.name}` | {default} | {self.doc} |"


HOST_VARIABLES = (
    HostVariable("portguard_backend", "str", "auto", "`nftables`, `iptables` or `auto` (nftables when usable)",
                 choices=("auto", "nftables", "iptables")),
    HostVariable("portguard_mode", "str", "enforce",
                 "`audit` logs and counts what would be denied, and denies nothing", choices=("enforce", "audit")),
    HostVariable("portguard_deny", "str", "reject", "`reject` (ICMP admin-prohibited) or `drop`",
                 choices=("reject", "drop")),
    HostVariable("portguard_egress", "bool", False, "also enforce outbound flows from this host"),
    HostVariable("portguard_allow_ping", "bool", True, "accept ICMP/ICMPv6 echo requests"),
    HostVariable("portguard_rollback_timeout", "int", 30,
                 "seconds (5–3600) before an unconfirmed change reverts", bounds=ROLLBACK_TIMEOUT_RANGE),
    HostVariable("portguard_log_rate", "int", 10, "log lines per minute for denied packets, at most",
                 bounds=(1, 100000)),
    HostVariable("portguard_log_burst", "int", 5, "burst of the log rate limit", bounds=(1, 100000)),
    HostVariable("portguard_log_prefix", "str", "portguard-deny: ",
                 "1–29 characters: letters, digits, space, `_ . : = -`"),
    # Read by host_addresses, with the connection's address and the gathered facts as fallbacks.
    HostVariable("portguard_addresses", "list", (),
                 "the plain addresses (both families) that stand for the host in flows"),
)
HOST_KEYS = CONNECTION_KEYS + tuple(variable.name for variable in HOST_VARIABLES)
_TYPES = {"str": str, "bool": bool, "int": int, "list": tuple[str, ...]}
HostSettings = dataclasses.make_dataclass(
    "HostSettings",
    [(v.field, _TYPES[v.kind], v.default) for v in HOST_VARIABLES],  # a plain value is the field's default
    frozen=True,
    namespace={"__module__": __name__, "__doc__": "One host's per-host variables, parsed (see HOST_VARIABLES)."},
)


def select_hostvars(hostvars, hosts) -> dict:
    """Only the per-host variables the compiler reads, as plain data."""
    result = {}
    for host in hosts:
        variables = hostvars[host]
        result[host] = {key: variables[key] for key in HOST_KEYS if key in variables}
    return result


def check_inventory(groups, hostvars) -> dict[str, list[str]]:
    """The inventory's groups (members sorted), after checking every group and host name.

    Host and group names reach rule comments, flow names and report file names, and
    dynamic inventories (cloud tags, CMDB exports) let other people choose them: a bad
    one refuses the whole play, even when no flow names it.
    """
    groups = mapping(groups, "groups")
    hostvars = mapping(hostvars, "hostvars")
    result, checked = {}, set()
    for name, members in groups.items():
        check_inventory_name(name, "group")
        members = [] if members is None else members
        if not isinstance(members, (list, tuple)):
            raise SchemaError(key_path("groups", name), f"expected a list of inventory hosts, got {type_name(members)}")
        for host in members:
            if not isinstance(host, str) or host not in checked:  # a host is in several groups: checked once
                checked.add(check_inventory_name(host, "host"))
        result[name] = sorted(set(members))
    for host, variables in hostvars.items():
        if host not in checked:
            check_inventory_name(host, "host")
        if variables is not None and not isinstance(variables, dict):
            mapping(variables, key_path("hostvars", host))
    return result


def host_addresses(host: str, hostvars: dict) -> tuple[str, ...]:
    """The plain addresses that stand for ``host`` in flows (see DESIGN.md)."""
    variables = hostvars.get(host, {}) or {}
    base = key_path("hostvars", host)
    if variables.get("portguard_addresses") is not None:
        raw = variables["portguard_addresses"]
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list):
            raise SchemaError(f"{base}.portguard_addresses", f"expected a list of addresses, got {type_name(raw)}")
        parsed = set()
        for index, value in enumerate(values):
            family, number = parse_network(value, f"{base}.portguard_addresses[{index}]", plain=True)[:2]
            parsed.add((family, number))
        # address_text writes what str(ipaddress.ip_address()) writes; sorted as (version, address) sorts them
        return tuple(address_text(family, number) for family, number in sorted(parsed))
    ansible_host = variables.get("ansible_host")
    if ansible_host is not None:
        try:
            address = ipaddress.ip_address(ansible_host)
        except ValueError:
            address = None  # a hostname: the facts below say what it stands for
            check_host_target(ansible_host, f"{base}.ansible_host")
        if address is not None:
            # The same checks as any other address: an IPv4-mapped IPv6 value
            # would render as IPv6 and never match the host's IPv4 traffic.
            parse_network(ansible_host, f"{base}.ansible_host", plain=True)
            return (str(address),)
    result = []
    for family, key in ((4, "ansible_default_ipv4"), (6, "ansible_default_ipv6")):
        facts = variables.get(key) or {}
        address = facts.get("address") if isinstance(facts, dict) else None
        if address:
            path = f"{base}.{key}.address"
            found, _unused, _unused = parse_network(address, path, plain=True)
            if found != family:
                raise AddressError(path, f"IPv{found} address {address!r} where an IPv{family} address is expected")
            result.append(str(ipaddress.ip_address(address)))
    return tuple(result)


def address_intervals(addresses, path: str, indexed: bool = False) -> dict:
    """Plain addresses as ``(lo, hi)`` intervals per family (``path[index]`` names a bad one when ``indexed``)."""
    result = {4: [], 6: []}
    for index, address in enumerate(addresses):
        family, low, high = parse_network(address, f"{path}[{index}]" if indexed else path, plain=True)
        result[family].append((low, high))
    return result


def host_settings(host: str, hostvars: dict):
    """The ``HostSettings`` of ``host``: each variable parsed, or its default when unset."""
    variables = hostvars.get(host, {}) or {}
    base = key_path("hostvars", host)
    values = {}
    for variable in HOST_VARIABLES:
        if variable.kind == "list":
            values[variable.field] = host_addresses(host, hostvars)
        elif variables.get(variable.name) is None:
            values[variable.field] = variable.default
        else:
            values[variable.field] = variable.parse(variables[variable.name], f"{base}.{variable.name}")
    return HostSettings(**values)


def collect_inventory(groups: dict, hostvars: dict, refuse):
    """``check_inventory`` that records each refusal with ``refuse(error)`` and goes on without the entry.

    Returns the groups (members sorted), the host variables, and the names that are unresolvable: a
    refused group goes; a group whose members are not a list stays, empty; a refused host leaves the
    groups that list it (unresolvable then); a host whose variables are not a mapping stays, without them.
    """
    result, hostvars, good, refused = {}, dict(hostvars), set(), set()
    broken_groups, broken_hosts = set(), set()

    def valid_host(host) -> bool:
        if isinstance(host, str) and host in good:
            return True
        try:
            good.add(check_inventory_name(host, "host"))
        except CatalogError as exc:
            if exc.path not in refused:
                refused.add(exc.path)
                refuse(exc)
            return False
        return True

    for name, members in groups.items():
        try:
            check_inventory_name(name, "group")
        except CatalogError as exc:
            refuse(exc)
            continue
        members = [] if members is None else members
        if not isinstance(members, (list, tuple)):
            refuse(SchemaError(key_path("groups", name), f"expected a list of inventory hosts, got {type_name(members)}"))
            result[name] = []
            broken_groups.add(name)
            continue
        kept = [host for host in members if valid_host(host)]
        if len(kept) < len(members):
            broken_groups.add(name)
        result[name] = kept
    for host, variables in list(hostvars.items()):
        if not valid_host(host):
            del hostvars[host]
        elif variables is not None and not isinstance(variables, dict):
            refuse(SchemaError(key_path("hostvars", host), f"expected a mapping, got {type_name(variables)}"))
            hostvars[host] = {}
            broken_hosts.add(host)
    for name, members in result.items():
        if broken_hosts & set(members):
            broken_groups.add(name)
        result[name] = sorted(set(members) - broken_hosts)
    return result, hostvars, broken_groups, broken_hosts
