"""Report files on the controller: where they go, what each host's file is called, how they are written.

Shared by the port_audit and port_report actions and the report_file_name filter (playbooks/render.yml).
"""

import hashlib
import os
import string
import tempfile

DEFAULT_REPORT_DIR = "portguard-reports"
_KEPT_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
# Names the summary writes next to the per-host files (report/report.json).
_RESERVED_NAMES = ("report",)
_NAME_LIMIT = 120


def _quote(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


def report_file_name(host: str) -> str:
    """The file name (without extension) of a host's reports: one path component, distinct per host.

    Letters, digits, ``.``, ``_`` and ``-`` stay; every other character is ``%XX`` per UTF-8 byte
    (``web/1`` is ``web%2F1``, ``web:1`` is ``web%3A1``, ``%`` itself ``%25``), and so is a leading dot or
    dash (never ``..``, a hidden file or an option) and the first letter of a name the summary uses itself.
    ``urllib.parse.unquote`` gives the host back. A name longer than 120 characters is cut and ends with
    ``~`` and a hash of the whole name: ``~`` appears in no other name.
    """
    encoded = "".join(char if char in _KEPT_CHARS else _quote(char) for char in host)
    if encoded[:1] in (".", "-") or encoded in _RESERVED_NAMES:
        encoded = _quote(encoded[0]) + encoded[1:]
    if encoded and len(encoded) <= _NAME_LIMIT:
        return encoded
    cut = encoded[:_NAME_LIMIT - 17]
    if "%" in cut[-2:]:  # never half an escape
        cut = cut[:cut.rindex("%")]
    return f"{cut}~{hashlib.sha256(host.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def report_root(report_dir, task_vars) -> str:
    """The absolute report directory: the task's ``report_dir``, else ``portguard_report_dir``, else the default."""
    chosen = report_dir or task_vars.get("portguard_report_dir") or DEFAULT_REPORT_DIR
    return os.path.abspath(os.path.expanduser(str(chosen)))


def write_report(path: str, text: str):
    """Replace ``path`` atomically, so a CI job never reads half a report."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".portguard-report.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
