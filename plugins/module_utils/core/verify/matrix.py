"""The reachability matrix: what the catalog expects, what the probes saw.

``build_plan`` turns a compiled policy into probes: from one host of every
segment (inventory group) towards every other host, every cataloged service
plus commonly exposed ports, in both families, each with the catalog's
expectation. ``evaluate`` joins the probe results and the deny counters to
that plan; ``render_table``, ``to_json``, ``to_junit`` and ``to_html`` show it.
Host, segment and service names and the probes' reasons come from inventories
and hosts: the text, XML and HTML outputs show what does not print as escapes
(``printable``), and the page escapes markup on top.
"""

import html
import ipaddress
import json
from xml.etree import ElementTree

from ansible_collections.portguard.hardening.plugins.module_utils.core.printable import printable

# Ports commonly left open by accident: databases, caches, admin consoles, Docker's API.
COMMON_PORTS = (
    (21, "tcp", "ftp"), (23, "tcp", "telnet"), (25, "tcp", "smtp"), (111, "tcp", "rpcbind"),
    (2375, "tcp", "docker-api"), (2379, "tcp", "etcd"), (3306, "tcp", "mysql"), (5432, "tcp", "postgres"),
    (5601, "tcp", "kibana"), (5900, "tcp", "vnc"), (6379, "tcp", "redis"), (8080, "tcp", "http-admin"),
    (8500, "tcp", "consul"), (9090, "tcp", "prometheus"), (9200, "tcp", "elasticsearch"),
    (11211, "tcp", "memcached"), (27017, "tcp", "mongodb"), (53, "udp", "dns"), (123, "udp", "ntp"),
    (161, "udp", "snmp"), (11211, "udp", "memcached"),
)
SKIP_GROUPS = ("all", "ungrouped")


def segments_of(groups: dict) -> dict[str, list[str]]:
    """Segments are the inventory groups that hold hosts directly or through children."""
    return {name: sorted(members) for name, members in sorted(groups.items()) if name not in SKIP_GROUPS and members}


def choose_probers(groups: dict, hosts) -> dict[str, str]:
    """One probe host per segment: the first of its hosts (sorted) that is in the play."""
    chosen = {}
    for segment, members in segments_of(groups).items():
        present = [h for h in members if h in hosts]
        if present:
            chosen[segment] = present[0]
    return chosen


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def probe_ports_of(policy, services, random_port: int):
    """Every cataloged service port (both ends of a range) plus the common ports, deduplicated."""
    ports = {}
    for name, service in sorted(services.items()):
        for proto, low, high in service.ports:
            for port in sorted({low, high}):
                ports.setdefault((port, proto), name)
    for port, proto, name in COMMON_PORTS:
        ports.setdefault((port, proto), name)
    ports.setdefault((random_port, "tcp"), "random-high")
    return sorted(((port, proto, name) for (port, proto), name in ports.items()), key=lambda p: (p[1], p[0]))


def build_plan(policy, groups: dict, hosts, *, random_port: int = 47123):
    """Probes with expectations: ``src``, ``src_address``, ``dst``, ``address``, ``port``, ``proto``, ``expected``."""
    services = policy.services
    ports = probe_ports_of(policy, services, random_port)
    probers = choose_probers(groups, hosts)
    plan = []
    sources = sorted(set(probers.values()))
    segments_by_host = {}
    for segment, host in probers.items():
        segments_by_host.setdefault(host, []).append(segment)
    for dst in sorted(hosts):
        target = policy.host(dst)
        for src in sources:
            if src == dst:
                continue  # a probe from the target itself goes through loopback and proves nothing
            origin = policy.host(src)
            for src_address in origin.settings.addresses:
                family = _family(src_address)
                for address in [a for a in target.settings.addresses if _family(a) == family]:
                    for port, proto, service in ports:
                        allowed_in = target.allowed_in(src_address, port, proto)
                        allowed_out = origin.allowed_out(address, port, proto)
                        reachable = (allowed_in or target.settings.mode == "audit") and allowed_out
                        plan.append({
                            "src": src,
                            "segment": ",".join(segments_by_host[src]),
                            "src_address": src_address,
                            "dst": dst,
                            "address": address,
                            "family": f"ipv{family}",
                            "port": port,
                            "proto": proto,
                            "service": service,
                            "allowed": allowed_in and allowed_out,
                            "expected": "open" if reachable else "filtered",
                            # whose deny counter must rise: the source's output drops first, then the target's input
                            "counted_at": f"{src}/out" if not allowed_out else None if allowed_in else f"{dst}/in",
                        })
    return plan


def listener_ports(plan) -> dict[str, list[dict]]:
    """Per destination host, the (port, proto) pairs that need a listener during the probes."""
    needed: dict[str, set] = {}
    for probe in plan:
        needed.setdefault(probe["dst"], set()).add((probe["port"], probe["proto"]))
    return {host: [{"port": p, "proto": proto} for p, proto in sorted(pairs)] for host, pairs in needed.items()}


def self_checks(plan) -> dict[str, list[dict]]:
    """Per destination host, its own addresses and ports: the listeners are checked from inside first."""
    needed: dict[str, set] = {}
    for probe in plan:
        needed.setdefault(probe["dst"], set()).add((probe["address"], probe["port"], probe["proto"]))
    return {host: [{"address": a, "port": p, "proto": proto} for a, p, proto in sorted(items)]
            for host, items in needed.items()}


def probes_by_source(plan) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for probe in plan:
        grouped.setdefault(probe["src"], []).append(
            {"address": probe["address"], "port": probe["port"], "proto": probe["proto"], "source": probe["src_address"]})
    return grouped


def evaluate(plan, results_by_source: dict, counters_before: dict, counters_after: dict):
    """Join probe results to the plan and check the deny counters (keyed ``host/in``, ``host/out``).

    Returns ``(cells, problems, counters)``; no problems means reality matches the catalog.
    """
    index = {}
    for src, results in results_by_source.items():
        for result in results:
            index[(src, result.get("source"), result["address"], result["port"], result["proto"])] = result
    cells, problems = [], []
    denied_per_host: dict[str, int] = {}
    for probe in plan:
        key = (probe["src"], probe["src_address"], probe["address"], probe["port"], probe["proto"])
        result = index.get(key)
        seen = result["state"] if result else "missing"
        cell = dict(probe, seen=seen, reason=result.get("reason") if result else None)
        cell["ok"] = seen == probe["expected"]
        if not cell["ok"]:
            problems.append(f"{probe['src']} ({probe['src_address']}) -> {probe['dst']} {probe['address']} "
                            f"{probe['port']}/{probe['proto']} [{probe['service']}]: expected {probe['expected']}, "
                            f"seen {seen}" + (f" ({cell['reason']})" if cell["reason"] else ""))
        if probe["counted_at"]:
            denied_per_host[probe["counted_at"]] = denied_per_host.get(probe["counted_at"], 0) + 1
        cells.append(cell)
    counters = {}
    for host, denied in sorted(denied_per_host.items()):
        before, after = counters_before.get(host), counters_after.get(host)
        rose = None if before is None or after is None else after - before
        counters[host] = {"denied_probes": denied, "counter_delta": rose}
        if rose is None:
            problems.append(f"{host}: the deny counter could not be read")
        elif rose < denied:
            problems.append(f"{host}: {denied} probes were denied but the deny counter rose by {rose} only")
    return cells, problems, counters


def _mark(cells) -> str:
    """One cell of the terminal table: a symbol per family, v4 then v6."""
    marks = []
    for cell in sorted(cells, key=lambda c: c["family"]):
        if cell["ok"]:
            marks.append("+" if cell["expected"] == "open" else ".")
        else:
            marks.append("X" if cell["seen"] == "open" else "!")
    return "".join(marks)


def render_overview(cells) -> str:
    """At a glance: source segments down, destinations across, the services that are open in each cell.

    A service is listed when it is open in at least one family; ``X:svc`` marks one open that must be blocked,
    ``!:svc`` one blocked that must be open.
    """
    sources = sorted({(c["segment"], c["src"]) for c in cells})
    destinations = sorted({c["dst"] for c in cells})
    table = [["from \\ to"] + destinations]
    for segment, src in sources:
        row = [f"{segment}({src})"]
        for dst in destinations:
            chosen = [c for c in cells if c["src"] == src and c["dst"] == dst]
            if not chosen:
                row.append("-")
                continue
            names = []
            for cell in sorted(chosen, key=lambda c: (c["proto"], c["port"])):
                if not cell["ok"]:
                    name = f"{'X' if cell['seen'] == 'open' else '!'}:{cell['service']}"
                elif cell["seen"] == "open":
                    name = cell["service"]
                else:
                    continue
                if name not in names:
                    names.append(name)
            row.append(",".join(names) or "none")
        table.append(row)
    table = [[printable(value) for value in row] for row in table]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip() for row in table]
    return "open services (everything else was blocked, as the catalog says):\n" + "\n".join("  " + x for x in lines)


def render_table(cells) -> str:
    """The overview, then per destination host: services down, source segments across."""
    out = [render_overview(cells), "",
           "legend: + open as expected   . blocked as expected   X open but must be blocked   "
           "! blocked but must be open   (one mark per family: IPv4 then IPv6)"]
    by_dst: dict[str, list] = {}
    for cell in cells:
        by_dst.setdefault(cell["dst"], []).append(cell)
    for dst, items in sorted(by_dst.items()):
        sources = sorted({(c["segment"], c["src"]) for c in items})
        rows = sorted({(c["proto"], c["port"], c["service"]) for c in items}, key=lambda r: (r[0], r[1]))
        header = ["service"] + [f"{segment}({src})" for segment, src in sources]
        table = [header]
        for proto, port, service in rows:
            line = [f"{service} {port}/{proto}"]
            for _unused, src in sources:
                chosen = [c for c in items if c["src"] == src and c["port"] == port and c["proto"] == proto]
                line.append(_mark(chosen) or "-")
            table.append(line)
        table = [[printable(value) for value in row] for row in table]
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        out.append("")
        out.append(f"{printable(dst)}:")
        for row in table:
            out.append("  " + "  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip())
    return "\n".join(out)


def to_json(cells, problems, counters) -> str:
    return json.dumps({"ok": not problems, "problems": problems, "counters": counters, "cells": cells},
                      indent=2, sort_keys=True)


def to_junit(cells, problems, counters) -> str:
    suites = ElementTree.Element("testsuites", name="portguard verify")
    by_dst: dict[str, list] = {}
    for cell in cells:
        by_dst.setdefault(cell["dst"], []).append(cell)
    for dst, items in sorted(by_dst.items()):
        failures = [c for c in items if not c["ok"]]
        counter = counters.get(f"{dst}/in")  # the ingress deny counter of this destination
        counter_failed = bool(counter and (counter["counter_delta"] is None
                                           or counter["counter_delta"] < counter["denied_probes"]))
        suite = ElementTree.SubElement(suites, "testsuite", name=printable(f"reachability.{dst}"),
                                       tests=str(len(items) + (1 if counter else 0)),
                                       failures=str(len(failures) + (1 if counter_failed else 0)))
        for cell in items:
            case = ElementTree.SubElement(
                suite, "testcase", classname=printable(f"reachability.{dst}"),
                name=printable(f"{cell['src']} {cell['src_address']} -> {cell['address']} {cell['port']}/{cell['proto']} "
                               f"{cell['service']} expected {cell['expected']}"))
            if not cell["ok"]:
                ElementTree.SubElement(case, "failure", message=printable(f"seen {cell['seen']}")).text = \
                    printable(f"expected {cell['expected']}, seen {cell['seen']} ({cell.get('reason')})")
        if counter:
            case = ElementTree.SubElement(suite, "testcase", classname=printable(f"reachability.{dst}"),
                                          name="deny counter rose")
            if counter_failed:
                ElementTree.SubElement(case, "failure", message="deny counter").text = json.dumps(counter)
    return ElementTree.tostring(suites, encoding="unicode")


def _html(value) -> str:
    return html.escape(printable(value))


def to_html(cells, problems, counters, title="portguard reachability") -> str:
    by_dst: dict[str, list] = {}
    for cell in cells:
        by_dst.setdefault(cell["dst"], []).append(cell)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{_html(title)}</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}",
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:center}",
        ".open{background:#c8efc8}.blocked{background:#eee}.bad{background:#f4a6a6;font-weight:bold}",
        "th.svc,td.svc{text-align:left}</style></head><body>",
        f"<h1>{_html(title)}</h1>",
        f"<p>{'All cells as the catalog expects.' if not problems else f'{len(problems)} problem(s):'}</p>",
    ]
    if problems:
        parts.append("<ul>" + "".join(f"<li>{_html(p)}</li>" for p in problems) + "</ul>")
    for dst, items in sorted(by_dst.items()):
        sources = sorted({(c["segment"], c["src"]) for c in items})
        rows = sorted({(c["proto"], c["port"], c["service"]) for c in items}, key=lambda r: (r[0], r[1]))
        counter = counters.get(f"{dst}/in")  # the ingress deny counter of this destination
        note = f" — deny counter +{counter['counter_delta']} for {counter['denied_probes']} denied probes" \
            if counter else ""
        parts.append(f"<h2>{_html(dst)}{_html(note)}</h2><table><tr><th class='svc'>service</th>")
        parts += [f"<th>{_html(segment)}<br>{_html(src)}</th>" for segment, src in sources]
        parts.append("</tr>")
        for proto, port, service in rows:
            parts.append(f"<tr><td class='svc'>{_html(f'{service} {port}/{proto}')}</td>")
            for _unused, src in sources:
                chosen = sorted([c for c in items if c["src"] == src and c["port"] == port and c["proto"] == proto],
                                key=lambda c: c["family"])
                if not chosen:
                    parts.append("<td>-</td>")
                    continue
                bad = any(not c["ok"] for c in chosen)
                css = "bad" if bad else ("open" if chosen[0]["expected"] == "open" else "blocked")
                text = " ".join(f"{c['family'][-2:]}:{c['seen']}" for c in chosen)
                parts.append(f"<td class='{css}' title='expected {_html(chosen[0]['expected'])}'>"
                             f"{_html(text)}</td>")
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
