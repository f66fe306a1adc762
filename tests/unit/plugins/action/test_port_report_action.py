"""The port_report action without a host: bounds, the cursor handed from one report to the next, the summary.

The end-to-end run with real traffic is tests/integration/report/test_activity_report.py.
"""

import json

import pytest
from ansible.errors import AnsibleActionFail
from support.actions import make_action, task_vars

from ansible_collections.portguard.hardening.plugins.action.port_report import ActionModule


def activity(seq, denied):
    """What port_activity returns for db1: counters, and the deny log since the cursor."""
    return {
        "counters": {"backend": "nftables", "denied_in": denied, "denied_out": None, "logged_in": denied,
                     "logged_out": None, "elements": []},
        "now": 1_780_000_000.0 + seq, "boot_id": "boot-1", "replaced": {"at": 1_779_990_000.0, "event": "applied"},
        "log": {"source": "kmsg", "readable": True, "cursor": {"source": "kmsg", "seq": seq}, "lines": denied,
                "lost": False,
                "groups": [{"direction": "in", "src": "172.30.89.13", "dst": "172.30.89.31", "proto": "tcp",
                            "port": 3306, "count": denied, "first": 1_780_000_000.0, "last": 1_780_000_000.0 + seq}]},
    }


pytestmark = pytest.mark.usefixtures("private_runtime_dir")


@pytest.fixture
def db1_vars(example_inventory, tmp_path):
    return task_vars(example_inventory, "db1", portguard_report_dir=str(tmp_path / "reports"))


def report(args, *replies):
    return make_action(ActionModule, args, replies)


@pytest.mark.parametrize(("args", "message"), [
    ({"unusual_threshold": 0}, "port_report: unusual_threshold 0 is out of range 1-1000000"),
    ({"unusual_threshold": 1_000_001}, "port_report: unusual_threshold 1000001 is out of range 1-1000000"),
    ({"expiring_days": -1}, "port_report: expiring_days -1 is out of range 0-3650"),
    ({"expiring_days": 3651}, "port_report: expiring_days 3651 is out of range 0-3650"),
])
def test_bounds_are_checked_before_anything_runs(db1_vars, tmp_path, args, message):
    action = report(args)
    with pytest.raises(AnsibleActionFail, match=message):
        action.run(task_vars=db1_vars)
    action._execute_module.assert_not_called()
    assert not (tmp_path / "reports").exists()


def test_the_next_report_starts_where_the_last_one_stopped(db1_vars, tmp_path):
    first = report({}, activity(100, 4)).run(task_vars=db1_vars)
    directory = tmp_path / "reports" / "report"
    assert first["report_file"] == str(directory / "db1.json") and first["changed"] is False
    assert json.loads((directory / "db1.json").read_text())["first_report"] is True
    assert json.loads((directory / "state" / "db1.json").read_text())["cursor"] == {"source": "kmsg", "seq": 100}

    action = report({}, activity(160, 7))
    second = action.run(task_vars=db1_vars)
    sent = action._execute_module.call_args.kwargs
    assert sent["module_name"] == "portguard.hardening.port_activity"
    # db1's own settings from the catalog, and the cursor the first report saved
    assert sent["module_args"] == {"logs": True, "log_prefix": "portguard-deny: ",
                                   "addresses": ["172.30.89.31", "fd89:7067::31"],
                                   "since": {"source": "kmsg", "seq": 100}}
    assert second["report"]["first_report"] is False
    assert second["report"]["deny_counters"]["denied_in"] == {"total": 7, "new": 3}
    assert second["msg"].startswith("db1: ")


def test_without_update_state_the_cursor_stays(db1_vars, tmp_path):
    report({}, activity(100, 4)).run(task_vars=db1_vars)
    report({"update_state": False, "logs": False}, activity(160, 7)).run(task_vars=db1_vars)
    action = report({}, activity(200, 9))
    action.run(task_vars=db1_vars)
    assert action._execute_module.call_args.kwargs["module_args"]["since"] == {"source": "kmsg", "seq": 100}


def test_the_summary_fails_on_the_expired_flow_when_asked(db1_vars, tmp_path):
    host = report({}, activity(100, 4)).run(task_vars=db1_vars)["report"]
    action = report({"summarize": True, "fail_on_expired": True, "reports": [host, {"not": "a report"}]})
    result = action.run(task_vars=db1_vars)
    action._execute_module.assert_not_called()
    assert result["failed"] is True
    assert result["msg"] == ("expired flows in the catalog (fail_on_expired): "
                             "office-legacy-ftp (portguard_flows[7], 2025-06-30)")
    directory = tmp_path / "reports" / "report"
    assert result["report_files"] == {"json": str(directory / "report.json"), "html": str(directory / "report.html")}
    assert sorted(json.loads((directory / "report.json").read_text())["hosts"]) == ["db1"]


def test_the_summary_passes_without_fail_on_expired(db1_vars, tmp_path):
    result = report({"summarize": True, "reports": []}).run(task_vars=db1_vars)
    assert "failed" not in result
    assert [flow["name"] for flow in result["expired"]] == ["office-legacy-ftp"]
    assert result["msg"] == f"port activity report of 0 host(s): {tmp_path / 'reports' / 'report' / 'report.html'}"
