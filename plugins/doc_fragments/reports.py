# Copyright: portguard maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the report tasks share (port_audit, port_report): an action plugin that reads the host and writes
report files on the controller (plugins/plugin_utils/report_files.py)."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  report_dir:
    description:
      - Directory on the controller for the report files; the task writes them in a subdirectory of it
        (C(audit) for port_audit, C(report) for port_report).
      - Defaults to the variable C(portguard_report_dir), else C(portguard-reports) in the working directory.
      - A host's files are named after the host as the P(portguard.hardening.report_file_name#filter) filter
        names them.
    type: path
attributes:
  action:
    description: Indicates this has a corresponding action plugin so some parts of the options can be executed on the controller.
    support: full
  check_mode:
    support: full
    details: The task only reads the host; it writes its report files on the controller in check mode too.
  diff_mode:
    support: none
    details: The task changes nothing on the host; report files are outputs, not changes.
"""
