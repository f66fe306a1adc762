"""Fixtures for every test; the helpers they share live in ``tests/support/`` (importable as ``support``)."""

import json
import subprocess

import pytest
from support.ansible import tool
from support.paths import EXAMPLE_INVENTORY, link_collection

link_collection()


def load_inventory(path=EXAMPLE_INVENTORY):
    """Read an inventory with Ansible's own loader: ``(catalog variables, groups, hostvars)``.

    The catalog variables are those of the first host (they live in group_vars/all).
    """
    raw = json.loads(subprocess.run([tool("ansible-inventory"), "-i", str(path), "--list"], check=True, capture_output=True,
                                    text=True).stdout)
    hostvars = raw.get("_meta", {}).get("hostvars", {})
    groups: dict[str, list[str]] = {}

    def members(name):
        if name in groups:
            return groups[name]
        node = raw.get(name, {})
        found = list(node.get("hosts", []))
        for child in node.get("children", []):
            found += members(child)
        groups[name] = sorted(set(found))
        return groups[name]

    for name in raw:
        if name != "_meta":
            members(name)
    first = sorted(hostvars)[0]
    return hostvars[first], groups, hostvars


@pytest.fixture(scope="session")
def example_inventory():
    return load_inventory()


@pytest.fixture
def private_runtime_dir(tmp_path, monkeypatch):
    """A private XDG_RUNTIME_DIR: the compile cache of the actions and filters lives there."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime
