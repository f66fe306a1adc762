"""Catalog lint: broken catalogs with their exact findings (data-driven), the example inventory, the filter."""

import copy
import datetime
import inspect
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.portguard.hardening.plugins.module_utils.core import errors
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.findings import sort_findings
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import catalog_vars
from ansible_collections.portguard.hardening.plugins.module_utils.core.lint import (
    error_code,
    lint_catalog,
    lint_report,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import Finding

HERE = Path(__file__).parent
CASES = yaml.safe_load((HERE / "lint_cases.yml").read_text())
VALIDATION = yaml.safe_load((HERE / "validation_cases.yml").read_text())
TODAY = datetime.date(2026, 11, 26)


def build(case, base):
    catalog = copy.deepcopy(base["catalog"])
    patch = copy.deepcopy(case.get("catalog", {}))
    for key in patch.pop("drop", []):
        catalog.pop(key)
    catalog.update(patch)
    groups = copy.deepcopy(case.get("groups", base["groups"]))
    hostvars = copy.deepcopy(base["hostvars"])
    for host, variables in case.get("hostvars", {}).items():
        hostvars.setdefault(host, {}).update(copy.deepcopy(variables))
    return catalog, groups, hostvars


def triples(findings):
    return [[f.level, f.code, f.path] for f in findings]


@pytest.mark.parametrize("case", CASES["cases"], ids=[case["id"] for case in CASES["cases"]])
def test_lint_case(case):
    catalog, groups, hostvars = build(case, CASES["base"])
    findings = lint_catalog(catalog, groups, hostvars, today=case.get("today", TODAY),
                            expiring_days=case.get("expiring_days", 14))
    shown = "\n".join(f"{f.level} {f.code} {f.path}: {f.message}" for f in findings)
    assert triples(findings) == case["findings"], shown
    assert all(f.message for f in findings)


def test_cases_cover_every_lint_code():
    codes = {finding[1] for case in CASES["cases"] for finding in case["findings"]}
    assert codes >= {"unknown-name", "ambiguous-name", "name-cycle", "address", "port", "protocol", "unsafe-string",
                     "schema", "expiry", "empty-catalog", "management-missing", "management-without-source",
                     "network-unused", "service-unused", "network-overlap", "flow-duplicate", "flow-shadowed",
                     "service-undocumented", "flow-ipv4-gap", "flow-ipv6-gap", "flow-expired", "flow-expiring",
                     "host-without-address", "flow-without-target", "flow-without-source"}


# The controller's addresses are given to plays, not to the lint.
REFUSALS = [c for c in VALIDATION["cases"] if "error" in c and not c["path"].startswith("controller_addresses")]


def compiler_error(catalog, groups, hostvars, controller):
    try:
        policy = compile_catalog(catalog, groups, hostvars, today=TODAY, controller_addresses=controller)
        for host in policy.hosts:
            policy.host(host)
    except errors.CatalogError as exc:
        return Finding("error", error_code(exc), exc.path, exc.message)
    raise AssertionError("the case is not refused")


@pytest.mark.parametrize("case", REFUSALS, ids=[c["id"] for c in REFUSALS])
def test_every_compiler_refusal_is_an_error_finding(case):
    """The compiler's validation cases: lint never raises and reports the compiler's error exactly."""
    catalog, groups, hostvars = build(case, VALIDATION["base"])
    expected = compiler_error(catalog, groups, hostvars, case.get("controller", ()))
    findings = lint_catalog(catalog, groups, hostvars, today=TODAY)
    assert expected in findings
    assert findings == sort_findings(findings)


def test_error_codes_follow_the_class_names():
    assert error_code(errors.UnknownNameError("p", "m")) == "unknown-name"
    assert error_code(errors.AddressError("p", "m")) == "address"
    assert error_code(errors.EmptyCatalogError("p", "m")) == "empty-catalog"
    classes = [cls for _name, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.CatalogError)]
    codes = [error_code(cls("p", "m")) for cls in classes]
    assert len(set(codes)) == len(codes)


def test_example_inventory_has_no_errors_and_only_the_intended_warnings(example_inventory):
    variables, groups, hostvars = example_inventory
    findings = lint_catalog(catalog_vars(variables), groups, hostvars, today=TODAY)
    assert triples(findings) == [
        # desk1's office range lies inside the lab network on purpose: the lab hosts one office desk
        ["warning", "network-overlap", "portguard_networks.office"],
        # kept to show a network made of networks (as in DESIGN.md); no flow uses it yet
        ["warning", "network-unused", "portguard_networks.trusted"],
        # the example's time-boxed exception that ran out, on purpose
        ["warning", "flow-expired", "portguard_flows[7].expires"],
    ]


def test_expiring_window_on_the_example(example_inventory):
    variables, groups, hostvars = example_inventory
    findings = lint_catalog(catalog_vars(variables), groups, hostvars, today=datetime.date(2099, 12, 20))
    assert [f.path for f in findings if f.code == "flow-expiring"] == ["portguard_flows[6].expires"]
    assert "in 11 days, on 2099-12-31" in next(f.message for f in findings if f.code == "flow-expiring")


def test_order_and_duplicates_do_not_change_the_findings():
    catalog, groups, hostvars = build(next(c for c in CASES["cases"] if c["id"] == "several-independent-errors"),
                                      CASES["base"])
    first = lint_catalog(catalog, groups, hostvars, today=TODAY)
    shuffled = copy.deepcopy(catalog)
    shuffled["portguard_services"] = dict(reversed(list(shuffled["portguard_services"].items())))
    shuffled["portguard_networks"] = dict(reversed(list(shuffled["portguard_networks"].items())))
    again = lint_catalog(shuffled, {k: list(reversed(v)) for k, v in groups.items()},
                         dict(reversed(list(hostvars.items()))), today=TODAY)
    assert again == first


def test_report_is_machine_readable():
    catalog, groups, hostvars = build({"catalog": {"drop": ["portguard_management"]}}, CASES["base"])
    report = lint_report(lint_catalog(catalog, groups, hostvars, today=TODAY), today=TODAY)
    assert report["ok"] is False
    assert (report["errors"], report["warnings"], report["infos"]) == (1, 2, 0)
    assert report["findings"][0] == {
        "level": "error", "code": "management-missing", "path": "portguard_management",
        "message": "no management floor: only the controller's own connection is kept open"}
    assert report["lines"][0].startswith("ERROR management-missing portguard_management: ")
    assert report["today"] == "2026-11-26"


def test_nonsense_input_never_raises():
    for variables in ({}, {"portguard_networks": [1], "portguard_services": "x", "portguard_flows": {"a": 1},
                           "portguard_management": 3},
                      {"portguard_flows": [None, 1, "x", {"from": [], "to": [], "services": []}]}):
        findings = lint_catalog(variables, {"all": ["h"]}, {"h": {"portguard_addresses": 5}}, today=TODAY)
        assert findings and findings[0].level == "error"


def test_expiring_days_must_be_a_count():
    with pytest.raises(ValueError, match="expiring_days"):
        lint_catalog({}, {}, {}, today=TODAY, expiring_days=-1)


def test_filter_returns_the_report_and_never_raises_on_a_bad_catalog():
    from ansible_collections.portguard.hardening.plugins.filter.lint import FilterModule

    lint = FilterModule().filters()["lint"]
    catalog, groups, hostvars = build({"catalog": {"portguard_flows": [{"from": "ofice", "to": "webservers",
                                                                        "services": ["https"]}]}}, CASES["base"])
    for host in hostvars:
        hostvars[host].update(catalog)
        hostvars[host]["unrelated"] = object()  # only the catalog and host keys are read
    report = lint(hostvars, groups, today="2026-11-26")
    assert report["ok"] is False
    assert [f["code"] for f in report["findings"]] == ["unknown-name", "network-unused", "service-unused"]
    assert lint(hostvars, groups, expiring_days="30", today=datetime.date(2026, 11, 26))["expiring_days"] == 30


def test_filter_reads_the_implicit_localhost_of_an_inventory_without_hosts():
    from ansible_collections.portguard.hardening.plugins.filter.lint import FilterModule

    lint = FilterModule().filters()["lint"]
    catalog = copy.deepcopy(CASES["base"]["catalog"])
    report = lint({"localhost": catalog}, {"all": [], "ungrouped": []}, today="2026-11-26")
    assert [(f["code"], f["path"]) for f in report["findings"]] == [
        ("unknown-name", "portguard_flows[0].to"), ("unknown-name", "portguard_flows[1].from")]


# Junk a user could type where a catalog value belongs (and a few values that are fine).
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False, width=16),
                 st.sampled_from(["", "office", "admin_vpn", "webservers", "web1", "any", "all", "ssh", "https",
                                  "10.0.0.0/8", "10.0.0.1/8", "2001:db8::/32", "fe80::1%eth0", "db.example.com",
                                  "tcp", "udp", "icmp", "22", "90-80", "2026-11-30", "a\"b", "x\ny"]),
                 st.lists(st.sampled_from(["office", "nowhere", "ssh", "10.1.0.0/16", "webservers"]), max_size=3),
                 st.dictionaries(st.sampled_from(["port", "from", "to", "services", "x"]), st.just("ssh"), max_size=2))
KEYS = [("portguard_networks", "office"), ("portguard_networks", "admin_vpn"), ("portguard_services", "https"),
        ("portguard_flows", 0), ("portguard_flows", 1), ("portguard_management", "from"),
        ("portguard_management", "services")]
FIELDS = {"portguard_services": ["port", "proto", "purpose", "owner"],
          "portguard_flows": ["from", "to", "services", "expires", "name"]}
LINT_ONLY_ERRORS = {"management-missing", "management-without-source"}


MUTATED_FIELDS = ["port", "proto", "from", "to", "services", "expires", "name", "purpose", "whole"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(MUTATED_FIELDS), JUNK), min_size=1, max_size=4))
def test_lint_reports_exactly_the_compilers_refusal_and_never_raises(mutations):
    catalog, groups, hostvars = build({}, CASES["base"])
    for (section, key), field, value in mutations:
        container = catalog[section]
        if field == "whole" or section in ("portguard_networks", "portguard_management"):
            container[key] = value
        elif isinstance(container[key], dict):
            container[key][field if field in FIELDS[section] else FIELDS[section][0]] = value
    try:
        compile_catalog(catalog, groups, hostvars, today=TODAY)
    except errors.CatalogError as exc:
        refused = Finding("error", error_code(exc), exc.path, exc.message)
    else:
        refused = None
    findings = lint_catalog(catalog, groups, hostvars, today=TODAY)
    lint_errors = [f for f in findings if f.level == "error" and f.code not in LINT_ONLY_ERRORS]
    if refused is None:
        assert lint_errors == []
    else:
        assert refused in lint_errors
