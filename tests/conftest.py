"""Make the repository importable as ``ansible_collections.portguard.hardening``.

The clone does not live in an ``ansible_collections/<ns>/<name>`` tree, so a
symlink under ``.build/`` (ignored by git, linters and the collection build)
stands for it.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / ".build" / "collections"
LINK = COLLECTIONS / "ansible_collections" / "portguard" / "hardening"

if not LINK.exists():
    LINK.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(ROOT, LINK)
    except FileExistsError:
        pass
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

EXAMPLE_INVENTORY = ROOT / "examples" / "inventory"


def load_inventory(path=EXAMPLE_INVENTORY):
    """Read an inventory with Ansible's own loader: ``(catalog variables, groups, hostvars)``.

    The catalog variables are those of the first host (they live in group_vars/all).
    """
    command = shutil.which("ansible-inventory") or str(Path(sys.executable).parent / "ansible-inventory")
    raw = json.loads(subprocess.run([command, "-i", str(path), "--list"], check=True, capture_output=True,
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
