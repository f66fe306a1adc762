"""playbooks/lint.yml and scripts/portguard-lint end to end: real ansible-playbook and ansible-inventory runs.

No host is contacted (the play runs on the implicit localhost), so these need
neither root nor containers; they are integration tests because they run Ansible itself.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.ansible import ansible_env, tool

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "inventory"


def env():
    # the lint script runs ansible-inventory: the one next to the interpreter first
    return ansible_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def lint_play(inventory, report_dir, *extra):
    return subprocess.run([tool("ansible-playbook"), "-i", str(inventory), "portguard.hardening.lint",
                           "-e", f"portguard_report_dir={report_dir}", "-e", "portguard_lint_today=2026-11-26", *extra],
                          capture_output=True, text=True, check=False, env=env(), cwd=str(report_dir), timeout=300)


@pytest.fixture
def broken_inventory(tmp_path):
    inventory = tmp_path / "inventory"
    (inventory / "group_vars" / "all").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            webservers:
              hosts:
                web1: {portguard_addresses: [10.0.1.1, "2001:db8:1::1"], ansible_connection: local}
            dbservers:
              hosts:
                db1: {portguard_addresses: [10.0.2.1, "2001:db8:2::1"], ansible_connection: local}
        """))
    (inventory / "group_vars" / "all" / "portguard.yml").write_text(textwrap.dedent("""\
        portguard_networks:
          office: [10.20.0.0/16, "2001:db8:20::/48"]
        portguard_services:
          https: {port: 443, proto: tcp, purpose: Public web traffic, owner: web}
          postgres: {port: 5432, proto: tcp, purpose: Orders database, owner: data}
        portguard_flows:
          - {name: office-web, from: ofice, to: webservers, services: [https]}
          - {name: web-db, from: webservers, to: dbservers, services: [postgres]}
        """))
    return inventory


def test_example_inventory_passes_and_writes_the_report(tmp_path):
    result = lint_play(EXAMPLES, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "lint.json").read_text())
    assert report["ok"] is True and report["errors"] == 0
    assert [(f["level"], f["code"], f["path"]) for f in report["findings"]] == [
        ("warning", "network-overlap", "portguard_networks.office"),
        ("warning", "network-unused", "portguard_networks.trusted"),
        ("warning", "flow-expired", "portguard_flows[7].expires"),
    ]
    assert "WARNING flow-expired portguard_flows[7].expires" in result.stdout
    assert "changed=0" in result.stdout and "failed=0" in result.stdout


def test_strict_fails_on_warnings(tmp_path):
    result = lint_play(EXAMPLES, tmp_path, "-e", "portguard_lint_strict=true")
    assert result.returncode != 0
    assert "0 error(s), 3 warning(s)" in result.stdout


def test_broken_inventory_fails_with_its_findings(tmp_path, broken_inventory):
    result = lint_play(broken_inventory, tmp_path)
    assert result.returncode != 0, result.stdout
    assert "ERROR unknown-name portguard_flows[0].from: unknown name 'ofice'" in result.stdout
    assert "ERROR management-missing portguard_management" in result.stdout
    report = json.loads((tmp_path / "lint.json").read_text())
    assert [(f["level"], f["code"], f["path"]) for f in report["findings"]] == [
        ("error", "unknown-name", "portguard_flows[0].from"),
        ("error", "management-missing", "portguard_management"),
        ("warning", "network-unused", "portguard_networks.office"),
    ]


def test_cli_script(tmp_path, broken_inventory):
    script = [sys.executable, str(ROOT / "scripts" / "portguard-lint"), "--today", "2026-11-26"]
    good = subprocess.run([*script, "-i", str(EXAMPLES)], capture_output=True, text=True, check=False, env=env(), timeout=120)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1] == "0 error(s), 3 warning(s)"
    strict = subprocess.run([*script, "-i", str(EXAMPLES), "--strict"], capture_output=True, text=True, check=False, env=env(),
                            timeout=120)
    assert strict.returncode == 1
    bad = subprocess.run([*script, "-i", str(broken_inventory), "--json"], capture_output=True, text=True, check=False, env=env(),
                         timeout=120)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["errors"] == 2 and report["findings"][0]["code"] == "unknown-name"
    missing = subprocess.run([*script, "-i", str(tmp_path / "nowhere")], capture_output=True, text=True, check=False, env=env(),
                             timeout=120)
    assert missing.returncode == 2 and "no inventory" in missing.stderr
