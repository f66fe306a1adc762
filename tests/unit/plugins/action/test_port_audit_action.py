"""The port_audit action without a host: what it reports, writes and fails on for db1 of the example inventory.

The end-to-end run against a container is tests/integration/audit/test_port_audit.py.
"""

import json

import pytest
from ansible.errors import AnsibleActionFail
from support.actions import make_action, task_vars

from ansible_collections.portguard.hardening.plugins.action.port_audit import ActionModule


def listener(proto, address, port, name, pid):
    """One socket as port_facts reports it."""
    return {"protocol": proto, "family": "ipv6" if ":" in address else "ipv4", "address": address, "port": port,
            "v6only": None, "v4_mapped": False, "interface": None, "pid": pid, "pids": [pid], "name": name,
            "cmdline": f"/usr/sbin/{name}", "user": "root", "uid": 0}


DB1_LISTENERS = [
    listener("tcp", "0.0.0.0", 22, "sshd", 501),          # management: approved
    listener("tcp", "0.0.0.0", 5432, "postgres", 502),    # app-to-db: approved
    listener("tcp", "0.0.0.0", 6379, "redis-server", 503),  # in no flow: unapproved
    listener("tcp", "127.0.0.1", 9187, "exporter", 504),  # loopback only
]


pytestmark = pytest.mark.usefixtures("private_runtime_dir")


@pytest.fixture
def db1_vars(example_inventory, tmp_path):
    return task_vars(example_inventory, "db1", portguard_report_dir=str(tmp_path / "reports"))


def audit(args, gathered=None):
    return make_action(ActionModule, args, [gathered])


def test_an_unapproved_listener_fails_the_task_when_asked(db1_vars, tmp_path):
    action = audit({"listeners": DB1_LISTENERS, "fail_on": ["unapproved"]})
    result = action.run(task_vars=db1_vars)
    action._execute_module.assert_not_called()  # the listeners were given
    assert result["failed"] is True and result["changed"] is False
    assert [item["port"] for item in result["approved"]] == [22, 5432]
    assert [item["port"] for item in result["unapproved"]] == [6379]
    assert result["violations"] == [f"6379/tcp unapproved: {result['unapproved'][0]['reason']}"]
    assert result["msg"].startswith("port audit of db1 failed (1 unapproved; fail_on: unapproved):\n")
    assert "redis-server" in result["msg"]
    audit_dir = tmp_path / "reports" / "audit"
    assert result["report_files"] == {"json": str(audit_dir / "db1.json"), "junit": str(audit_dir / "db1.xml")}
    report = json.loads((audit_dir / "db1.json").read_text())
    assert report["failed"] is True and report["fail_on"] == ["unapproved"]
    assert '<failure' in (audit_dir / "db1.xml").read_text()


def test_without_fail_on_the_task_reports_and_passes(db1_vars):
    result = audit({"listeners": DB1_LISTENERS}).run(task_vars=db1_vars)
    assert "failed" not in result and result["violations"] == [] and result["fail_on"] == []
    counts = ", ".join(f"{result['summary'][name]} {name.replace('_', ' ')}"
                       for name in ("approved", "unapproved", "overexposed", "loopback", "not_listening"))
    assert result["msg"] == f"port audit of db1: {counts}"
    assert (result["summary"]["approved"], result["summary"]["unapproved"], result["summary"]["loopback"]) == (2, 1, 1)


def test_the_listeners_are_gathered_with_port_facts_when_not_given(db1_vars, tmp_path):
    action = audit({"report_dir": str(tmp_path / "elsewhere")},
                   gathered={"ansible_facts": {"portguard_listeners": DB1_LISTENERS}})
    result = action.run(task_vars=db1_vars)
    assert action._execute_module.call_args.kwargs["module_name"] == "portguard.hardening.port_facts"
    assert [item["port"] for item in result["unapproved"]] == [6379]
    # the task's report_dir wins over portguard_report_dir
    assert result["report_files"]["json"] == str(tmp_path / "elsewhere" / "audit" / "db1.json")


def test_a_failed_port_facts_fails_the_task(db1_vars):
    action = audit({}, gathered={"failed": True, "msg": "ss: not found"})
    with pytest.raises(AnsibleActionFail, match="port_facts failed on the host: ss: not found"):
        action.run(task_vars=db1_vars)


def test_an_unknown_fail_on_is_refused(db1_vars):
    with pytest.raises(AnsibleActionFail, match="fail_on"):
        audit({"listeners": DB1_LISTENERS, "fail_on": ["everything"]}).run(task_vars=db1_vars)
