"""A missing requirement skips a test locally and fails it in CI, where it must not pass unnoticed."""

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(message: str) -> None:
    if IN_CI:
        pytest.fail(f"{message} (CI=true: missing requirements fail)")
    pytest.skip(message)


def need(condition, what: str) -> None:
    """Skip locally, fail in CI, unless ``condition`` holds; ``what`` names what is missing."""
    if not condition:
        skip_or_fail(f"missing: {what}")


def require(*tools: str, root: bool = True) -> None:
    """Skip locally, fail in CI, when root (unless ``root=False``) or one of the commands is missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if root and os.geteuid() != 0:
        missing.insert(0, "root")
    if missing:
        skip_or_fail(f"missing: {', '.join(missing)}")
