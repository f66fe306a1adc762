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
to expire; ``report/render.py`` shows it as text and HTML.
"""

import datetime
import ipaddress

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    DENIED_COUNTERS,
    IPT_CHAIN_DIRECTIONS,
    NFT_SET_KEYS,
    nft_set_name,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog import findings as catalog_findings
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import FAMILY_NAMES

# The floor and the controller's own connection are kept whatever they carry: never removal candidates.
KEPT_FLOWS = ("management", "controller")
SKIP_GROUPS = ("all", "ungrouped")
STATE_VERSION = 1


def iso(stamp):
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(float(stamp), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- names of sources
class SourceNamer:
    """Map an address back to catalog names: inventory hosts, their segments (groups), networks."""

    def __init__(self, policy):
        self.hosts = {}
        for host, settings in policy.hosts.items():
            for address in settings.addresses:
                self.hosts.setdefault(str(ipaddress.ip_address(address)), []).append(host)
        self.groups = {name: set(members) for name, members in policy.groups.items() if name not in SKIP_GROUPS}
        self.networks = policy.networks
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
            key = (nft_set_name(direction, entry.family, entry.proto), entry.address_text(), entry.port_text())
            index[key] = (direction, entry)
    return index


def _label_index(host_policy):
    index = {}
    for pool in (host_policy.ingress, host_policy.egress):
        for entry in pool:
            for label in entry.labels:
                index[label.text()] = label
    return index


def _counted_where(name):
    """Direction, family and protocol of a counted element's ``set``: an nftables set, or ``<chain>/<family>``."""
    if name in NFT_SET_KEYS:
        direction, family, proto = NFT_SET_KEYS[name]
        return direction, FAMILY_NAMES[family], proto
    chain, _sep, family = name.partition("/")
    return IPT_CHAIN_DIRECTIONS.get(chain, "in"), family, ""


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
            direction, family, proto = _counted_where(element["set"])
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
_EMPTY_LOG = {"source": "none", "readable": False, "reason": "not read", "groups": []}
_COUNTERS = (*DENIED_COUNTERS, "logged_in", "logged_out")  # as the counter readers name them


def _delta(current, previous, reset):
    if current is None:
        return None
    if previous is None or reset:
        return current
    return current - previous


def _counter_reset(previous, current_values, rows, replaced, now):
    """When the counters restarted since the previous report: the ruleset was replaced, or a counter went down."""
    if previous is None:
        return None
    prev_counters = previous.get("counters", {})
    prev_elements = prev_counters.get("elements", {})
    replaced_at = (replaced or {}).get("at")
    went_down = [name for name, value in current_values.items()
                 if value is not None and prev_counters.get(name) is not None and value < prev_counters[name]]
    went_down += [row["key"] for row in rows if row["packets"] < prev_elements.get(row["key"], 0)]
    if replaced_at and replaced_at != previous.get("replaced_at"):
        return {"at": replaced_at, "when": iso(replaced_at), "event": replaced.get("event", "applied")}
    if went_down:
        return {"at": None, "when": f"between {iso(previous.get('at'))} and {iso(now)}", "event": "unknown"}
    return None


def _flow_hits(rows, previous, reset):
    """Hits per flow/service, accumulated over the observed window (counter resets included)."""
    prev_elements = (previous or {}).get("counters", {}).get("elements", {})
    cumulative = dict((previous or {}).get("flow_hits", {}))
    seen_labels = {}
    for row in rows:
        row["new"] = _delta(row["packets"], prev_elements.get(row["key"]), reset)
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
    return flows, cumulative


def _denied_groups(log, previous):
    """Denied attempts from the log lines: the cumulative groups, and what this run read, per group key."""
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
    return groups, new_groups


def _denied_rows(groups, new_groups, namer):
    """One row per source, port and protocol (destinations of the host merged), most denied first."""
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
    return denied


def _unusual_sources(denied, threshold):
    per_source = {}
    for row in denied:
        item = per_source.setdefault(row["src"], {"src": row["src"], "names": row["names"], "name_text": row["name_text"],
                                                  "count": 0, "new": 0, "ports": []})
        item["count"] += row["count"]
        item["new"] += row["new"]
        item["ports"].append(f"{row['port']}/{row['proto']}")
    return [dict(item, flagged_on="new" if item["new"] >= threshold else "total")
            for item in per_source.values() if item["count"] >= threshold]


def _log_note(log, logged_new, new_groups):
    """Why the log lines may not tell the whole story, or None."""
    note = None
    if not log.get("readable"):
        note = f"counters only: {log.get('reason', 'the kernel log is not readable')}"
    elif log.get("lost"):
        note = "some log lines were overwritten in the kernel buffer before this report read them"
    if log.get("readable") and logged_new and not new_groups:
        note = (f"the log rule counted {logged_new} new line(s) but none reached the kernel log: "
                "a network namespace other than the machine's logs only with net.netfilter.nf_log_all_netns=1")
    return note


def host_report(host: str, host_policy, activity: dict, previous, namer: SourceNamer, *,
                threshold: int) -> tuple[dict, dict]:
    """The report of one host and the state the next report starts from."""
    counters = activity.get("counters") or {}
    log = activity.get("log") or _EMPTY_LOG
    now = activity.get("now")
    replaced = activity.get("replaced")
    previous = previous if previous and previous.get("version") == STATE_VERSION else None
    prev_counters = (previous or {}).get("counters", {})

    rows = allowed_entries(host_policy, counters)
    current_values = {name: counters.get(name) for name in _COUNTERS}
    reset = _counter_reset(previous, current_values, rows, replaced, now)
    deny = {name: {"total": value, "new": _delta(value, prev_counters.get(name), reset is not None)}
            for name, value in current_values.items()}
    flows, cumulative = _flow_hits(rows, previous, reset is not None)
    groups, new_groups = _denied_groups(log, previous)
    denied = _denied_rows(groups, new_groups, namer)
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
        "log_note": _log_note(log, deny["logged_in"]["new"], new_groups),
        "deny_counters": deny,
        "allowed": [{k: v for k, v in row.items() if k != "key"} for row in rows],
        "flows": flows,
        "unused": [f for f in flows if f["hits"] == 0 and f["flow"] not in KEPT_FLOWS],
        "denied": denied,
        "denied_new": [row for row in denied if row["new"]],
        "unusual": _unusual_sources(denied, threshold),
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
    return catalog_findings.expiring_flows(policy.flows, today, days)


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
