"""Where things are, and the one place that makes the repository importable as a collection.

The clone does not live in an ``ansible_collections/<ns>/<name>`` tree, so a symlink under ``.build/``
(ignored by git, linters and the collection build) stands for it.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".build" / "collections"
LINK = COLLECTIONS / "ansible_collections" / "portguard" / "hardening"
EXAMPLE_INVENTORY = ROOT / "examples" / "inventory"


def link_collection() -> None:
    """Make ``ansible_collections.portguard.hardening`` importable (tests, benchmarks, ansible runs)."""
    if not LINK.exists():
        LINK.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(ROOT, LINK)
        except FileExistsError:
            pass
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
