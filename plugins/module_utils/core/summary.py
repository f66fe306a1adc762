"""Readable summaries of a compiled policy: one row per host, a plain-text table."""

from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import FAMILY_NAMES
from ansible_collections.portguard.hardening.plugins.module_utils.core.printable import printable


def host_row(policy, host: str) -> dict:
    compiled = policy.host(host)
    settings = compiled.settings
    counts = {}
    for entry in compiled.ingress:
        key = f"{FAMILY_NAMES[entry.family]}/{entry.proto}"
        counts[key] = counts.get(key, 0) + 1
    flows = sorted({label.flow for entry in compiled.ingress for label in entry.labels})
    return {
        "host": host,
        "backend": settings.backend,
        "mode": settings.mode,
        "deny": settings.deny,
        "egress": settings.egress,
        "addresses": list(settings.addresses),
        "ingress_entries": len(compiled.ingress),
        "egress_entries": len(compiled.egress),
        "entries_by_family": counts,
        "flows": flows,
    }


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A fixed-width text table; ``columns`` are ``(key, heading)`` pairs."""
    cells = [[heading for _unused, heading in columns]]
    for row in rows:
        cells.append([_cell(row.get(key)) for key, _unused in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(value.ljust(widths[i]) for i, value in enumerate(line)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    """A table cell; host names and addresses come from inventories: what does not print is escaped."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return printable(", ".join(str(v) for v in value)) or "-"
    return printable(value)


SUMMARY_COLUMNS = [
    ("host", "host"),
    ("addresses", "addresses"),
    ("mode", "mode"),
    ("deny", "deny"),
    ("egress", "egress"),
    ("ingress_entries", "in"),
    ("egress_entries", "out"),
    ("flows", "flows let in"),
]


def policy_summary(policy, hosts) -> str:
    rows = [host_row(policy, host) for host in sorted(hosts)]
    text = format_table(rows, SUMMARY_COLUMNS)
    notes = [printable(f"{f.level}: {f.path}: {f.message}") for f in policy.findings]
    return text + ("\n\n" + "\n".join(notes) if notes else "")
