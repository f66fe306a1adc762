"""The developer docs stay true to the tree: every file or folder they name exists.

A name is a code span (in backticks) that holds a path: it has a ``/`` or ends in a file extension. Paths are
relative to the repository root; ``a/{b,c}.py`` stands for ``a/b.py`` and ``a/c.py``; a bare file name must
exist somewhere in the tree. Spans with spaces, ``<placeholders>``, ``*`` or ``$`` are commands or patterns,
not names.
"""

import re

import pytest
from support.paths import ROOT

DOCS = ["docs/architecture.md", "docs/development.md"]
SPAN = re.compile(r"`([^`\n]+)`")
PATHLIKE = re.compile(r"^[\w.{},/-]+$")
EXTENSION = re.compile(r"\.(py|md|yml|yaml|toml|cfg|sh|txt|json|j2|ini)$")
SKIPPED_DIRS = {".git", ".venv", ".build", "__pycache__", ".hypothesis"}


def expand(span: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", span)
    if not match:
        return [span]
    return [found for part in match.group(1).split(",")
            for found in expand(span[:match.start()] + part + span[match.end():])]


def named_paths(text: str) -> list[str]:
    names = []
    for span in SPAN.findall(text):
        if not PATHLIKE.match(span) or span.startswith(("-", ".")) and "/" not in span:
            continue
        if "/" in span or EXTENSION.search(span):
            names += expand(span.rstrip("/"))
    return names


def exists(name: str) -> bool:
    if "/" in name:
        return (ROOT / name).exists()
    return any(not SKIPPED_DIRS & set(path.relative_to(ROOT).parts) for path in ROOT.rglob(name))


def test_spans_are_read_as_paths():
    text = "`plugins/module_utils/core/` `a/{b,c}.py` `compile_catalog` `x.py` `bash scripts/test.sh` `<host>.json`"
    assert named_paths(text) == ["plugins/module_utils/core", "a/b.py", "a/c.py", "x.py"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_developer_doc_names_exists(doc):
    path = ROOT / doc
    assert path.exists(), f"{doc} is missing"
    missing = [name for name in named_paths(path.read_text(encoding="utf-8")) if not exists(name)]
    assert not missing, f"{doc} names paths that do not exist: {missing}"
