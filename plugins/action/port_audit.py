"""Controller side of portguard.hardening.port_audit.

Gathers the host's listeners with port_facts (unless they are passed in),
classifies them against the catalog compiled once per play, writes the JSON
and JUnit reports on the controller and fails on what ``fail_on`` names.
"""

import os

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.portguard.hardening.plugins.module_utils.core.audit import (
    FAIL_ON,
    LISTS,
    audit_listeners,
    audit_to_json,
    audit_to_junit,
    parse_fail_on,
    violation_table,
    violations,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.plugin_utils.compile_cache import compiled_policy
from ansible_collections.portguard.hardening.plugins.plugin_utils.report_files import (
    report_file_name,
    report_root,
    write_report,
)

ARGUMENT_SPEC = {
    "fail_on": {"type": "list", "elements": "str", "choices": list(FAIL_ON), "default": []},
    "report_dir": {"type": "path"},
    "listeners": {"type": "list", "elements": "dict"},
}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def _listeners(self, task_vars, given):
        if given is not None:
            return given
        gathered = self._execute_module(module_name="portguard.hardening.port_facts", module_args={},
                                        task_vars=task_vars)
        if gathered.get("failed") or gathered.get("unreachable"):
            raise AnsibleActionFail(f"port_facts failed on the host: {gathered.get('msg')}", result=gathered)
        return gathered["ansible_facts"]["portguard_listeners"]

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        args = self.validate_argument_spec(ARGUMENT_SPEC)[1]
        host = task_vars["inventory_hostname"]
        fail_on = parse_fail_on(args["fail_on"])
        report_dir = report_root(args.get("report_dir"), task_vars)
        try:
            policy = compiled_policy(task_vars, [self._task._uuid, self._play_context.check_mode])
            host_policy = policy.host(host)
        except PortguardError as exc:
            raise AnsibleActionFail(f"portguard catalog refused: {exc}") from exc
        listeners = self._listeners(task_vars, args.get("listeners"))
        try:
            audit = audit_listeners(host_policy, listeners)
        except PortguardError as exc:
            raise AnsibleActionFail(f"port_audit: {exc}") from exc
        found = violations(audit, fail_on)
        report = dict(audit, fail_on=list(fail_on), failed=bool(found))
        audit_dir = os.path.join(report_dir, "audit")
        paths = {
            "json": os.path.join(audit_dir, f"{report_file_name(host)}.json"),
            "junit": os.path.join(audit_dir, f"{report_file_name(host)}.xml"),
        }
        try:
            os.makedirs(audit_dir, exist_ok=True)
            write_report(paths["json"], audit_to_json(report))
            write_report(paths["junit"], audit_to_junit({host: audit}, fail_on))
        except OSError as exc:
            raise AnsibleActionFail(f"port_audit: cannot write the reports under {audit_dir}: {exc}") from exc
        result.update(audit)
        result.update({
            "changed": False,  # reports are outputs, not changes
            "fail_on": list(fail_on),
            "report_files": paths,
            "violations": [
                f"{item.get('port', item.get('ports'))}/{item['proto']} {item['why']}: {item['reason']}"
                for item in found
            ],
        })
        counts = ", ".join(f"{audit['summary'][name]} {name.replace('_', ' ')}" for name in LISTS)
        if found:
            tally = {}
            for item in found:
                tally[item["why"]] = tally.get(item["why"], 0) + 1
            names = ", ".join(f"{count} {why}" for why, count in tally.items())
            result["failed"] = True
            result["msg"] = (f"port audit of {host} failed ({names}; fail_on: {', '.join(fail_on)}):\n"
                             f"{violation_table(host, found)}")
        else:
            result["msg"] = f"port audit of {host}: {counts}"
        return result
