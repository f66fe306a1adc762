"""The layout keeps the architecture that docs/architecture.md describes, checked on the source itself.

- ``module_utils/core`` is pure: it imports nothing that does I/O and calls no ``open``;
- every table, chain, set and path name of a backend is spelled in ``core/backends/contract.py`` only
  (user-facing DOCUMENTATION, EXAMPLES and RETURN may name them);
- nothing outside the compiler and the policy model reads the compiler's internals;
- no Python file under ``plugins/`` reaches 400 lines.
"""

import ast

import pytest
from support.paths import ROOT

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends import contract

PLUGINS = ROOT / "plugins"
CORE = PLUGINS / "module_utils" / "core"
CONTRACT = CORE / "backends" / "contract.py"
IO_MODULES = {"subprocess", "socket", "shutil", "tempfile", "fcntl", "select", "selectors", "pathlib", "glob"}
# socket's address conversions are pure functions (the fastest text <-> number for addresses)
PURE_SOCKET = {"inet_aton", "inet_ntoa", "inet_pton", "inet_ntop", "AF_INET", "AF_INET6"}
IO_CALLS = {"open", "system", "popen", "listdir", "scandir", "unlink", "remove", "kill", "makedirs", "mkdir"}
DOC_NAMES = {"DOCUMENTATION", "EXAMPLES", "RETURN"}
COMPILER_INTERNALS = {"_builder", "_Compiler"}
MAX_LINES = 400


def sources(folder=PLUGINS):
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def relative(path) -> str:
    return str(path.relative_to(ROOT))


def contract_names() -> set[str]:
    """The names the contract defines that a payload or a path carries (not the bare words like 'in')."""
    names = {contract.NFT_TABLE_REF, contract.STATE_DIR, contract.PERSIST_DIR, contract.UNIT_PATH,
             contract.LOADER_PATH, *contract.IPT_CHAINS.values(), *contract.SET_KEYS}
    return {name for name in names if len(name) > 4}


def code_strings(tree):
    """String constants of a module, less the user-facing documentation blocks."""
    skipped = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in DOC_NAMES for t in node.targets):
            skipped.update(id(sub) for sub in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            yield node


@pytest.mark.parametrize("path", sources(CORE), ids=relative)
def test_the_core_does_no_io(path):
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in IO_MODULES - {"socket"}]
        elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "socket" \
                and node.attr not in PURE_SOCKET:
            found.append(f"socket.{node.attr} at line {node.lineno}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in IO_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in IO_CALLS:
                found.append(f"{name}() at line {node.lineno}")
    assert not found, f"{relative(path)} does I/O: {found}"


@pytest.mark.parametrize("path", [p for p in sources() if p != CONTRACT], ids=relative)
def test_backend_names_are_spelled_in_the_contract_only(path):
    names = contract_names()
    spelled = [(node.lineno, name) for node in code_strings(ast.parse(path.read_text()))
               for name in names if name in node.value]
    assert not spelled, f"{relative(path)} spells contract names itself (use core/backends/contract.py): {spelled}"


@pytest.mark.parametrize("path", sources(), ids=relative)
def test_nothing_outside_the_compiler_reads_its_internals(path):
    if path.parent == CORE / "catalog" or path == CORE / "policy.py":
        return
    tree = ast.parse(path.read_text())
    used = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in COMPILER_INTERNALS
            or isinstance(node, ast.Name) and node.id in COMPILER_INTERNALS]
    assert not used, f"{relative(path)} reads the compiler's internals at lines {used}"


@pytest.mark.parametrize("path", sources(), ids=relative)
def test_every_plugin_file_stays_under_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines < MAX_LINES, f"{relative(path)} has {lines} lines: split it by what its parts do"


def test_the_checks_see_what_they_check():
    """The rules above are not vacuous: the contract's names are found where they are written."""
    assert {"PORTGUARD-IN", "portguard-in4", "inet portguard", "/run/portguard"} <= contract_names()
    spelled = {node.value for node in code_strings(ast.parse(CONTRACT.read_text()))}
    assert "PORTGUARD-IN" in spelled and "/etc/portguard" in spelled
    assert len(sources(CORE)) >= 15 and len(sources()) >= 40
