"""Classify a host's listening sockets against its compiled catalog.

``audit_listeners(host_policy, listeners)`` is pure: it takes the host's
``HostPolicy`` and the listeners ``port_facts`` gathered, and sorts every
socket into one of three states:

- **approved**: reachable from outside the host, and some ingress entry of the
  host (a flow or the management floor) lets its port and protocol in;
- **unapproved**: reachable from outside, and nothing in the catalog lets it in;
- **loopback**: bound to a loopback address (or to the ``lo`` device); never a
  violation, whatever the catalog says.

Approved listeners bound to every address while the catalog lets in only some
sources are also listed as **overexposed** (informational: the firewall narrows
them, the socket does not). Cataloged services that nothing reachable listens
on are listed as **not_listening**.

The catalog says which ports a host lets in, not on which of its addresses, so a
socket bound to a specific address counts as reachable whether or not that
address is one of ``portguard_addresses``: a bridge or VPN address is reachable
from somewhere too.

Renderers (JSON, JUnit XML, the failure table) are deterministic: the same
audit renders to the same bytes. Process names and command lines are chosen by
whoever runs the process: the table and the JUnit file show every character
that does not print as an escape (``printable``); JSON escapes them itself.
"""

import ipaddress
import json
import xml.etree.ElementTree as ET

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import merge_intervals
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import FAMILY_NAMES
from ansible_collections.portguard.hardening.plugins.module_utils.core.printable import printable

CONTROLLER_FLOW = "controller"  # catalog.CONTROLLER_FLOW: the Ansible connection, not a cataloged service
FAIL_ON = ("unapproved", "overexposed", "not_listening")
LISTS = ("approved", "unapproved", "overexposed", "loopback", "not_listening")
_FULL = {4: (0, 2**32 - 1), 6: (0, 2**128 - 1)}
_FAMILY_NUMBER = {"ipv4": 4, "ipv6": 6}
_WHY = {
    "unapproved": "unapproved",
    "overexposed": "overexposed",
    "not_listening": "not listening",
}


class AuditError(PortguardError):
    """A listener record that cannot be audited (missing or malformed field)."""


def _field(listener, key, index):
    if key not in listener or listener[key] is None:
        raise AuditError(f"listeners[{index}].{key}: missing")
    return listener[key]


def _normalize(listener, index):
    """The fields the audit needs, checked, from one ``port_facts`` record."""
    if not isinstance(listener, dict):
        raise AuditError(f"listeners[{index}]: expected a mapping, got {type(listener).__name__}")
    proto = str(_field(listener, "protocol", index)).lower()
    if proto not in ("tcp", "udp"):
        raise AuditError(f"listeners[{index}].protocol: expected tcp or udp, got {proto!r}")
    raw_address = str(_field(listener, "address", index))
    try:
        address = ipaddress.ip_address(raw_address.split("%", maxsplit=1)[0])
    except ValueError as exc:
        raise AuditError(f"listeners[{index}].address: {exc}") from exc
    try:
        port = int(_field(listener, "port", index))
    except (TypeError, ValueError) as exc:
        raise AuditError(f"listeners[{index}].port: not a number") from exc
    if not 0 <= port <= 65535:
        raise AuditError(f"listeners[{index}].port: {port} is out of range")
    family = listener.get("family") or FAMILY_NAMES[address.version]
    if family not in _FAMILY_NUMBER:
        raise AuditError(f"listeners[{index}].family: expected ipv4 or ipv6, got {family!r}")
    mapped = address.ipv4_mapped if address.version == 6 else None
    effective = mapped or address
    scope = listener.get("scope")
    if scope not in ("loopback", "wildcard", "specific"):
        scope = "loopback" if effective.is_loopback else "wildcard" if effective.is_unspecified else "specific"
    interface = listener.get("interface") or None
    # SO_BINDTODEVICE lo: whatever the address, only this host can reach it.
    if interface == "lo":
        scope = "loopback"
    if family == "ipv4" or mapped is not None:
        families = (4,)
    elif address.is_unspecified and listener.get("v6only") is not True:
        # "::" without IPV6_V6ONLY also takes IPv4; /proc/net does not say
        # (v6only null), and Linux's default (bindv6only=0) is dual-stack.
        families = (4, 6)
    else:
        families = (6,)
    pids = sorted({p for p in (listener.get("pids") or []) if isinstance(p, int)} |
                  ({listener["pid"]} if isinstance(listener.get("pid"), int) else set()))
    return {
        "proto": proto,
        "family": family,
        "address": raw_address,
        "port": port,
        "scope": scope,
        "interface": interface,
        "families": families,
        "process": listener.get("name"),
        "pid": pids[0] if pids else None,
        "pids": pids,
        "user": None if listener.get("user") is None else str(listener["user"]),
        "cmdline": listener.get("cmdline"),
    }


def _dedupe(items):
    """One item per (proto, family, address, port, interface): SO_REUSEPORT servers open one socket per worker."""
    merged = {}
    for item in items:
        key = (item["proto"], item["family"], item["address"], item["port"], item["interface"])
        if key not in merged:
            merged[key] = dict(item, sockets=1)
            continue
        kept = merged[key]
        kept["sockets"] += 1
        kept["pids"] = sorted(set(kept["pids"]) | set(item["pids"]))
        if kept["pid"] is None or (item["pid"] is not None and item["pid"] < kept["pid"]):
            for name in ("pid", "process", "user", "cmdline"):
                kept[name] = item[name]
    return list(merged.values())


def _sort_key(item):
    return (item["port"], item["proto"], item["family"], item["address"], item["interface"] or "")


def _cidrs(family, intervals):
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return [str(net) for lo, hi in intervals for net in ipaddress.summarize_address_range(cls(lo), cls(hi))]


def _sources_text(allowed_from):
    return "; ".join(f"{family} {', '.join(cidrs) if cidrs else 'nowhere'}"
                     for family, cidrs in sorted(allowed_from.items()))


def _classify(host_policy, item):
    matches = [e for e in host_policy.ingress
               if e.proto == item["proto"] and e.family in item["families"] and e.port_lo <= item["port"] <= e.port_hi]
    labels = sorted({label for entry in matches for label in entry.labels})
    allowed = {}
    for family in item["families"]:
        merged = merge_intervals((e.addr_lo, e.addr_hi, 0) for e in matches if e.family == family)
        allowed[family] = [(lo, hi) for lo, hi, _tags in merged]
    families = item.pop("families")
    item["labels"] = [{"flow": x.flow, "service": x.service, "purpose": x.purpose, "owner": x.owner} for x in labels]
    item["services"] = sorted({x.service for x in labels})
    item["allowed_from"] = {FAMILY_NAMES[f]: _cidrs(f, allowed[f]) for f in families}
    item["overexposed"] = False
    where = f"{item['proto']}/{item['port']}"
    reached = " and ".join(FAMILY_NAMES[f] for f in families)
    if item["scope"] == "loopback":
        item["status"] = "loopback"
        item["reason"] = "bound to loopback: only this host can connect"
    elif not matches:
        item["status"] = "unapproved"
        item["reason"] = f"no flow or management entry of this host lets {where} in ({reached})"
    else:
        item["status"] = "approved"
        via = ", ".join(sorted({f"{x.flow}/{x.service}" for x in labels}))
        item["reason"] = f"let in by {via}"
        partial = [f for f in families if allowed[f] != [_FULL[f]]]
        if item["scope"] == "wildcard" and partial:
            item["overexposed"] = True
            item["reason"] = (f"listens on every address ({reached}) while the catalog lets {where} in only from "
                              f"{_sources_text(item['allowed_from'])}; {item['reason']}")
    return item


def _not_listening(host_policy, reachable, loopback):
    services = {}
    for entry in host_policy.ingress:
        for label in entry.labels:
            if label.flow == CONTROLLER_FLOW:
                continue
            group = services.setdefault((label.service, entry.proto),
                                        {"ranges": set(), "flows": set(), "purpose": label.purpose,
                                         "owner": label.owner})
            group["ranges"].add((entry.port_lo, entry.port_hi))
            group["flows"].add(label.flow)
    result = []
    for (service, proto), group in services.items():
        ranges = [(lo, hi) for lo, hi, _tags in merge_intervals((lo, hi, 0) for lo, hi in group["ranges"])]

        def covers(items, proto=proto, ranges=ranges):
            return any(i["proto"] == proto and any(lo <= i["port"] <= hi for lo, hi in ranges) for i in items)

        if covers(reachable):
            continue
        ports = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
        on_loopback = covers(loopback)
        reason = "nothing reachable from outside listens on "
        reason += f"{proto}/{ports}" + (" (only on loopback)" if on_loopback else "")
        result.append((ranges[0][0], proto, service, {
            "service": service,
            "proto": proto,
            "ports": ports,
            "flows": sorted(group["flows"]),
            "purpose": group["purpose"],
            "owner": group["owner"],
            "loopback_only": on_loopback,
            "reason": reason,
        }))
    return [row[-1] for row in sorted(result, key=lambda row: row[:3])]


def audit_listeners(host_policy, listeners) -> dict:
    """Classify ``listeners`` (``port_facts`` records) against ``host_policy``; see the module docstring.

    Returns ``{"host", "summary", "approved", "unapproved", "overexposed", "loopback", "not_listening"}``.
    ``overexposed`` repeats the approved listeners that bind wider than the catalog lets in.
    """
    if listeners is None:
        listeners = []
    if not isinstance(listeners, list):
        raise AuditError(f"listeners: expected a list, got {type(listeners).__name__}")
    items = _dedupe(_normalize(listener, index) for index, listener in enumerate(listeners))
    items = sorted((_classify(host_policy, item) for item in items), key=_sort_key)
    result = {"host": host_policy.host}
    result["approved"] = [i for i in items if i["status"] == "approved"]
    result["unapproved"] = [i for i in items if i["status"] == "unapproved"]
    result["overexposed"] = [i for i in items if i["overexposed"]]
    result["loopback"] = [i for i in items if i["status"] == "loopback"]
    result["not_listening"] = _not_listening(host_policy, result["approved"] + result["unapproved"],
                                             result["loopback"])
    result["summary"] = {name: len(result[name]) for name in LISTS}
    return result


def parse_fail_on(value) -> tuple:
    """``fail_on`` as a sorted tuple of known names; a string is one name."""
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise AuditError(f"fail_on: expected a list of {', '.join(FAIL_ON)}")
    unknown = sorted({str(n) for n in names} - set(FAIL_ON))
    if unknown:
        raise AuditError(f"fail_on: unknown value {unknown[0]!r}; expected some of {', '.join(FAIL_ON)}")
    return tuple(name for name in FAIL_ON if name in names)


def violations(result: dict, fail_on) -> list[dict]:
    """The items of ``result`` that ``fail_on`` names, each with ``why`` (its list), in report order."""
    found = []
    for name in parse_fail_on(fail_on):
        for item in result[name]:
            found.append(dict(item, why=_WHY[name]))
    return found


def _endpoint(item):
    address = item["address"]
    shown = f"[{address}]" if ":" in address else address
    device = f"%{item['interface']}" if item.get("interface") else ""
    return f"{shown}{device}:{item['port']}"


def _process(item):
    if not item.get("process"):
        return "-" if item.get("pid") is None else f"? ({item['pid']})"
    return item["process"] if item.get("pid") is None else f"{item['process']} ({item['pid']})"


def violation_table(host: str, found: list[dict]) -> str:
    """A fixed-width table of violations: host, port/proto, address, process (pid), user, why."""
    header = ("HOST", "PORT/PROTO", "ADDRESS", "PROCESS (PID)", "USER", "WHY")
    rows = []
    for item in found:
        if item["why"] == "not listening":
            rows.append((host, f"{item['ports']}/{item['proto']}", "-", "-", "-",
                         f"not listening: service {item['service']} ({item['reason']})"))
            continue
        address = item["address"] + (f"%{item['interface']}" if item.get("interface") else "")
        rows.append((host, f"{item['port']}/{item['proto']}", address, _process(item),
                     item.get("user") or "-", f"{item['why']}: {item['reason']}"))
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)


def audit_to_json(result) -> str:
    """One host's audit (or any audit data) as stable JSON."""
    return json.dumps(result, indent=2, sort_keys=True) + "\n"


def _testcase(suite, host, name, failure=None, out=""):
    # XML 1.0 has no escape for most control characters: they are shown as text escapes instead.
    case = ET.SubElement(suite, "testcase", {"classname": printable(f"portguard.port_audit.{host}"),
                                             "name": printable(name)})
    if failure is not None:
        kind, message = failure[0], printable(failure[1])
        element = ET.SubElement(case, "failure", {"type": kind, "message": message})
        element.text = message
    if out:
        ET.SubElement(case, "system-out").text = printable(out)
    return failure is not None


def audit_to_junit(results_by_host: dict, fail_on=("unapproved",)) -> str:
    """JUnit XML: one testsuite per host, one testcase per listener and per not-listening service.

    Unapproved listeners always fail; overexposed listeners and not-listening
    services fail when ``fail_on`` names them. No timestamps: the same audit
    renders to the same bytes.
    """
    failing = set(parse_fail_on(fail_on)) | {"unapproved"}
    root = ET.Element("testsuites", {"name": "portguard port audit"})
    total_tests = total_failures = 0
    for host in sorted(results_by_host):
        result = results_by_host[host]
        suite = ET.SubElement(root, "testsuite", {"name": printable(host)})
        tests = failures = 0
        listeners = sorted(result["approved"] + result["unapproved"] + result["loopback"], key=_sort_key)
        for item in listeners:
            failure = None
            if item["status"] == "unapproved":
                failure = ("unapproved", item["reason"])
            elif item["overexposed"] and "overexposed" in failing:
                failure = ("overexposed", item["reason"])
            who = f"process {_process(item)}, user {item.get('user') or '-'}"
            if failure:
                failure = (failure[0], f"{item['proto']}/{item['port']} on {item['address']} ({who}): {failure[1]}")
            out = f"status: {item['status']}{' (overexposed)' if item['overexposed'] else ''}; {who}; {item['reason']}"
            failures += _testcase(suite, host, f"{item['proto']}/{item['port']} {_endpoint(item)}", failure, out)
            tests += 1
        for item in result["not_listening"]:
            failure = ("not_listening", f"service {item['service']}: {item['reason']}") \
                if "not_listening" in failing else None
            name = f"service {item['service']} {item['proto']}/{item['ports']} listening"
            failures += _testcase(suite, host, name, failure, f"not listening: {item['reason']}")
            tests += 1
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("errors", "0")
        suite.set("skipped", "0")
        total_tests += tests
        total_failures += failures
    root.set("tests", str(total_tests))
    root.set("failures", str(total_failures))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
