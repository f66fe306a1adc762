"""The port activity report as text and as an HTML page (or a section of the verify page).

Pure: ``summary`` is what ``activity_report.summarize`` returns. Names, purposes, owners and log
details come from catalogs, inventories and hosts: both forms show what does not print as escapes
(``printable``), and the page escapes markup on top.
"""

import html

from ansible_collections.portguard.hardening.plugins.module_utils.core.printable import printable


def _table(header, rows) -> list[str]:
    table = [[printable(value) for value in row] for row in [header, *rows]]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return ["    " + "  ".join(str(v).ljust(widths[i]) for i, v in enumerate(row)).rstrip() for row in table]


def render_text(summary: dict) -> str:
    out = []
    for host, report in sorted(summary["hosts"].items()):
        since = report["counters_since"] or "unknown"
        out.append(f"{host} ({report['backend']}; counters since {since}"
                   f"{' (' + report['counters_since_event'] + ')' if report['counters_since_event'] else ''}; "
                   f"log: {report['log']['source']})")
        if report["first_report"]:
            out.append("  first report: everything counts as new")
        else:
            out.append(f"  new since the last report ({report['previous_report']})")
        if report["reset"]:
            out.append(f"  counters were reset {report['reset']['when']} ({report['reset']['event']}): "
                       "new = everything since the reset")
        if report["log_note"]:
            out.append(f"  note: {report['log_note']}")
        deny = report["deny_counters"]
        parts = [f"{name} {value['total']} (+{value['new']})" for name, value in deny.items()
                 if value["total"] is not None]
        out.append("  counters: " + (", ".join(parts) or "none (no portguard table)"))
        if report["denied"]:
            out.append("  denied attempts (logged lines; the log is rate-limited, the counters are exact):")
            out += _table(["source", "names", "port", "new", "total", "first seen", "last seen"],
                          [[row["src"], row["name_text"], f"{row['port']}/{row['proto']}", row["new"], row["count"],
                            row["first_seen"], row["last_seen"]] for row in report["denied"]])
        for item in report["unusual"]:
            out.append(f"  UNUSUAL: {item['src']} ({item['name_text']}) {item['count']} denied "
                       f"(+{item['new']}) >= {report['threshold']}")
        if report["flows"]:
            out.append("  allowed per flow (hits over the observed window, new since the last report):")
            out += _table(["flow/service", "owner", "hits", "new"],
                          [[flow["label"], flow["owner"] or "-", flow["hits"], flow["new"]] for flow in report["flows"]])
        out.append("")
    if summary["unused_by_owner"]:
        out.append("unused allow entries (zero hits on every host; candidates to remove), per owner:")
        for owner, items in sorted(summary["unused_by_owner"].items()):
            out.append(f"  {owner}: " + ", ".join(f"{i['flow']}/{i['service']} on {','.join(i['hosts'])}"
                                                  for i in items))
    for flow in summary["expired"]:
        out.append(f"EXPIRED flow {flow['name']} ({flow['path']}) on {flow['expires']}, owners "
                   f"{', '.join(flow['owners']) or '-'}: no longer rendered; remove it from the catalog")
    for flow in summary["expiring"]:
        out.append(f"expiring flow {flow['name']} on {flow['expires']} ({flow['days_left']} day(s) left), owners "
                   f"{', '.join(flow['owners']) or '-'}")
    return "\n".join(printable(line) for line in out).rstrip() + "\n"


def _html(value) -> str:
    return html.escape(printable(value))


def _html_table(header, rows, css="") -> str:
    head = "".join(f"<th>{_html(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_html(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table class='{css}'><tr>{head}</tr>{body}</table>"


def render_html_section(summary: dict) -> str:
    """The activity section: appended to the verify page, and the body of the report page."""
    parts = ["<section id='portguard-activity'><h1>Port activity</h1>"]
    if summary["expired"]:
        parts.append("<h2>Expired flows</h2>" + _html_table(
            ["flow", "path", "expired", "owners"],
            [[f["name"], f["path"], f["expires"], ", ".join(f["owners"])] for f in summary["expired"]], "bad"))
    if summary["expiring"]:
        parts.append("<h2>Flows expiring soon</h2>" + _html_table(
            ["flow", "expires", "days left", "owners"],
            [[f["name"], f["expires"], f["days_left"], ", ".join(f["owners"])] for f in summary["expiring"]]))
    if summary["unused_by_owner"]:
        parts.append("<h2>Unused allow entries (candidates to remove)</h2>" + _html_table(
            ["owner", "flow/service", "purpose", "hosts"],
            [[owner, f"{i['flow']}/{i['service']}", i["purpose"], ", ".join(i["hosts"])]
             for owner, items in sorted(summary["unused_by_owner"].items()) for i in items]))
    for host, report in sorted(summary["hosts"].items()):
        parts.append(f"<h2>{_html(host)}</h2><p>counters since {_html(report['counters_since'])}; "
                     f"log: {_html(report['log']['source'])}"
                     + (f"; {_html(report['log_note'])}" if report["log_note"] else "")
                     + (f"; counters reset {_html(report['reset']['when'])}" if report["reset"] else "")
                     + "</p>")
        deny = report["deny_counters"]
        parts.append(_html_table(["counter", "total", "new"],
                                 [[name, v["total"], v["new"]] for name, v in deny.items() if v["total"] is not None]))
        if report["denied"]:
            parts.append("<h3>Denied attempts</h3>" + _html_table(
                ["source", "names", "port", "new", "total", "first seen", "last seen"],
                [[r["src"], r["name_text"], f"{r['port']}/{r['proto']}", r["new"], r["count"], r["first_seen"],
                  r["last_seen"]] for r in report["denied"]]))
        if report["unusual"]:
            parts.append("<p class='bad'>Unusual sources: " + _html(
                ", ".join(f"{u['src']} ({u['name_text']}) {u['count']}" for u in report["unusual"])) + "</p>")
        if report["flows"]:
            parts.append("<h3>Allowed per flow</h3>" + _html_table(
                ["flow/service", "owner", "purpose", "hits", "new"],
                [[f["label"], f["owner"], f["purpose"], f["hits"], f["new"]] for f in report["flows"]]))
    parts.append("</section>")
    return "\n".join(parts)


MARK_START = "<!-- portguard-activity:start -->"
MARK_END = "<!-- portguard-activity:end -->"


def render_html(summary: dict, title: str = "portguard port activity") -> str:
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{_html(title)}</title><style>body{{font-family:sans-serif;margin:1.5em}}"
            "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 6px;"
            "font-size:13px}.bad{background:#f4a6a6}</style></head><body>\n"
            f"{MARK_START}\n{render_html_section(summary)}\n{MARK_END}\n</body></html>\n")


def extend_page(page: str, summary: dict) -> str:
    """The verify page with the activity section in it (replacing the one a previous report put there)."""
    section = f"{MARK_START}\n{render_html_section(summary)}\n{MARK_END}\n"
    start, end = page.find(MARK_START), page.find(MARK_END)
    if start >= 0 and end > start:
        return page[:start] + section + page[end + len(MARK_END) + 1:]
    at = page.rfind("</body>")
    if at < 0:
        return page + section
    return page[:at] + section + page[at:]
