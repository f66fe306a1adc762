"""The firewall action's arguments and the compile cache's key, without a host (issue 9, items 3, 4, 10).

The behaviour is proven end to end in tests/integration/firewall/test_firewall_trust.py and
tests/integration/cache/test_compile_cache.py; these cases pin the boundary itself, fast.
"""

import datetime
import os
from unittest import mock

import pytest
from ansible.errors import AnsibleActionFail

from ansible_collections.portguard.hardening.plugins.action.firewall import ActionModule
from ansible_collections.portguard.hardening.plugins.plugin_utils import compile_cache


def action(args, port=None, transport="ssh"):
    task = mock.MagicMock()
    task.args = args
    connection = mock.MagicMock()
    connection.transport = transport
    connection.has_option.return_value = True
    options = {"port": port, "host": "192.0.2.7", "ssh_executable": "ssh", "ssh_args": "", "ssh_common_args": "",
               "ssh_extra_args": "", "remote_user": None}
    connection.get_option.side_effect = options.get
    return ActionModule(task, connection, mock.MagicMock(), mock.MagicMock(), mock.MagicMock(), mock.MagicMock())


ACCEPTED = [
    # (args, network connection, expected subset of the validated arguments)
    ({"persist": "false"}, True, {"persist": False, "confirm": True, "state": "present"}),
    ({"persist": "no", "confirm": "yes"}, False, {"persist": False, "confirm": True}),
    ({"rollback_timeout": "5"}, True, {"rollback_timeout": 5}),
    ({"rollback_timeout": 3600}, True, {"rollback_timeout": 3600}),
    ({"controller_addresses": ["10.0.0.5", "2001:db8::5"]}, True, {"controller_addresses": ["10.0.0.5", "2001:db8::5"]}),
    ({"controller_addresses": []}, False, {"controller_addresses": []}),
    ({"confirm": False, "controller_addresses": ["10.0.0.5"]}, True, {"confirm": False}),
    ({"confirm": False}, False, {"confirm": False}),
]

REFUSED = [
    ({"rollback_timeout": -5}, True, "rollback_timeout -5 is out of range 5-3600"),
    ({"rollback_timeout": 4}, True, "out of range 5-3600"),
    ({"rollback_timeout": 86400}, True, "out of range 5-3600"),
    ({"rollback_timeout": "abc"}, True, "rollback_timeout"),
    ({"persist": "maybe"}, True, "persist"),
    ({"controller_addresses": "10.0.0.5"}, True, "must be a list of IP addresses"),
    ({"controller_addresses": ["10.0.0.5", "db1"]}, True, "controller_addresses[1]: 'db1' is not an IP address"),
    ({"controller_addresses": []}, True, "would turn the lockout check off"),
    ({"confirm": False}, True, "confirm: false needs controller_addresses"),
    ({"backend": "pf"}, True, "backend"),
    ({"state": "gone"}, True, "state"),
    ({"bogus": 1}, True, "bogus"),
]


@pytest.mark.parametrize(("args", "network", "expected"), ACCEPTED)
def test_arguments_accepted(args, network, expected):
    validated = action(args)._arguments(network)
    assert {key: validated[key] for key in expected} == expected


@pytest.mark.parametrize(("args", "network", "message"), REFUSED)
def test_arguments_refused(args, network, message):
    with pytest.raises(AnsibleActionFail) as caught:
        action(args)._arguments(network)
    assert message in str(caught.value)


def test_port_from_the_connection_options():
    assert action({}, port=2222)._connection_port() == 2222


def test_port_from_ssh_config_when_the_option_is_unset(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host 192.0.2.7\n  Port 2200\n")
    module = action({})
    module._connection.get_option.side_effect = {"port": None, "host": "192.0.2.7", "ssh_executable": "ssh",
                                                 "ssh_common_args": f"-F {config}"}.get
    assert module._connection_port() == 2200


def test_cache_key_covers_host_variables_and_date(tmp_path, monkeypatch):
    """Two batches whose facts differ, or two days (expiry), never share a compile."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    os.chmod(tmp_path, 0o700)
    catalog = {"portguard_services": {"https": {"port": 443}},
               "portguard_flows": [{"from": "b", "to": "a", "services": ["https"]}]}
    groups = {"all": ["a", "b"]}
    hostvars = {"a": {"ansible_default_ipv4": {"address": "192.0.2.1"}}, "b": {"portguard_egress": True}}
    first = compile_cache.compiled_policy(dict(catalog, groups=groups, hostvars=hostvars), ["task"])
    assert first.host("b").egress == ()
    hostvars["b"]["ansible_default_ipv4"] = {"address": "192.0.2.2"}
    second = compile_cache.compiled_policy(dict(catalog, groups=groups, hostvars=hostvars), ["task"])
    assert [entry.address_text() for entry in second.host("b").egress] == ["192.0.2.1"]
    catalog["portguard_flows"][0]["expires"] = "2030-01-01"
    before = compile_cache.compiled_policy(dict(catalog, groups=groups, hostvars=hostvars), ["task"],
                                           today=datetime.date(2029, 12, 31))
    after = compile_cache.compiled_policy(dict(catalog, groups=groups, hostvars=hostvars), ["task"],
                                          today=datetime.date(2030, 1, 2))
    assert before.host("b").egress and not after.host("b").egress and after.expired
