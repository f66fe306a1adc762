"""A local user names the rogue listener: port_facts and port_audit must show the name, not obey it.

A throwaway network namespace (``pgh-<tag>``) holds one listener on 0.0.0.0:7777 that no flow lets in. Its
process renamed itself with ``prctl(PR_SET_NAME)`` to ``evil ESC[31m BEL BS name`` (15 bytes, as long as the
kernel keeps) and its command line carries an OSC title sequence, a byte that is not UTF-8 and a bidi override.
``ansible-playbook`` runs port_facts and port_audit (which gathers with port_facts) inside the namespace, as root,
through the ``ansible.posix.json`` callback. Then:

- port_facts reports the name display-safe and exact: ``evil\\x1b[31m\\x07\\x08name``;
- the JUnit file parses with xml.etree and still holds the failing test case, with that name in its message;
- the failure message (the table the CI log shows) holds no control character but its line breaks.
"""

import json
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from support.ansible import ansible_env, tool
from support.catalogs import ssh_only_catalog
from support.requirements import need, require

pytestmark = [pytest.mark.kernel]

PORT = 7777
NAME = b"evil\x1b[31m\x07\x08name"
SHOWN = "evil\\x1b[31m\\x07\\x08name"
TITLE = b"--title=\x1b]0;pwned\x07\xff\xe2\x80\xae"
TITLE_SHOWN = "--title=\\x1b]0;pwned\\x07\\xff\\u202e"
LISTENER = f"""
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, {NAME!r}, 0, 0, 0)
sock = socket.socket()
sock.bind(("0.0.0.0", {PORT}))
sock.listen()
print("ready", flush=True)
sys.stdin.read()
"""
CATALOG = ssh_only_catalog(to="target")
PLAYBOOK = """
- name: Audit a host whose rogue listener chose its own name
  hosts: target
  gather_facts: false
  tasks:
    - name: Gather the listeners
      portguard.hardening.port_facts:
    - name: Audit them
      portguard.hardening.port_audit:
        report_dir: "{{ report_dir }}"
        fail_on: [unapproved]
      ignore_errors: true
"""


def run(*argv):
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """Run the playbook next to the hostile listener; returns (task results by name, report dir)."""
    require("ip")
    playbook_command = tool("ansible-playbook")
    need(playbook_command, "ansible-playbook")
    work = tmp_path_factory.mktemp("hostile-names")
    (work / "play.yml").write_text(PLAYBOOK)
    inventory = {"all": {"hosts": {"target": {"ansible_connection": "local",
                                              "ansible_python_interpreter": sys.executable,
                                              "portguard_addresses": ["192.0.2.10"]}},
                         "vars": dict(CATALOG, report_dir=str(work / "reports"))}}
    (work / "hosts.json").write_text(json.dumps(inventory))
    env = ansible_env(work, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
    namespace = f"pgh-{secrets.token_hex(3)}"
    run("ip", "netns", "add", namespace)
    try:
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        with subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", LISTENER, TITLE],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) as listener:
            try:
                assert listener.stdout.readline() == b"ready\n"
                proc = subprocess.run(["ip", "netns", "exec", namespace, str(playbook_command), "-i",
                                       str(work / "hosts.json"), str(work / "play.yml")],
                                      capture_output=True, text=True, env=env, timeout=300, check=False)
            finally:
                listener.stdin.close()
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
    assert proc.returncode in (0, 2), proc.stderr
    tasks = {task["task"]["name"]: task["hosts"]["target"] for task in json.loads(proc.stdout)["plays"][0]["tasks"]}
    return tasks, work / "reports"


def test_port_facts_reports_the_name_display_safe_and_exact(played):
    tasks, _reports = played
    found = [item for item in tasks["Gather the listeners"]["ansible_facts"]["portguard_listeners"]
             if item["port"] == PORT]
    assert [(item["name"], item["cmdline"].split()[-1]) for item in found] == [(SHOWN, TITLE_SHOWN)]


def test_junit_parses_and_keeps_the_failing_case(played):
    _tasks, reports = played
    root = ET.parse(reports / "audit" / "target.xml").getroot()  # noqa: S314 - our own output
    failures = [case for case in root.iter("testcase") if case.find("failure") is not None]
    assert [case.get("name") for case in failures] == [f"tcp/{PORT} 0.0.0.0:{PORT}"]
    message = failures[0].find("failure").get("message")
    assert f"process {SHOWN} (" in message
    assert root.get("failures") == "1"


def test_failure_table_holds_no_control_character(played):
    tasks, reports = played
    audit = tasks["Audit them"]
    assert audit["failed"] is True
    table = audit["msg"]
    assert SHOWN in table
    assert not [char for char in table if char != "\n" and (ord(char) < 0x20 or 0x7f <= ord(char) < 0xa0)]
    assert "\u202e" not in table
    # The JSON report keeps the name exactly (escaped once, reversible), and JSON escaping does the rest.
    report = json.loads((reports / "audit" / "target.json").read_text())
    assert [item["process"] for item in report["unapproved"]] == [SHOWN]
