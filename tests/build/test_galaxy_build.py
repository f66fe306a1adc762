"""The collection as users get it: built, installed from the tarball, called by FQCN."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GALAXY = yaml.safe_load((ROOT / "galaxy.yml").read_text())

# Developer and CI leftovers that must never ship.
NEVER_SHIPPED = (
    ".venv/",
    ".build/",
    ".git/",
    ".ci/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    "tests/output/",
    "portguard-reports/",
    "bench/results/",
)

PLAYBOOK = """\
- name: Render web1's ruleset with the installed collection
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Render the nftables ruleset of web1
      ansible.builtin.copy:
        content: "{{ hostvars | portguard.hardening.ruleset(groups, 'web1') }}"
        dest: "{{ rendered_path }}"
        mode: "0600"
"""

pytestmark = pytest.mark.slow


def tool(name):
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    assert path, f"{name} not found next to {sys.executable} nor on PATH: run scripts/setup.sh"
    return path


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def isolated_env(collections_path):
    """Ansible sees only ``collections_path``: not the repository, not site-packages."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(collections_path),
        ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="false",
    )
    return env


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    # The repository's .build holds a symlink back to the root; the build must not walk it.
    link = ROOT / ".build" / "collections" / "ansible_collections" / "portguard" / "hardening"
    assert link.resolve() == ROOT, f"{link} should point at the repository root (tests/conftest.py makes it)"
    out = tmp_path_factory.mktemp("dist")
    run([tool("ansible-galaxy"), "collection", "build", str(ROOT), "--output-path", str(out)], cwd=out)
    return out / f"{GALAXY['namespace']}-{GALAXY['name']}-{GALAXY['version']}.tar.gz"


@pytest.fixture(scope="module")
def installed(tarball, tmp_path_factory):
    collections = tmp_path_factory.mktemp("collections")
    run(
        [tool("ansible-galaxy"), "collection", "install", "--offline", str(tarball), "-p", str(collections)],
        env=isolated_env(collections),
        cwd=collections,
    )
    return collections


def test_tarball_is_built(tarball):
    assert tarball.is_file()


def test_tarball_ships_the_collection_and_nothing_else(tarball):
    with tarfile.open(tarball) as archive:
        names = archive.getnames()
    leaked = sorted(name for name in names if name.startswith(NEVER_SHIPPED) or name.endswith(".tar.gz"))
    assert not leaked, f"developer files in the artifact: {leaked[:20]}"
    assert {"MANIFEST.json", "FILES.json", "meta/runtime.yml", "LICENSE", "plugins/filter/portguard.py"} <= set(names)
    # A walk through .build would show up as a second copy of the tree.
    assert not [name for name in names if "ansible_collections" in name]


def test_manifest_metadata(tarball):
    with tarfile.open(tarball) as archive:
        manifest = json.load(archive.extractfile("MANIFEST.json"))["collection_info"]
    assert (manifest["namespace"], manifest["name"], manifest["version"]) == ("portguard", "hardening", "0.1.0")
    assert manifest["license"] == GALAXY["license"]
    assert manifest["dependencies"] == {}


def test_installed_copy_runs_by_fqcn(installed, tmp_path):
    installed_root = installed / "ansible_collections" / "portguard" / "hardening"
    # MANIFEST.json exists only in an installed artifact, never in the repository.
    assert (installed_root / "MANIFEST.json").is_file()
    playbook = tmp_path / "render.yml"
    playbook.write_text(PLAYBOOK)
    rendered = tmp_path / "web1.nft"
    run(
        [
            tool("ansible-playbook"),
            "-i",
            str(ROOT / "examples" / "inventory"),
            "-e",
            f"rendered_path={rendered}",
            str(playbook),
        ],
        env=isolated_env(installed),
        cwd=tmp_path,
    )
    assert "table inet portguard" in rendered.read_text()
