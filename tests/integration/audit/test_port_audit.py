"""port_audit end to end: a real container, real listeners, a real ansible-playbook run.

The container (image built by scripts/lab-image.sh) gets:

- an unapproved listener: socat as ``nobody`` on 6379, IPv4 and IPv6 (v6only);
- loopback-only listeners on 127.0.0.1:5000 and [::1]:5000;
- approved listeners: a dual-stack ``::`` socket on 8443 open to ``any``, one on
  the container's own IPv4 address on 9443 (from ``office``), and an overexposed
  UDP wildcard socket on 5353 (from ``office`` only);
- nothing on the ``workers`` range 8000-8010 (not listening).

The container gets CAP_SYS_PTRACE: without it, root inside a container cannot
read the fds of another user's process, so the socat run as ``nobody`` would be
reported without its process (measured: ``Permission denied`` on /proc/PID/fd).
"""

import json
import os
import re
import shutil
import subprocess
import sysconfig
import textwrap
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from support.ansible import ansible_env, tool
from support.requirements import need

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
IMAGE = os.environ.get("PORTGUARD_LAB_IMAGE", "localhost/portguard-lab:bookworm")
CONTAINERS_CONF = ROOT / "scripts" / "lab" / "containers.conf"


def podman(*args, check=True):
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    return subprocess.run(["podman", *args], check=check, capture_output=True, text=True, env=env)


CATALOG = """
portguard_report_dir: {report_dir}
portguard_networks:
  office: [10.20.0.0/16, "2001:db8:20::/48"]
  admin_vpn: [10.99.0.0/24]
portguard_services:
  ssh: {{port: 22, proto: tcp, purpose: Remote administration, owner: platform}}
  app_tls: {{port: 8443, proto: tcp, purpose: Public app, owner: web}}
  internal: {{port: 9443, proto: tcp, purpose: Internal API, owner: web}}
  discovery: {{port: 5353, proto: udp, purpose: Service discovery, owner: platform}}
  workers: {{port: "8000-8010", proto: tcp, purpose: App workers, owner: web}}
portguard_flows:
  - name: public-app
    from: any
    to: web
    services: [app_tls]
  - name: office-internal
    from: office
    to: web
    services: [internal, discovery, workers]
portguard_management:
  from: [admin_vpn]
  services: [ssh]
"""

PLAYBOOK = """
- name: Audit the planted listeners
  hosts: web
  gather_facts: false
  tasks:
    - name: Audit, gathering the listeners itself
      portguard.hardening.port_audit:
        fail_on: "{{ fail_on | default([]) }}"
      register: audit

    - name: Gather the listeners
      portguard.hardening.port_facts:

    - name: Audit listeners passed in
      portguard.hardening.port_audit:
        listeners: "{{ ansible_facts.portguard_listeners }}"
        report_dir: "{{ given_dir }}"
      register: given

    - name: Keep the registered results for the test
      ansible.builtin.copy:
        content: "{{ {'audit': audit, 'given': given} | to_nice_json }}"
        dest: "{{ results_file }}"
        mode: "0644"
      delegate_to: localhost
      changed_when: false  # a test artefact, so that the recap shows what the audit tasks did
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    need(shutil.which("podman") is not None, "podman is not installed (apt-get install podman runc)")
    need(tool("ansible-playbook"), "ansible-playbook (scripts/setup.sh)")
    need((Path(sysconfig.get_paths()["purelib"]) / "ansible_collections" / "containers" / "podman").is_dir(),
         "the containers.podman collection (pip install ansible)")
    need(podman("image", "exists", IMAGE, check=False).returncode == 0,
         f"image {IMAGE} is missing (bash scripts/lab-image.sh)")
    name = f"pgaudit-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--hostname", name, "--cap-add", "SYS_PTRACE", IMAGE)
    try:
        address = podman("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()
        assert address, "the container has no IPv4 address"
        listeners = [
            ["runuser", "-u", "nobody", "--", "socat", "TCP4-LISTEN:6379,fork,reuseaddr", "EXEC:/bin/cat"],
            ["runuser", "-u", "nobody", "--", "socat", "TCP6-LISTEN:6379,ipv6only=1,fork,reuseaddr", "EXEC:/bin/cat"],
            ["socat", "TCP4-LISTEN:5000,bind=127.0.0.1,fork,reuseaddr", "EXEC:/bin/cat"],
            ["socat", "TCP6-LISTEN:5000,bind=[::1],ipv6only=1,fork,reuseaddr", "EXEC:/bin/cat"],
            ["socat", "TCP6-LISTEN:8443,ipv6only=0,fork,reuseaddr", "EXEC:/bin/cat"],
            ["socat", f"TCP4-LISTEN:9443,bind={address},fork,reuseaddr", "EXEC:/bin/cat"],
            ["socat", "-u", "UDP4-RECV:5353", "OPEN:/dev/null"],
        ]
        for argv in listeners:
            podman("exec", "-d", name, *argv)
        wanted = {":6379 ", ":5000 ", ":8443 ", ":9443 ", ":5353 "}
        deadline = time.monotonic() + 10
        while True:
            shown = podman("exec", name, "ss", "-Htuln").stdout
            if all(port in shown for port in wanted) and shown.count(":6379 ") == 2 and shown.count(":5000 ") == 2:
                break
            assert time.monotonic() < deadline, f"listeners did not come up:\n{shown}"
            time.sleep(0.2)
        work = tmp_path_factory.mktemp("audit")
        inventory = work / "inventory.yml"
        inventory.write_text(textwrap.dedent(f"""
            all:
              children:
                web:
                  hosts:
                    {name}:
                      ansible_connection: containers.podman.podman
                      ansible_python_interpreter: /usr/bin/python3
                      portguard_addresses: [{address}]
            """))
        group_vars = work / "group_vars"
        group_vars.mkdir()
        (group_vars / "all.yml").write_text(CATALOG.format(report_dir=work / "reports"))
        # group_vars next to the inventory file is where ansible looks for them.
        (work / "playbook.yml").write_text(PLAYBOOK)
        yield {"name": name, "address": address, "work": work}
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def run_playbook(lab, **extra):
    work = lab["work"]
    env = ansible_env(work, ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_CALLBACK_RESULT_FORMAT="yaml",
                      CONTAINERS_CONF=str(CONTAINERS_CONF))
    results = work / f"results-{uuid.uuid4().hex[:6]}.json"
    variables = {"results_file": str(results), "given_dir": str(work / "given"), **extra}
    started = time.monotonic()
    done = subprocess.run(
        [tool("ansible-playbook"), "-i", str(work / "inventory.yml"), str(work / "playbook.yml"),
         "-e", json.dumps(variables)],
        cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    done.seconds = time.monotonic() - started
    done.results = json.loads(results.read_text()) if results.exists() else None
    return done


def by_endpoint(result):
    table = {}
    for status in ("approved", "unapproved", "loopback"):
        for item in result[status]:
            key = (item["proto"], item["address"], item["port"])
            assert key not in table, f"{key} listed twice"
            table[key] = item
    return table


@pytest.fixture(scope="module")
def passing_run(lab):
    done = run_playbook(lab)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def check_classification(result, address):
    items = by_endpoint(result)
    expected = {
        ("tcp", "0.0.0.0", 6379): "unapproved",
        ("tcp", "::", 6379): "unapproved",
        ("tcp", "127.0.0.1", 5000): "loopback",
        ("tcp", "::1", 5000): "loopback",
        ("tcp", "::", 8443): "approved",
        ("tcp", address, 9443): "approved",
        ("udp", "0.0.0.0", 5353): "approved",
    }
    assert {key: items[key]["status"] for key in expected} == expected
    assert set(items) == set(expected), f"unexpected listeners: {set(items) - set(expected)}"
    redis = items["tcp", "0.0.0.0", 6379]
    assert (redis["process"], redis["user"]) == ("socat", "nobody")
    assert isinstance(redis["pid"], int)
    assert items["tcp", "::", 6379]["family"] == "ipv6"
    assert items["tcp", "::", 8443]["allowed_from"] == {"ipv4": ["0.0.0.0/0"], "ipv6": ["::/0"]}
    assert items["tcp", "::", 8443]["labels"][0]["flow"] == "public-app"
    assert items["tcp", address, 9443]["overexposed"] is False
    assert items["tcp", address, 9443]["services"] == ["internal"]
    assert [(i["proto"], i["port"]) for i in result["overexposed"]] == [("udp", 5353)]
    missing = {(i["service"], i["ports"]) for i in result["not_listening"]}
    assert missing == {("ssh", "22"), ("workers", "8000-8010")}
    assert result["summary"] == {"approved": 3, "unapproved": 2, "overexposed": 1, "loopback": 2,
                                 "not_listening": 2}


def test_listeners_are_classified(lab, passing_run):
    audit = passing_run.results["audit"]
    assert audit["changed"] is False and not audit.get("failed")
    assert passing_run.results["given"]["changed"] is False
    check_classification(audit, lab["address"])
    # Listeners passed in from earlier facts give the same verdicts.
    given = passing_run.results["given"]
    for name in ("approved", "unapproved", "loopback", "overexposed", "not_listening"):
        assert [(i.get("address"), i.get("port"), i["proto"]) for i in given[name]] == \
               [(i.get("address"), i.get("port"), i["proto"]) for i in audit[name]]
    assert "changed=0" in passing_run.stdout and "failed=0" in passing_run.stdout


def test_reports_on_the_controller(lab, passing_run):
    reports = lab["work"] / "reports" / "audit"  # from portguard_report_dir
    assert sorted(p.name for p in reports.iterdir()) == [f"{lab['name']}.json", f"{lab['name']}.xml"]
    report = json.loads((reports / f"{lab['name']}.json").read_text())
    check_classification(report, lab["address"])
    assert report["failed"] is False and report["fail_on"] == []
    assert passing_run.results["audit"]["report_files"]["json"] == str(reports / f"{lab['name']}.json")
    assert (lab["work"] / "given" / "audit" / f"{lab['name']}.json").exists()
    suite = ET.parse(reports / f"{lab['name']}.xml").getroot().find("testsuite")  # noqa: S314 - our own output
    failures = {c.get("name"): c.find("failure") for c in suite.iter("testcase") if c.find("failure") is not None}
    assert sorted(failures) == ["tcp/6379 0.0.0.0:6379", "tcp/6379 [::]:6379"]


def test_fail_on_unapproved_fails_the_task(lab, passing_run):
    # Its own report directory, so that the passing run's reports stay as they were.
    report_dir = lab["work"] / "reports-fail"
    done = run_playbook(lab, fail_on=["unapproved"], portguard_report_dir=str(report_dir))
    assert done.returncode != 0, done.stdout
    output = done.stdout
    assert "failed=1" in output
    assert "failed (2 unapproved; fail_on: unapproved)" in output
    # The message is a table, one row per violation; ansible-core prints it in its
    # error line and again in the result (as a block with the yaml result format).
    row_pattern = re.compile(rf"{re.escape(lab['name'])}\s+\d+(-\d+)?/(tcp|udp)\s")
    rows = sorted({line.strip() for line in output.splitlines() if row_pattern.match(line.strip())})
    assert len(rows) == 2, output
    for row in rows:
        assert row.split()[1:3] in (["6379/tcp", "0.0.0.0"], ["6379/tcp", "::"])
        assert "socat (" in row and " nobody " in row and "unapproved:" in row
    assert {row.split()[2] for row in rows} == {"0.0.0.0", "::"}
    report_dir = report_dir / "audit"
    report = json.loads((report_dir / f"{lab['name']}.json").read_text())
    assert report["failed"] is True and report["fail_on"] == ["unapproved"]
    root = ET.parse(report_dir / f"{lab['name']}.xml").getroot()  # noqa: S314 - our own output
    failures = list(root.iter("failure"))
    assert len(failures) == 2 and all("6379" in f.get("message") for f in failures)
    assert all("socat" in f.get("message") and "nobody" in f.get("message") for f in failures)
    assert root.get("failures") == "2"
