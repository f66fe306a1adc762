"""Strings that others chose, in every output: shown, never obeyed.

Process names and command lines (local users), host and group names (inventory sources), purposes, owners and flow
names (catalog authors), probe reasons and log details (managed hosts) reach the text tables, the JUnit files and
the HTML pages. Each output is rendered twice, once with an innocuous string everywhere and once with a hostile one:
the pages, parsed with html.parser, must have the same elements and attributes (nothing injected), the XML must
parse, and no output may carry a character that does not print.
"""

import datetime
import unicodedata
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from support.catalogs import ssh_only_catalog

from ansible_collections.portguard.hardening.plugins.module_utils.core.audit import (
    audit_listeners,
    audit_to_junit,
    violation_table,
    violations,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.printable import escape_bytes, printable
from ansible_collections.portguard.hardening.plugins.module_utils.core.report import render
from ansible_collections.portguard.hardening.plugins.module_utils.core.summary import format_table
from ansible_collections.portguard.hardening.plugins.module_utils.core.verify import matrix
from ansible_collections.portguard.hardening.plugins.module_utils.host.listeners import parse_cmdline

HOSTILE = ("<script>alert(1)</script>\"><img src=x onerror=alert(1)>' onmouseover='x"
           "\x1b[31m\x1b]0;pwned\x07\x08\r\n\x00\x7f\x9b\u202e\u2066\ufeff\ufffe\udcff"
           "--><!-- portguard-activity:end -->&amp;")
BENIGN = "plain"
# What may never reach a terminal, an XML parser or a page: controls but the line breaks of the layout,
# bidi overrides and isolates, surrogates, U+FFFE.
HIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Cn", "Zl", "Zp"}


def hidden(text, allowed="\n"):
    return [char for char in text if char not in allowed and unicodedata.category(char) in HIDDEN_CATEGORIES]


class Page(HTMLParser):
    """The element/attribute skeleton of a page and its text."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.skeleton, self.data = [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.skeleton.append(("start", tag, tuple(name for name, _value in attrs)))

    def handle_endtag(self, tag):
        self.skeleton.append(("end", tag))

    def handle_comment(self, data):
        self.skeleton.append(("comment", data))

    def handle_data(self, data):
        self.data.append(data)


def assert_same_page(benign_html, hostile_html):
    benign, hostile = Page(benign_html), Page(hostile_html)
    assert hostile.skeleton == benign.skeleton, "an element, attribute or comment was injected"
    assert not {entry[1] for entry in hostile.skeleton if entry[0] == "start"} & {"script", "img"}
    assert not hidden(hostile_html, allowed="\n")
    text = "".join(hostile.data)
    assert printable(HOSTILE) in text  # shown as text, escapes and all


# ---------------------------------------------------------------- collection
def test_escape_bytes_is_display_safe_and_exact():
    raw = b"evil\x1b[31m\x07\x08name\\x1b\xff\xe2\x80\xae\xc2\x9b"
    shown = escape_bytes(raw)
    assert shown == "evil\\x1b[31m\\x07\\x08name\\\\x1b\\xff\\u202e\\u009b"
    assert not hidden(shown, allowed="")
    # \\xNN is the byte, \\\\ a backslash, \\uNNNN the code point in UTF-8: nothing is lost
    back = bytearray()
    pos = 0
    while pos < len(shown):
        if shown.startswith("\\\\", pos):
            back += b"\\"
            pos += 2
        elif shown.startswith("\\x", pos):
            back.append(int(shown[pos + 2:pos + 4], 16))
            pos += 4
        elif shown.startswith("\\u", pos):
            back += chr(int(shown[pos + 2:pos + 6], 16)).encode()
            pos += 6
        else:
            back += shown[pos].encode()
            pos += 1
    assert bytes(back) == raw
    assert printable(shown) == shown  # outputs may apply it again
    assert printable("résumé 日本 ok") == "résumé 日本 ok"


def test_command_line_arguments_are_escaped_each():
    assert parse_cmdline(b"python3\0--title=\x1b]0;x\x07\0\xff\0") == "python3 --title=\\x1b]0;x\\x07 \\xff"


# ---------------------------------------------------------------- audit
CATALOG = ssh_only_catalog(to="web1")


@pytest.fixture(scope="module")
def web1():
    return compile_catalog(CATALOG, {"all": ["web1"]}, {"web1": {"portguard_addresses": ["192.0.2.10"]}},
                           today=datetime.date(2026, 1, 1)).host("web1")


def rogue(text):
    """A listener as port_facts of an older release, or another source, hands it over: nothing escaped."""
    return [{"protocol": "tcp", "family": "ipv4", "address": "0.0.0.0", "port": 6379, "interface": text,
             "pid": 42, "pids": [42], "name": text, "cmdline": text, "user": text, "uid": 1000}]


def test_junit_parses_and_keeps_the_failing_case(web1):
    result = audit_listeners(web1, rogue(HOSTILE))
    root = ET.fromstring(audit_to_junit({HOSTILE: result}))  # noqa: S314 - our own output
    failed = [case for case in root.iter("testcase") if case.find("failure") is not None]
    assert len(failed) == 1 and root.get("failures") == "1"
    assert printable(HOSTILE) in failed[0].find("failure").get("message")
    assert root.find("testsuite").get("name") == printable(HOSTILE)


def test_violation_table_prints_nothing_hidden(web1):
    result = audit_listeners(web1, rogue(HOSTILE))
    table = violation_table(HOSTILE, violations(result, ["unapproved"]))
    assert not hidden(table)
    assert len(table.splitlines()) == 2
    assert printable(HOSTILE) in table


# ---------------------------------------------------------------- verify matrix
def cells(text):
    common = {"src": text, "segment": text, "src_address": "192.0.2.1", "dst": text, "address": "192.0.2.2",
              "port": 6379, "proto": "tcp", "service": text, "allowed": False, "counted_at": f"{text}/in"}
    return [dict(common, family="ipv4", expected="filtered", seen="open", reason=text, ok=False),
            dict(common, family="ipv6", expected="filtered", seen="filtered", reason=None, ok=True)]


def problems(text):
    return [f"{text} -> {text}: expected filtered, seen open ({text})"]


def counters(text):
    return {text: {"denied_probes": 2, "counter_delta": 1}}


def test_matrix_page_has_no_injected_element():
    assert_same_page(matrix.to_html(cells(BENIGN), problems(BENIGN), counters(BENIGN), title=BENIGN),
                     matrix.to_html(cells(HOSTILE), problems(HOSTILE), counters(HOSTILE), title=HOSTILE))


def test_matrix_junit_and_table():
    root = ET.fromstring(matrix.to_junit(cells(HOSTILE), problems(HOSTILE), counters(HOSTILE)))  # noqa: S314
    assert [case.find("failure").text for case in root.iter("testcase") if case.find("failure") is not None][0] \
        == printable(f"expected filtered, seen open ({HOSTILE})")
    table = matrix.render_table(cells(HOSTILE))
    assert not hidden(table) and printable(HOSTILE) in table


# ---------------------------------------------------------------- activity report
def summary(text):
    flow = {"flow": text, "service": text, "owner": text, "purpose": text, "label": f"{text}/{text}", "hits": 0,
            "new": 0, "entries": 1}
    denied = {"src": "203.0.113.9", "names": {"hosts": [text]}, "name_text": text, "port": text, "proto": "tcp",
              "new": 1, "count": 30, "first_seen": text, "last_seen": text}
    host = {"host": text, "backend": text, "counters_since": text, "counters_since_event": text,
            "previous_report": text, "first_report": False, "reset": {"when": text, "event": text},
            "log": {"source": text}, "log_note": text, "threshold": 20, "flows": [flow], "denied": [denied],
            "unusual": [{"src": "203.0.113.9", "name_text": text, "count": 30, "new": 1}],
            "deny_counters": {"denied_in": {"total": 30, "new": 1}}}
    dated = {"name": text, "path": text, "expires": text, "days_left": 3, "owners": [text]}
    return {"hosts": {text: host}, "unused_by_owner": {text: [{"flow": text, "service": text, "purpose": text,
                                                               "hosts": [text]}]},
            "expired": [dated], "expiring": [dated], "unusual": []}


def test_report_page_has_no_injected_element():
    assert_same_page(render.render_html(summary(BENIGN), title=BENIGN),
                     render.render_html(summary(HOSTILE), title=HOSTILE))


def test_report_section_in_the_verify_page_is_replaced_whole():
    page = matrix.to_html(cells(BENIGN), [], {})
    once = render.extend_page(page, summary(HOSTILE))
    twice = render.extend_page(once, summary(BENIGN))
    assert twice == render.extend_page(page, summary(BENIGN))
    assert_same_page(render.extend_page(page, summary(BENIGN)), once)


def test_report_text_prints_nothing_hidden():
    text = render.render_text(summary(HOSTILE))
    assert not hidden(text) and printable(HOSTILE) in text


def test_policy_summary_table_prints_nothing_hidden():
    table = format_table([{"host": HOSTILE, "flows": [HOSTILE]}], [("host", "host"), ("flows", "flows")])
    assert not hidden(table) and printable(HOSTILE) in table
