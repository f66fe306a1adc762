"""Every host gets its own report files, inside the report directory, whatever its inventory name.

A real ``ansible-playbook`` run over the local connection audits (listeners handed in) and reports (port_activity
on this machine, counters only) four hosts whose names the compiler accepts but which once shared files:
``fd00::1`` and ``fd00__1`` (both were ``fd00__1``; Ansible reads ``web:1`` as host ``web``, port 1), ``report``
(its host report was ``report/report.json``, which the summary overwrites) and a 253-character name (a file name
longer than the 255 bytes a file system takes). Names that the compiler refuses (``web/1``, ``../../etc/x``) never
reach a file name; their encoding is tested in tests/unit/plugins/module_utils/test_hostile_output.py.
"""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from support.ansible import ansible_env
from support.catalogs import ssh_only_catalog

pytestmark = [pytest.mark.integration]

HOSTS = ["fd00::1", "fd00__1", "report", "h" + "0123456789" * 25 + "23"]
CATALOG = ssh_only_catalog(to="all")
PLAYBOOK = """
- name: Audit and report hosts whose names once shared files
  hosts: all
  gather_facts: false
  tasks:
    - name: Audit
      portguard.hardening.port_audit:
        listeners: []
        report_dir: "{{ report_dir }}"
    - name: Report per host
      portguard.hardening.port_report:
        report_dir: "{{ report_dir }}"
        logs: false
      register: host_report
    - name: Summarize
      portguard.hardening.port_report:
        summarize: true
        reports: "{{ ansible_play_hosts | map('extract', hostvars, ['host_report', 'report']) | list }}"
        report_dir: "{{ report_dir }}"
      run_once: true
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    playbook_command = Path(sys.executable).parent / "ansible-playbook"
    assert playbook_command.exists(), "ansible-playbook is installed next to the interpreter (scripts/setup.sh)"
    work = tmp_path_factory.mktemp("report-names")
    (work / "play.yml").write_text(PLAYBOOK)
    hosts = {host: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                    "portguard_addresses": [f"192.0.2.{index + 1}"]} for index, host in enumerate(HOSTS)}
    inventory = {"all": {"hosts": hosts, "vars": dict(CATALOG, report_dir=str(work / "reports"))}}
    (work / "hosts.json").write_text(json.dumps(inventory))
    env = ansible_env(work)
    proc = subprocess.run([str(playbook_command), "-i", str(work / "hosts.json"), str(work / "play.yml")],
                          capture_output=True, text=True, env=env, timeout=600, check=False, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return work


def test_one_audit_report_per_host(reports):
    audit = reports / "reports" / "audit"
    assert sorted(json.loads(path.read_text())["host"] for path in audit.glob("*.json")) == sorted(HOSTS)
    suites = [ET.parse(path).getroot().find("testsuite").get("name") for path in audit.glob("*.xml")]  # noqa: S314
    assert sorted(suites) == sorted(HOSTS)


def test_one_activity_report_and_state_per_host_next_to_the_summary(reports):
    directory = reports / "reports" / "report"
    per_host = [path for path in directory.glob("*.json") if path.name != "report.json"]
    assert sorted(json.loads(path.read_text())["host"] for path in per_host) == sorted(HOSTS)
    assert sorted(json.loads((directory / "report.json").read_text())["hosts"]) == sorted(HOSTS)
    assert len(list((directory / "state").glob("*.json"))) == len(HOSTS)


def test_nothing_is_written_outside_the_report_directory(reports):
    written = {path.relative_to(reports).parts[0] for path in reports.rglob("*") if path.is_file()}
    assert written <= {"play.yml", "hosts.json", "reports", "ansible-tmp"}
    for path in (reports / "reports").rglob("*"):
        assert len(path.name.encode()) <= 255 and not path.name.startswith("-")
