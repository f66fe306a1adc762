"""Fixtures shared by the tests of the pure core.

Golden files: ``golden/<host>.nft``, ``<host>.ipv4.rules`` and ``<host>.ipv6.rules``
hold what the renderers make of ``examples/inventory``, compiled as of
``GOLDEN_TODAY`` so that expiry does not follow the calendar. After an
intended change of the rendered output, regenerate them and review the diff::

    PORTGUARD_REGEN_GOLDEN=1 python -m pytest tests/unit/plugins/module_utils -k golden
"""

import datetime
import os
from pathlib import Path

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.schema import catalog_vars

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_TODAY = datetime.date(2026, 11, 26)


@pytest.fixture(scope="session")
def example_policy(example_inventory):
    variables, groups, hostvars = example_inventory
    return compile_catalog(catalog_vars(variables), groups, hostvars, today=GOLDEN_TODAY)


@pytest.fixture(scope="session")
def example_hosts(example_inventory):
    return sorted(example_inventory[1]["all"])


@pytest.fixture(scope="session")
def golden_hosts():
    """The hosts that have golden files."""
    return {path.name.split(".")[0] for path in GOLDEN_DIR.iterdir() if path.suffix in (".nft", ".rules")}


@pytest.fixture
def golden():
    """``golden(name, text)``: compare ``text`` with ``golden/<name>``, or rewrite it when regenerating."""

    def check(name: str, text: str):
        path = GOLDEN_DIR / name
        if os.environ.get("PORTGUARD_REGEN_GOLDEN"):
            path.write_text(text)
            return
        assert path.exists(), f"{path} is missing; regenerate with PORTGUARD_REGEN_GOLDEN=1"
        assert text == path.read_text(), f"{name} differs from the golden file; if intended, regenerate it"

    return check
