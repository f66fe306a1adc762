"""The one compile cache, as the filters reach it (the actions' side: tests/unit/plugins/action).

The private directory, the signature and the unpickler are proven against another local user in
tests/integration/cache/test_compile_cache.py.
"""

import copy
import datetime
import os

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.portguard.hardening.plugins.filter import portguard as filters
from ansible_collections.portguard.hardening.plugins.plugin_utils import compile_cache
from ansible_collections.portguard.hardening.plugins.plugin_utils.compile_cache import FILTER_SCOPE, cached_compile

TODAY = datetime.date(2026, 11, 26)
CATALOG = {
    "portguard_networks": {"office": ["10.20.0.0/16"]},
    "portguard_services": {"https": {"port": 443}, "ftp": {"port": 21}},
    "portguard_flows": [
        {"name": "web-public", "from": "any", "to": "webservers", "services": ["https"]},
        {"name": "legacy-ftp", "from": "office", "to": "dbservers", "services": ["ftp"], "expires": "2099-01-01"},
    ],
}
GROUPS = {"all": ["web1", "db1"], "webservers": ["web1"], "dbservers": ["db1"]}
HOSTVARS = {
    "web1": {"portguard_addresses": ["10.0.1.1", "2001:db8:1::1"]},
    "db1": {"portguard_addresses": ["10.0.2.1", "2001:db8:2::1"]},
}


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(compile_cache, "_HELD", {})
    return runtime


def test_compiles_once_per_input():
    first = cached_compile(CATALOG, GROUPS, HOSTVARS, FILTER_SCOPE, today=TODAY)
    assert cached_compile(copy.deepcopy(CATALOG), copy.deepcopy(GROUPS), copy.deepcopy(HOSTVARS), FILTER_SCOPE,
                          today=TODAY) is first
    assert cached_compile(CATALOG, GROUPS, HOSTVARS, FILTER_SCOPE, today=TODAY + datetime.timedelta(days=1)) is not first


def test_a_new_process_loads_what_another_stored(private_runtime_dir, monkeypatch):
    first = cached_compile(CATALOG, GROUPS, HOSTVARS, FILTER_SCOPE, today=TODAY)
    assert len(list((private_runtime_dir / "portguard").glob("*.policy"))) == 1
    monkeypatch.setattr(compile_cache, "_HELD", {})  # as a freshly forked worker
    monkeypatch.setattr(compile_cache, "compile_catalog", pytest.fail)
    loaded = cached_compile(CATALOG, GROUPS, HOSTVARS, FILTER_SCOPE, today=TODAY)
    assert loaded is not first and loaded.host("web1").ingress == first.host("web1").ingress


def test_scopes_never_share_a_compile(private_runtime_dir):
    cached_compile(CATALOG, GROUPS, HOSTVARS, FILTER_SCOPE, today=TODAY)
    cached_compile(CATALOG, GROUPS, HOSTVARS, ["task", False], today=TODAY)
    assert len(list((private_runtime_dir / "portguard").glob("*.policy"))) == 2


def test_only_the_catalog_and_compiled_host_variables_make_the_key():
    noisy = {host: dict(values, ansible_facts={"uptime": 1}) for host, values in HOSTVARS.items()}
    first = cached_compile(dict(CATALOG, unrelated=1), GROUPS, HOSTVARS, FILTER_SCOPE, today=TODAY)
    assert cached_compile(CATALOG, GROUPS, noisy, FILTER_SCOPE, today=TODAY) is first


def test_filters_refuse_an_open_cache_directory(private_runtime_dir):
    (private_runtime_dir / "portguard").mkdir()
    os.chmod(private_runtime_dir / "portguard", 0o770)  # noqa: S103 - a group-writable cache must be refused
    hostvars = {host: dict(values, **CATALOG) for host, values in HOSTVARS.items()}
    with pytest.raises(AnsibleFilterError, match="portguard compile cache .* refused"):
        filters.ruleset(hostvars, GROUPS, "web1")


def test_filters_report_a_broken_catalog():
    hostvars = {host: dict(values, portguard_services={"x": {"port": 0}}) for host, values in HOSTVARS.items()}
    with pytest.raises(AnsibleFilterError, match="portguard catalog refused"):
        filters.allowed(hostvars, GROUPS, "10.0.1.1", "db1", 443)


def test_the_unpickler_rebuilds_a_whole_compiled_example(example_inventory, private_runtime_dir, monkeypatch):
    """Every class a compiled catalog holds is one the restricted unpickler accepts."""
    variables, groups, hostvars = example_inventory
    first = cached_compile(variables, groups, hostvars, FILTER_SCOPE, today=TODAY)
    monkeypatch.setattr(compile_cache, "_HELD", {})
    loaded = cached_compile(variables, groups, hostvars, FILTER_SCOPE, today=TODAY)
    assert loaded is not first
    for host in groups["all"]:
        assert loaded.host(host).ingress == first.host(host).ingress
