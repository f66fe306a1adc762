"""The shapes of the catalog sections: ``portguard_networks``, ``portguard_services``, ``portguard_flows``,
``portguard_management``; what a compiled service and flow are."""

from dataclasses import dataclass

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import SchemaError
from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import merge_ranges
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    check_name,
    check_text,
    key_path,
    parse_ports,
    parse_protocols,
    type_name,
)

CATALOG_VARS = (
    "portguard_networks",
    "portguard_services",
    "portguard_flows",
    "portguard_management",
    "portguard_deny_all",
)
RESERVED = ("all", "any")
SERVICE_KEYS = {"port", "proto", "purpose", "owner", "description"}
FLOW_KEYS = {"name", "from", "to", "services", "expires", "description"}
MANAGEMENT_KEYS = {"from", "services"}
MANAGEMENT_FLOW = "management"
CONTROLLER_FLOW = "controller"


@dataclass(frozen=True)
class Service:
    name: str
    ports: tuple[tuple[str, int, int], ...]  # (proto, lo, hi)
    purpose: str
    owner: str


@dataclass
class Flow:
    name: str
    path: str
    sources: dict  # family -> sorted disjoint [(lo, hi)]
    source_names: tuple[str, ...]
    targets: frozenset  # destination hosts
    services: tuple[Service, ...]
    expires: object = None  # the last day (a datetime.date), or None


def catalog_vars(variables: dict) -> dict:
    """Only the catalog variables of a host's variables (the part shared by all hosts)."""
    return {name: variables[name] for name in CATALOG_VARS if name in variables}


def as_list(value, path):
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise SchemaError(path, "an empty list")
        return value
    raise SchemaError(path, f"expected a name or a list of names, got {type_name(value)}")


def mapping(value, path, default=None):
    if value is None:
        return {} if default is None else default
    if not isinstance(value, dict):
        raise SchemaError(path, f"expected a mapping, got {type_name(value)}")
    return value


def unknown_keys(item: dict, allowed: set, path: str):
    extra = sorted((key for key in item if key not in allowed), key=str)
    if extra:
        raise SchemaError(key_path(path, extra[0]), f"unknown key; expected one of {', '.join(sorted(allowed))}")


def entry(item, path: str, allowed: set, required: tuple) -> dict:
    """A flow or the management floor: a mapping of known keys with the required ones present."""
    item = mapping(item, path)
    unknown_keys(item, allowed, path)
    for key in required:
        if key not in item:
            raise SchemaError(f"{path}.{key}", "missing")
    return item


def parse_service(name, spec, path: str) -> Service:
    check_name(name, path, "service")
    spec = mapping(spec, path)
    unknown_keys(spec, SERVICE_KEYS, path)
    if "port" not in spec:
        raise SchemaError(f"{path}.port", "missing; every service needs a port or a range")
    ports = parse_ports(spec["port"], f"{path}.port")
    protos = parse_protocols(spec.get("proto", "tcp"), f"{path}.proto")
    purpose = check_text(spec.get("purpose", ""), f"{path}.purpose")
    owner = check_text(spec.get("owner", ""), f"{path}.owner")
    if "description" in spec:
        check_text(spec["description"], f"{path}.description")
    merged = tuple((proto, low, high) for proto in protos for low, high in merge_ranges(ports))
    return Service(name, merged, purpose, owner)
