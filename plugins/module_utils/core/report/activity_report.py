"""The port activity report: counters and deny log lines joined to the catalog.

Controller side, pure (no Ansible, no I/O). ``host_report`` takes one host's
``port_activity`` result, its compiled ``HostPolicy`` and the state the
previous report left, and returns the host's report and the next state:

- allowed traffic per whitelist entry and per flow (element counters matched
  back to the policy's entries, so every hit has its flow, service and owner);
- denied attempts grouped by source, destination port and protocol, with
  count and first/last seen, sources named after the catalog (hosts,
  segments, networks), from the log lines; the deny counters in any case;
- what is new since the last report (counter deltas, log lines after the
  saved cursor), and when the counters were reset in between;
- sources at or above the unusual threshold.

``summarize`` joins the host reports: unused allow entries per owner (zero
hits on every host over the observed window), expired flows and flows about
to expire; ``render_text`` and ``render_html`` show it. Names, purposes, owners
and log details come from catalogs, inventories and hosts: both show what does
not print as escapes (``printable``), and the page escapes markup on top.
"""

import datetime
import hashlib
import html
import ipaddress
import string

from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import FAMILY_NAMES
from ansible_collections.portguard.hardening.plugins.module_utils.core.printable import printable

# The floor and the controller's own connection are kept whatever they carry: never removal candidates.
KEPT_FLOWS = ("management", "controller")
SKIP_GROUPS = ("all", "ungrouped")
STATE_VERSION = 1


# ---------------------------------------------------------------- file names
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


def iso(stamp):
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(float(stamp), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- names of sources
class SourceNamer:
    """Map an address back to catalog names: inventory hosts, their segments (groups), networks."""

    def __init__(self, policy):
        builder = policy._builder
        self.hosts = {}
        for host, settings in policy.hosts.items():
            for address in settings.addresses:
                self.hosts.setdefault(str(ipaddress.ip_address(address)), []).append(host)
        self.groups = {name: set(members) for name, members in builder.groups.items() if name not in SKIP_GROUPS}
        self.networks = builder.networks
        self._memo = {}

    def names(self, address: str) -> dict:
        if address in self._memo:
            return self._memo[address]
        parsed = ipaddress.ip_address(address)
        value, family = int(parsed), parsed.version
        hosts = sorted(self.hosts.get(str(parsed), []))
        segments = sorted(group for group, members in self.groups.items() if members & set(hosts))
        networks = sorted(name for name, ranges in self.networks.items()
                          if any(lo <= value <= hi for lo, hi in ranges.get(family, ())))
        found = {"hosts": hosts, "segments": segments, "networks": networks}
        self._memo[address] = found
        return found


def name_text(names: dict) -> str:
    parts = []
    if names.get("hosts"):
        parts.append("host " + ",".join(names["hosts"]))
    if names.get("segments"):
        parts.append("segment " + ",".join(names["segments"]))
    if names.get("networks"):
        parts.append("network " + ",".join(names["networks"]))
    return "; ".join(parts) or "unknown"


# ---------------------------------------------------------------- counters -> entries
def _entry_index(host_policy):
    """``(set, addresses, ports)`` as nft lists an element -> (direction, entry)."""
    index = {}
    for direction, pool in (("in", host_policy.ingress), ("out", host_policy.egress)):
        for entry in pool:
            key = (f"{direction}{entry.family}_{entry.proto}", entry.address_text(), entry.port_text())
            index[key] = (direction, entry)
    return index


def _label_index(host_policy):
    index = {}
    for pool in (host_policy.ingress, host_policy.egress):
        for entry in pool:
            for label in entry.labels:
                index[label.text()] = label
    return index


def allowed_entries(host_policy, counters: dict) -> list[dict]:
    """One row per counted whitelist element with its hits and the catalog labels that put it there."""
    by_key = _entry_index(host_policy)
    by_text = _label_index(host_policy)
    rows = []
    for element in counters.get("elements", []):
        found = by_key.get((element["set"], element["addresses"], str(element["ports"])))
        if found:
            direction, entry = found
            labels = entry.labels
            family, proto = FAMILY_NAMES[entry.family], entry.proto
        else:  # iptables rules (one per source and port chunk), or a live table that drifted: go by the comment
            labels = tuple(by_text[text] for text in element.get("comment", "").split("; ") if text in by_text)
            direction = "out" if "OUT" in element["set"] or element["set"].startswith("out") else "in"
            family = "ipv6" if "6" in element["set"].split("/")[-1] else "ipv4"
            proto = element["set"].rsplit("_", 1)[-1] if "_" in element["set"] else ""
        rows.append({
            "key": f"{element['set']}|{element['addresses']}|{element['ports']}",
            "direction": direction,
            "family": family,
            "proto": proto,
            "addresses": element["addresses"] if found else element.get("addresses", ""),
            "ports": str(element["ports"]) if found else "",
            "packets": int(element.get("packets") or 0),
            "labels": [{"flow": lab.flow, "service": lab.service, "owner": lab.owner, "purpose": lab.purpose}
                       for lab in labels],
        })
    return rows


# ---------------------------------------------------------------- one host
def _delta(current, previous, reset):
    if current is None:
        return None
    if previous is None or reset:
        return current
    return current - previous


def host_report(host: str, host_policy, activity: dict, previous, namer: SourceNamer, *,
                threshold: int) -> tuple[dict, dict]:
    """The report of one host and the state the next report starts from."""
    counters = activity.get("counters") or {}
    log = activity.get("log") or {"source": "none", "readable": False, "reason": "not read", "groups": []}
    now = activity.get("now")
    replaced = activity.get("replaced")
    previous = previous if previous and previous.get("version") == STATE_VERSION else None
    prev_counters = (previous or {}).get("counters", {})
    prev_elements = prev_counters.get("elements", {})

    rows = allowed_entries(host_policy, counters)
    current_values = {name: counters.get(name) for name in ("denied_in", "denied_out", "logged_in", "logged_out")}
    reset = None
    if previous is not None:
        replaced_at = (replaced or {}).get("at")
        went_down = [name for name, value in current_values.items()
                     if value is not None and prev_counters.get(name) is not None and value < prev_counters[name]]
        went_down += [row["key"] for row in rows if row["packets"] < prev_elements.get(row["key"], 0)]
        if replaced_at and replaced_at != previous.get("replaced_at"):
            reset = {"at": replaced_at, "when": iso(replaced_at), "event": replaced.get("event", "applied")}
        elif went_down:
            reset = {"at": None, "when": f"between {iso(previous.get('at'))} and {iso(now)}", "event": "unknown"}
    reset_flag = reset is not None

    deny = {}
    for name, value in current_values.items():
        deny[name] = {"total": value, "new": _delta(value, prev_counters.get(name), reset_flag)}

    # Hits per flow/service, accumulated over the observed window (counter resets included).
    cumulative = dict((previous or {}).get("flow_hits", {}))
    seen_labels = {}
    for row in rows:
        row["new"] = _delta(row["packets"], prev_elements.get(row["key"]), reset_flag)
        for label in row["labels"]:
            text = f"{label['flow']}/{label['service']}"
            seen_labels.setdefault(text, dict(label, hits=0, new=0, entries=0))
            seen_labels[text]["new"] += row["new"]
            seen_labels[text]["entries"] += 1
    flows = []
    for text, item in sorted(seen_labels.items()):
        total = cumulative.get(text, 0) + item["new"]
        cumulative[text] = total
        flows.append(dict(item, label=text, hits=total))
    unused = [f for f in flows if f["hits"] == 0 and f["flow"] not in KEPT_FLOWS]

    # Denied attempts from the log lines: cumulative groups, plus what this run read.
    groups = {g["key"]: dict(g) for g in (previous or {}).get("denied", [])}
    new_groups = []
    for group in log.get("groups", []):
        key = f"{group['direction']}|{group['src']}|{group['proto']}|{group['port']}"
        new_groups.append(dict(group, key=key))
        if key in groups:
            old = groups[key]
            old["count"] += group["count"]
            old["first"] = min(old["first"], group["first"])
            old["last"] = max(old["last"], group["last"])
            old["dsts"] = sorted(set(old.get("dsts", [])) | {group["dst"]})
        else:
            groups[key] = {"key": key, "direction": group["direction"], "src": group["src"], "proto": group["proto"],
                           "port": group["port"], "count": group["count"], "first": group["first"],
                           "last": group["last"], "dsts": [group["dst"]]}
    # One row per source, port and protocol (destinations of the host merged).
    merged_new = {}
    for group in new_groups:
        item = merged_new.setdefault(group["key"], {"count": 0, "first": group["first"], "last": group["last"]})
        item["count"] += group["count"]
        item["first"] = min(item["first"], group["first"])
        item["last"] = max(item["last"], group["last"])
    denied = []
    for key, group in sorted(groups.items(), key=lambda kv: (-kv[1]["count"], kv[0])):
        names = namer.names(group["src"])
        denied.append(dict(group, names=names, name_text=name_text(names), new=merged_new.get(key, {}).get("count", 0),
                           first_seen=iso(group["first"]), last_seen=iso(group["last"])))
    per_source = {}
    for row in denied:
        item = per_source.setdefault(row["src"], {"src": row["src"], "names": row["names"], "name_text": row["name_text"],
                                                  "count": 0, "new": 0, "ports": []})
        item["count"] += row["count"]
        item["new"] += row["new"]
        item["ports"].append(f"{row['port']}/{row['proto']}")
    unusual = [dict(item, flagged_on="new" if item["new"] >= threshold else "total")
               for item in per_source.values() if item["count"] >= threshold]

    log_note = None
    if not log.get("readable"):
        log_note = f"counters only: {log.get('reason', 'the kernel log is not readable')}"
    elif log.get("lost"):
        log_note = "some log lines were overwritten in the kernel buffer before this report read them"
    logged_new = deny["logged_in"]["new"]
    if log.get("readable") and logged_new and not new_groups:
        log_note = (f"the log rule counted {logged_new} new line(s) but none reached the kernel log: "
                    "a network namespace other than the machine's logs only with net.netfilter.nf_log_all_netns=1")

    window_start = (previous or {}).get("window_start") or (replaced or {}).get("at") or now
    report = {
        "host": host,
        "backend": counters.get("backend"),
        "now": iso(now),
        "previous_report": iso((previous or {}).get("at")),
        "first_report": previous is None,
        "counters_since": iso((replaced or {}).get("at")),
        "counters_since_event": (replaced or {}).get("event"),
        "window_start": iso(window_start),
        "reset": reset,
        "log": {key: log.get(key) for key in ("source", "readable", "reason", "lines", "lost")},
        "log_note": log_note,
        "deny_counters": deny,
        "allowed": [{k: v for k, v in row.items() if k != "key"} for row in rows],
        "flows": flows,
        "unused": unused,
        "denied": denied,
        "denied_new": [row for row in denied if row["new"]],
        "unusual": unusual,
        "threshold": threshold,
    }
    state = {
        "version": STATE_VERSION,
        "at": now,
        "boot_id": activity.get("boot_id"),
        "window_start": window_start,
        "replaced_at": (replaced or {}).get("at"),
        "cursor": log.get("cursor"),
        "counters": {**current_values, "elements": {row["key"]: row["packets"] for row in rows}},
        "flow_hits": cumulative,
        "denied": [{k: g[k] for k in ("key", "direction", "src", "proto", "port", "count", "first", "last", "dsts")}
                   for g in groups.values()],
    }
    return report, state


# ---------------------------------------------------------------- all hosts
def expiring_flows(policy, today: datetime.date, days: int) -> list[dict]:
    """Flows that are still rendered and expire within ``days`` days (UTC)."""
    soon = []
    for flow in policy._builder.flows:
        if flow.expires is None:
            continue
        left = (flow.expires - today).days
        if 0 <= left <= days:
            soon.append({"name": flow.name, "path": flow.path, "expires": flow.expires.isoformat(), "days_left": left,
                         "owners": sorted({s.owner for s in flow.services if s.owner})})
    return sorted(soon, key=lambda f: (f["expires"], f["name"]))


def summarize(reports: list[dict], expired: list[dict], expiring: list[dict]) -> dict:
    """Join host reports: removal candidates per owner (unused on every host that renders them), gates."""
    rendered_on: dict[str, set] = {}
    used_on: dict[str, set] = {}
    meta = {}
    for report in reports:
        for flow in report["flows"]:
            rendered_on.setdefault(flow["label"], set()).add(report["host"])
            meta[flow["label"]] = flow
            if flow["hits"]:
                used_on.setdefault(flow["label"], set()).add(report["host"])
    unused_by_owner: dict[str, list] = {}
    for label, hosts in sorted(rendered_on.items()):
        flow = meta[label]
        if flow["flow"] in KEPT_FLOWS or used_on.get(label):
            continue
        unused_by_owner.setdefault(flow["owner"] or "(no owner)", []).append(
            {"flow": flow["flow"], "service": flow["service"], "purpose": flow["purpose"], "hosts": sorted(hosts)})
    unusual = [dict(item, host=report["host"]) for report in reports for item in report["unusual"]]
    return {
        "hosts": {report["host"]: report for report in reports},
        "unused_by_owner": unused_by_owner,
        "expired": expired,
        "expiring": expiring,
        "unusual": unusual,
    }


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
