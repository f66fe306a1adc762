"""Catalog compilation: validation errors (data-driven), expiry, merging, host addresses."""

import copy
import dataclasses
import datetime
import inspect
from pathlib import Path

import pytest
import yaml

from ansible_collections.portguard.hardening.plugins.module_utils.core import errors
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.inventory import (
    HOST_KEYS,
    HOST_VARIABLES,
    HostSettings,
    host_addresses,
    select_hostvars,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import catalog_vars

CASES_FILE = Path(__file__).parent / "validation_cases.yml"
CASES = yaml.safe_load(CASES_FILE.read_text())
TODAY = datetime.date(2026, 11, 26)
# Raised outside the pure core (by the firewall action plugin), so no catalog case can reach it.
NOT_RAISED_BY_CATALOG = {"LockoutError"}


def build(case):
    """The catalog, groups and hostvars of a case: the base with the case's patches."""
    base = CASES["base"]
    catalog = copy.deepcopy(base["catalog"])
    catalog.update(copy.deepcopy(case.get("catalog", {})))
    groups = copy.deepcopy(case.get("groups", base["groups"]))
    hostvars = copy.deepcopy(base["hostvars"])
    for host, variables in case.get("hostvars", {}).items():
        hostvars.setdefault(host, {}).update(copy.deepcopy(variables))
    return catalog, groups, hostvars


def compile_all(catalog, groups, hostvars, today=TODAY, controller=()):
    policy = compile_catalog(catalog, groups, hostvars, today=today, controller_addresses=controller)
    for host in policy.hosts:
        policy.host(host)
    return policy


@pytest.mark.parametrize("case", CASES["cases"], ids=[case["id"] for case in CASES["cases"]])
def test_validation_case(case):
    catalog, groups, hostvars = build(case)
    today = case.get("today", TODAY)
    if "error" in case:
        with pytest.raises(errors.CatalogError) as info:
            compile_all(catalog, groups, hostvars, today, case.get("controller", ()))
        assert info.value.__class__ is getattr(errors, case["error"]), str(info.value)
        assert info.value.path == case["path"], str(info.value)
        assert case.get("message", "") in info.value.message
        assert str(info.value).startswith(f"{case['path']}: ")
        return
    policy = compile_all(catalog, groups, hostvars, today, case.get("controller", ()))
    if "finding" in case:
        found = {(finding.code, finding.path) for finding in policy.findings}
        assert ((case["finding"], case["path"]) in found) != case.get("absent", False), sorted(found)


def test_every_catalog_error_class_has_a_case():
    classes = {name for name, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.CatalogError) and cls is not errors.CatalogError}
    covered = {case["error"] for case in CASES["cases"] if "error" in case}
    assert classes - NOT_RAISED_BY_CATALOG <= covered
    assert covered <= classes


def small_catalog(**flows_and_more):
    catalog = {
        "portguard_networks": {"office": ["10.20.0.0/16", "2001:db8:20::/48"], "v4only": ["10.30.0.0/16"]},
        "portguard_services": {
            "ssh": {"port": 22, "purpose": "Remote administration", "owner": "platform"},
            "https": {"port": 443, "purpose": "Public web traffic", "owner": "web"},
            "ftp": {"port": 21, "purpose": "Legacy drop", "owner": "data"},
            "workers": {"port": "8000-8010", "purpose": "App workers", "owner": "web"},
            "dns": {"port": 53, "proto": ["tcp", "udp"], "purpose": "DNS", "owner": "platform"},
        },
        "portguard_management": {"from": "office", "services": ["ssh"]},
    }
    catalog.update(flows_and_more)
    return catalog


GROUPS = {"all": ["web1", "db1"], "webservers": ["web1"], "dbservers": ["db1"]}
HOSTVARS = {
    "web1": {"portguard_addresses": ["10.0.1.1", "2001:db8:1::1"]},
    "db1": {"portguard_addresses": ["10.0.2.1", "2001:db8:2::1"]},
}


def labels_of(host_policy):
    return {label.flow for entry in host_policy.ingress for label in entry.labels}


# --- expiry --------------------------------------------------------------------


def expiring_catalog(expires):
    return small_catalog(portguard_flows=[
        {"name": "web-public", "from": "any", "to": "webservers", "services": ["https"]},
        {"name": "legacy-ftp", "from": "office", "to": "dbservers", "services": ["ftp"], "expires": expires},
    ])


@pytest.mark.parametrize("expires", [datetime.date(2026, 11, 25), "2026-11-25", datetime.datetime(2026, 11, 25, 23, 59)])
def test_expired_flow_is_reported_and_not_rendered(expires):
    policy = compile_catalog(expiring_catalog(expires), GROUPS, HOSTVARS, today=TODAY)
    assert policy.expired == [{"name": "legacy-ftp", "path": "portguard_flows[1]", "expires": "2026-11-25",
                               "owners": ["data"]}]
    assert [(f.code, f.path) for f in policy.findings if f.code == "flow-expired"] == [
        ("flow-expired", "portguard_flows[1].expires")]
    assert "legacy-ftp" not in labels_of(policy.host("db1"))
    assert not policy.allowed("10.20.3.4", "db1", 21, "tcp")


def test_flow_expiring_today_is_rendered_through_the_end_of_the_day():
    on_the_day = compile_catalog(expiring_catalog("2026-11-26"), GROUPS, HOSTVARS, today=TODAY)
    assert on_the_day.expired == []
    assert "legacy-ftp" in labels_of(on_the_day.host("db1"))
    assert on_the_day.allowed("10.20.3.4", "db1", 21, "tcp")
    next_day = compile_catalog(expiring_catalog("2026-11-26"), GROUPS, HOSTVARS, today=TODAY + datetime.timedelta(days=1))
    assert [item["name"] for item in next_day.expired] == ["legacy-ftp"]
    assert not next_day.allowed("10.20.3.4", "db1", 21, "tcp")


def test_today_defaults_to_the_utc_date():
    policy = compile_catalog(expiring_catalog("2000-01-01"), GROUPS, HOSTVARS)
    assert [item["name"] for item in policy.expired] == ["legacy-ftp"]


def test_example_inventory_expiry(example_policy):
    assert [item["name"] for item in example_policy.expired] == ["office-legacy-ftp"]
    assert not example_policy.allowed("10.20.1.1", "db1", 21, "tcp")
    assert example_policy.allowed("10.20.1.1", "mon1", 3000, "tcp")  # expires 2099-12-31


# --- merging and families ----------------------------------------------------------


def test_overlapping_and_duplicate_sources_merge_into_one_element():
    catalog = small_catalog(
        portguard_networks={"office": ["10.20.0.0/16", "10.20.7.0/24", "10.20.0.0/16"], "more": ["10.20.128.0/17"]},
        portguard_flows=[{"name": "a", "from": ["office", "more", "10.20.9.9"], "to": "webservers", "services": ["https"]}],
        portguard_management={"from": "10.99.0.0/24", "services": ["ssh"]},
    )
    policy = compile_catalog(catalog, GROUPS, HOSTVARS, today=TODAY)
    https = [e for e in policy.host("web1").ingress if e.port_lo == 443]
    assert [(e.family, e.address_text()) for e in https] == [(4, "10.20.0.0/16")]


def test_overlapping_port_ranges_render_as_disjoint_elements():
    catalog = small_catalog(
        portguard_services={
            "ssh": {"port": 22},
            "workers": {"port": "8000-8010"},
            "debug": {"port": [8005, "8009-8020", 8005]},
        },
        portguard_flows=[{"name": "a", "from": "10.1.0.0/16", "to": "webservers", "services": ["workers", "debug"]}],
        portguard_management={"from": "10.99.0.0/24", "services": ["ssh"]},
    )
    host = compile_catalog(catalog, GROUPS, HOSTVARS, today=TODAY).host("web1")
    entries = [e for e in host.ingress if e.addr_lo == e.addr_hi - 65535]
    spans = sorted((e.port_lo, e.port_hi) for e in entries)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    covered = {port for lo, hi in spans for port in range(lo, hi + 1)}
    assert covered == set(range(8000, 8021))
    assert {label.service for e in entries if e.contains(e.addr_lo, 8005) for label in e.labels} == {"workers", "debug"}


def test_flow_with_only_ipv4_sources_renders_no_ipv6_entry():
    catalog = small_catalog(portguard_flows=[
        {"name": "v4-only", "from": "v4only", "to": "webservers", "services": ["https"]},
        {"name": "v4-host", "from": "db1", "to": "webservers", "services": ["dns"]},
    ])
    hostvars = {**HOSTVARS, "db1": {"portguard_addresses": ["10.0.2.1"]}}
    host = compile_catalog(catalog, GROUPS, hostvars, today=TODAY).host("web1")
    families = {label.flow: set() for entry in host.ingress for label in entry.labels}
    for entry in host.ingress:
        for label in entry.labels:
            families[label.flow].add(entry.family)
    assert families == {"v4-only": {4}, "v4-host": {4}, "management": {4, 6}}


def test_flow_from_host_without_address_renders_nothing_and_is_reported():
    catalog = small_catalog(portguard_flows=[{"name": "ghost", "from": "db1", "to": "webservers", "services": ["https"]}])
    hostvars = {"web1": HOSTVARS["web1"], "db1": {"ansible_host": "db1.example.com"}}
    policy = compile_catalog(catalog, GROUPS, hostvars, today=TODAY)
    codes = {(f.code, f.path) for f in policy.findings}
    assert ("host-without-address", "hostvars.db1") in codes
    assert ("flow-without-source", "portguard_flows[0].from") in codes
    assert "ghost" not in labels_of(policy.host("web1"))


def test_unnamed_flow_gets_a_name_from_its_ends():
    catalog = small_catalog(portguard_flows=[{"from": ["office", "v4only"], "to": "webservers", "services": ["https"]}])
    policy = compile_catalog(catalog, GROUPS, HOSTVARS, today=TODAY)
    assert labels_of(policy.host("web1")) == {"office+v4only->webservers", "management"}


def test_any_source_covers_both_families_entirely():
    catalog = small_catalog(portguard_flows=[{"name": "pub", "from": "any", "to": "webservers", "services": ["https"]}])
    host = compile_catalog(catalog, GROUPS, HOSTVARS, today=TODAY).host("web1")
    https = {(e.family, e.address_text()) for e in host.ingress if e.port_lo == 443}
    assert https == {(4, "0.0.0.0/0"), (6, "::/0")}


def test_management_reaches_every_host():
    catalog = small_catalog(portguard_flows=[{"name": "pub", "from": "any", "to": "webservers", "services": ["https"]}])
    policy = compile_catalog(catalog, GROUPS, HOSTVARS, today=TODAY)
    for host in ("web1", "db1"):
        assert policy.allowed("10.20.0.5", host, 22, "tcp")
        assert policy.allowed("2001:db8:20::5", host, 22, "tcp")
        assert policy.host(host).management_only().ingress == policy.host(host).management
    assert not policy.allowed("10.21.0.5", "db1", 22, "tcp")


def test_missing_management_is_reported():
    catalog = small_catalog(portguard_flows=[{"name": "pub", "from": "any", "to": "webservers", "services": ["https"]}])
    del catalog["portguard_management"]
    policy = compile_catalog(catalog, GROUPS, HOSTVARS, today=TODAY)
    assert ("management-missing", "portguard_management") in {(f.code, f.path) for f in policy.findings}
    assert policy.host("db1").ingress == ()


# --- the controller's own connection -----------------------------------------------


def test_controller_connection_is_always_allowed_on_the_ssh_port():
    catalog = small_catalog(portguard_flows=[{"name": "pub", "from": "any", "to": "webservers", "services": ["https"]}])
    hostvars = {**HOSTVARS, "db1": {**HOSTVARS["db1"], "ansible_port": "2222"}}
    policy = compile_catalog(catalog, GROUPS, hostvars, today=TODAY, controller_addresses=["192.0.2.10", "2001:db8:c::1"])
    for host, port in (("web1", 22), ("db1", 2222)):
        for src in ("192.0.2.10", "2001:db8:c::1"):
            assert policy.allowed(src, host, port, "tcp")
            assert policy.host(host).management_only().allowed_in(src, port, "tcp")
        assert not policy.allowed("192.0.2.10", host, 443 if host == "db1" else 80, "tcp")
        assert not policy.allowed("192.0.2.11", host, port, "tcp")
    assert not policy.allowed("192.0.2.10", "db1", 22, "tcp")
    assert policy.host("db1").why_in("192.0.2.10", 2222, "tcp")[0].flow == "controller"


def test_controller_of_one_host_overrides_the_compiled_one():
    catalog = small_catalog(portguard_flows=[{"name": "pub", "from": "any", "to": "webservers", "services": ["https"]}])
    policy = compile_catalog(catalog, GROUPS, HOSTVARS, today=TODAY, controller_addresses=["192.0.2.10"])
    other = policy.host("db1", controller_addresses=["198.51.100.1"])
    assert other.allowed_in("198.51.100.1", 22, "tcp") and not other.allowed_in("192.0.2.10", 22, "tcp")
    assert policy.host("db1").allowed_in("192.0.2.10", 22, "tcp")


@pytest.mark.parametrize("connection", ["podman", "containers.podman.podman", "local", "community.docker.docker"])
def test_connections_without_network_have_no_controller_entry(connection):
    catalog = small_catalog(portguard_flows=[{"name": "pub", "from": "any", "to": "webservers", "services": ["https"]}])
    hostvars = {**HOSTVARS, "db1": {**HOSTVARS["db1"], "ansible_connection": connection}}
    policy = compile_catalog(catalog, GROUPS, hostvars, today=TODAY, controller_addresses=["192.0.2.10"])
    assert not policy.allowed("192.0.2.10", "db1", 22, "tcp")
    assert policy.allowed("192.0.2.10", "web1", 22, "tcp")


def test_unknown_host_is_refused():
    policy = compile_catalog(expiring_catalog("2099-01-01"), GROUPS, HOSTVARS, today=TODAY)
    with pytest.raises(errors.UnknownNameError) as info:
        policy.host("web9")
    assert info.value.path == "inventory_hostname"


# --- host addresses ----------------------------------------------------------------


@pytest.mark.parametrize(("variables", "expected"), [
    ({"portguard_addresses": ["2001:DB8::1", "10.0.0.2", "10.0.0.1", "10.0.0.2"], "ansible_host": "10.9.9.9"},
     ("10.0.0.1", "10.0.0.2", "2001:db8::1")),
    ({"portguard_addresses": "10.0.0.1"}, ("10.0.0.1",)),
    ({"ansible_host": "10.9.9.9", "ansible_default_ipv4": {"address": "10.0.0.1"}}, ("10.9.9.9",)),
    ({"ansible_host": "web1.example.com", "ansible_default_ipv4": {"address": "10.0.0.1"},
      "ansible_default_ipv6": {"address": "2001:db8::1"}}, ("10.0.0.1", "2001:db8::1")),
    ({"ansible_default_ipv4": {}, "ansible_default_ipv6": {"address": "2001:db8::1"}}, ("2001:db8::1",)),
    ({}, ()),
])
def test_host_addresses(variables, expected):
    assert host_addresses("h", {"h": variables}) == expected


# --- helpers -------------------------------------------------------------------------


def test_catalog_vars_keeps_only_the_catalog():
    variables = {"portguard_flows": [], "portguard_deny_all": True, "portguard_mode": "audit", "ansible_host": "x"}
    assert catalog_vars(variables) == {"portguard_flows": [], "portguard_deny_all": True}


REPO = Path(__file__).resolve().parents[4]
PER_HOST_TYPES = {"str": "str", "bool": "bool", "int": "int", "list": "list"}


def test_segmentation_argument_specs_list_exactly_the_per_host_variables():
    """The role documents every per-host variable of HOST_VARIABLES, with the same type, default and choices."""
    specs = yaml.safe_load((REPO / "roles/segmentation/meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    per_host = {name: spec for name, spec in options.items() if spec["description"].startswith("Per host.")}
    assert sorted(per_host) == sorted(variable.name for variable in HOST_VARIABLES)
    for variable in HOST_VARIABLES:
        spec = per_host[variable.name]
        assert spec["type"] == PER_HOST_TYPES[variable.kind], variable.name
        assert list(spec.get("choices", ())) == list(variable.choices), variable.name
        if variable.kind == "list":
            assert "default" not in spec and spec["elements"] == "str", variable.name
        else:
            assert spec["default"] == variable.default, variable.name


def test_other_roles_declare_no_per_host_variable():
    names = {variable.name for variable in HOST_VARIABLES}
    for path in sorted(REPO.glob("roles/*/meta/argument_specs.yml")):
        if path.parts[-3] == "segmentation":
            continue
        options = yaml.safe_load(path.read_text())["argument_specs"]["main"].get("options") or {}
        assert not names & set(options), path


def test_docs_list_the_per_host_variables():
    text = (REPO / "docs/catalog.md").read_text()
    for variable in HOST_VARIABLES:
        assert variable.doc_row() in text, variable.name


def test_host_settings_and_host_keys_derive_from_the_table():
    fields = [field.name for field in dataclasses.fields(HostSettings)]
    assert fields == [variable.field for variable in HOST_VARIABLES]
    assert HostSettings() == HostSettings(**{variable.field: variable.default for variable in HOST_VARIABLES})
    assert set(HOST_KEYS) >= {variable.name for variable in HOST_VARIABLES}
    hostvars = {"web1": {"portguard_mode": "audit", "unrelated": 1, "ansible_host": "10.0.0.1"}}
    assert select_hostvars(hostvars, ["web1"]) == {"web1": {"portguard_mode": "audit", "ansible_host": "10.0.0.1"}}
