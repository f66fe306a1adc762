"""Controller side of portguard.hardening.port_report.

Per host: reads the host's counters and deny log lines with port_activity
(only the lines after the cursor the previous report saved), joins them to
the catalog compiled once per play, writes ``report/<host>.json`` and the
state the next report starts from. With ``summarize``: joins the host
reports into ``report/report.json``, ``report/report.html`` and a section of
the verify page, lists unused entries per owner, expired and expiring flows,
and fails on expired flows when asked to (CI gate).
"""

import datetime
import json
import os

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.core.report import activity_report as reporting
from ansible_collections.portguard.hardening.plugins.module_utils.core.report import render
from ansible_collections.portguard.hardening.plugins.plugin_utils.compile_cache import compiled_policy
from ansible_collections.portguard.hardening.plugins.plugin_utils.report_files import (
    report_file_name,
    report_root,
    write_report,
)

ARGUMENT_SPEC = {
    "report_dir": {"type": "path"},
    "unusual_threshold": {"type": "int", "default": 20},
    "expiring_days": {"type": "int", "default": 14},
    "fail_on_expired": {"type": "bool", "default": False},
    "update_state": {"type": "bool", "default": True},
    "logs": {"type": "bool", "default": True},
    "summarize": {"type": "bool", "default": False},
    "reports": {"type": "list", "elements": "dict"},
}

# Bounds of the integer arguments (validate_argument_spec checks only their type).
BOUNDS = {"unusual_threshold": (1, 1_000_000), "expiring_days": (0, 3650)}

display = Display()


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def _policy(self, task_vars):
        try:
            return compiled_policy(task_vars, [self._task._uuid, self._play_context.check_mode])
        except PortguardError as exc:
            raise AnsibleActionFail(f"portguard catalog refused: {exc}") from exc

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        args = self.validate_argument_spec(ARGUMENT_SPEC)[1]
        for name, (low, high) in BOUNDS.items():
            if not low <= args[name] <= high:
                raise AnsibleActionFail(f"port_report: {name} {args[name]} is out of range {low}-{high}")
        root = report_root(args.get("report_dir"), task_vars)
        directory = os.path.join(root, "report")
        try:
            os.makedirs(os.path.join(directory, "state"), exist_ok=True)
        except OSError as exc:
            raise AnsibleActionFail(f"port_report: cannot create {directory}: {exc}") from exc
        policy = self._policy(task_vars)
        if args["summarize"]:
            result.update(self._summarize(policy, args, directory, root))
        else:
            result.update(self._host(policy, args, directory, task_vars))
        result["changed"] = False  # reports are outputs, not changes
        return result

    def _host(self, policy, args, directory, task_vars):
        host = task_vars["inventory_hostname"]
        try:
            host_policy = policy.host(host)
        except PortguardError as exc:
            raise AnsibleActionFail(f"portguard catalog refused: {exc}") from exc
        settings = host_policy.settings
        state_path = os.path.join(directory, "state", f"{report_file_name(host)}.json")
        previous = _read_json(state_path)
        module_args = {"logs": args["logs"], "log_prefix": settings.log_prefix, "addresses": list(settings.addresses)}
        if previous and previous.get("cursor"):
            module_args["since"] = previous["cursor"]
        activity = self._execute_module(module_name="portguard.hardening.port_activity", module_args=module_args,
                                        task_vars=task_vars)
        if activity.get("failed") or activity.get("unreachable"):
            raise AnsibleActionFail(f"port_activity failed on {host}: {activity.get('msg')}", result=activity)
        report, state = reporting.host_report(host, host_policy, activity, previous, reporting.SourceNamer(policy),
                                              threshold=args["unusual_threshold"])
        path = os.path.join(directory, f"{report_file_name(host)}.json")
        try:
            write_report(path, json.dumps(report, indent=2, sort_keys=True) + "\n")
            if args["update_state"]:
                write_report(state_path, json.dumps(state, sort_keys=True) + "\n")
        except OSError as exc:
            raise AnsibleActionFail(f"port_report: cannot write {path}: {exc}") from exc
        note = f"; {report['log_note']}" if report["log_note"] else ""
        return {"report": report, "report_file": path,
                "msg": f"{host}: {len(report['denied_new'])} new denied source/port group(s), "
                       f"{len(report['unused'])} unused entr(y/ies), log: {report['log']['source']}{note}"}

    def _summarize(self, policy, args, directory, root):
        reports = [r for r in (args.get("reports") or []) if isinstance(r, dict) and r.get("host")]
        today = datetime.datetime.now(datetime.UTC).date()
        expiring = reporting.expiring_flows(policy, today, args["expiring_days"])
        summary = reporting.summarize(reports, list(policy.expired), expiring)
        text = render.render_text(summary)
        paths = {"json": os.path.join(directory, "report.json"), "html": os.path.join(directory, "report.html")}
        verify_page = os.path.join(root, "verify", "matrix.html")
        try:
            write_report(paths["json"], json.dumps(summary, indent=2, sort_keys=True) + "\n")
            write_report(paths["html"], render.render_html(summary))
            if os.path.exists(verify_page):
                with open(verify_page, encoding="utf-8") as handle:
                    page = handle.read()
                write_report(verify_page, render.extend_page(page, summary))
                paths["verify_html"] = verify_page
        except OSError as exc:
            raise AnsibleActionFail(f"port_report: cannot write the reports under {directory}: {exc}") from exc
        warnings = [f"flow {f['name']} expires on {f['expires']} ({f['days_left']} day(s) left; owners: "
                    f"{', '.join(f['owners']) or '-'})" for f in expiring]
        for warning in warnings:
            display.warning(warning)
        out = {"summary": summary, "text": text, "report_files": paths, "expired": summary["expired"],
               "expiring": expiring, "unused_by_owner": summary["unused_by_owner"], "unusual": summary["unusual"]}
        if args["fail_on_expired"] and summary["expired"]:
            names = ", ".join(f"{f['name']} ({f['path']}, {f['expires']})" for f in summary["expired"])
            out.update(failed=True, msg=f"expired flows in the catalog (fail_on_expired): {names}")
        else:
            out["msg"] = f"port activity report of {len(reports)} host(s): {paths['html']}"
        return out
