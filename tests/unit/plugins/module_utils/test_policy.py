"""The policy model: interval merging, disjoint entries, and the decision function on the example inventory."""

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.intervals import (
    interval_cidrs,
    interval_text,
    merge_intervals,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import (
    Entry,
    Finding,
    Label,
    disjoint_entries,
)

A, B, C = Label("a", "s1", "Purpose A", "x"), Label("b", "s2"), Label("c", "s3", "Purpose C")
LABELS = [A, B, C]


def test_merge_intervals_joins_overlapping_and_adjacent_and_keeps_tags():
    merged = merge_intervals([(10, 20, 0), (5, 9, 1), (15, 30, 2), (40, 50, 0), (40, 45, 1)])
    assert merged == [[5, 30, {0, 1, 2}], [40, 50, {0, 1}]]


def test_merge_intervals_keeps_gaps():
    assert merge_intervals([(1, 1, 0), (3, 3, 0)]) == [[1, 1, {0}], [3, 3, {0}]]


def test_disjoint_entries_split_ports_and_union_labels():
    # a: addresses 0-99 on ports 10-20; b: addresses 50-149 on ports 15-30.
    entries = disjoint_entries(4, "tcp", [(0, 99, 10, 20, 0), (50, 149, 15, 30, 1)], LABELS)
    shapes = {(e.addr_lo, e.addr_hi, e.port_lo, e.port_hi, e.labels) for e in entries}
    assert shapes == {
        (0, 99, 10, 14, (A,)),
        (0, 149, 15, 20, (A, B)),
        (50, 149, 21, 30, (B,)),
    }


def test_disjoint_entries_join_neighbouring_port_ranges_with_the_same_addresses():
    entries = disjoint_entries(4, "udp", [(0, 9, 10, 20, 0), (0, 9, 21, 30, 1)], LABELS)
    assert [(e.addr_lo, e.addr_hi, e.port_lo, e.port_hi, e.labels) for e in entries] == [(0, 9, 10, 30, (A, B))]


def test_disjoint_entries_do_not_depend_on_input_order():
    rects = [(0, 99, 10, 20, 0), (50, 149, 15, 30, 1), (200, 210, 22, 22, 2), (0, 300, 22, 22, 0)]
    assert disjoint_entries(6, "tcp", rects, LABELS) == disjoint_entries(6, "tcp", rects[::-1], LABELS)


@pytest.mark.parametrize(("family", "low", "high", "text", "cidrs"), [
    (4, 0x0A000001, 0x0A000001, "10.0.0.1", ["10.0.0.1/32"]),
    (4, 0x0A000000, 0x0A0000FF, "10.0.0.0/24", ["10.0.0.0/24"]),
    (4, 0, 2**32 - 1, "0.0.0.0/0", ["0.0.0.0/0"]),
    (4, 0x0A000001, 0x0A000002, "10.0.0.1-10.0.0.2", ["10.0.0.1/32", "10.0.0.2/32"]),
    (4, 0x0A000002, 0x0A000005, "10.0.0.2-10.0.0.5", ["10.0.0.2/31", "10.0.0.4/31"]),
    (6, 0, 2**128 - 1, "::/0", ["::/0"]),
    (6, 0x11, 0x12, "::11-::12", ["::11/128", "::12/128"]),
])
def test_interval_text_and_cidrs(family, low, high, text, cidrs):
    assert interval_text(family, low, high) == text
    assert interval_cidrs(family, low, high) == cidrs


def test_entry_as_dict_and_contains():
    entry = Entry(4, "tcp", 0x0A000000, 0x0A0000FF, 8000, 8010, (A, B))
    assert entry.as_dict() == {
        "family": "ipv4", "proto": "tcp", "addresses": "10.0.0.0/24", "ports": "8000-8010",
        "labels": [{"flow": "a", "service": "s1", "purpose": "Purpose A", "owner": "x"},
                   {"flow": "b", "service": "s2", "purpose": "", "owner": ""}],
    }
    assert entry.port_text(":") == "8000:8010"
    assert entry.contains(0x0A000010, 8005)
    assert not entry.contains(0x0A000100, 8005)
    assert not entry.contains(0x0A000010, 8011)


def test_label_text():
    assert A.text() == "a/s1: Purpose A"
    assert B.text() == "b/s2"


def test_finding_as_dict():
    assert Finding("warning", "flow-expired", "p", "m").as_dict() == {
        "level": "warning", "code": "flow-expired", "path": "p", "message": "m"}


# --- the decision function on examples/inventory ----------------------------------

ALLOWED = [
    # (source, destination host, port, proto): what the example catalog says
    ("198.51.100.7", "web1", 443, "tcp"),          # web-public: any
    ("2001:db8:ffff::7", "web2", 80, "tcp"),
    ("172.30.89.11", "app1", 8005, "tcp"),         # web-to-app
    ("fd89:7067::12", "app1", 8010, "tcp"),
    ("172.30.89.21", "db1", 5432, "tcp"),          # app-to-db
    ("172.30.89.41", "db1", 9100, "tcp"),          # scrape-metrics to all
    ("172.30.89.31", "mon1", 514, "udp"),          # ship-logs from all
    ("172.30.89.200", "mon1", 53, "udp"),          # internal-dns from lab
    ("fd89:7067::99", "mon1", 53, "tcp"),
    ("10.20.4.4", "mon1", 3000, "tcp"),            # office-dashboards, expires 2099
    ("10.99.0.1", "desk1", 22, "tcp"),             # management from admin_vpn
    ("2001:db8:99::1", "db1", 22, "tcp"),
    ("172.30.89.41", "web1", 22, "tcp"),           # management from monitoring
]
DENIED = [
    ("172.30.89.11", "db1", 5432, "tcp"),          # web tier does not reach the database
    ("172.30.89.21", "db1", 5432, "udp"),          # wrong protocol
    ("172.30.89.21", "db1", 5433, "tcp"),
    ("10.20.4.4", "db1", 21, "tcp"),               # office-legacy-ftp expired 2025-06-30
    ("198.51.100.7", "app1", 443, "tcp"),          # web-public only reaches webservers
    ("172.30.89.11", "app1", 8011, "tcp"),         # beyond the workers range
    ("172.30.89.51", "web1", 22, "tcp"),           # a desk is not management
    ("10.98.0.1", "web1", 22, "tcp"),
    ("172.30.89.200", "mon1", 514, "udp"),         # lab is not "all" (inventory hosts)
    ("2001:db8:ffff::7", "mon1", 53, "udp"),
]


@pytest.mark.parametrize(("src", "host", "port", "proto"), ALLOWED)
def test_example_allowed(example_policy, src, host, port, proto):
    assert example_policy.allowed(src, host, port, proto)
    assert example_policy.host(host).why_in(src, port, proto)


@pytest.mark.parametrize(("src", "host", "port", "proto"), DENIED)
def test_example_denied(example_policy, src, host, port, proto):
    assert not example_policy.allowed(src, host, port, proto)
    assert example_policy.host(host).why_in(src, port, proto) == []


def test_example_why_names_flow_and_purpose(example_policy):
    why = example_policy.host("db1").why_in("172.30.89.41", 22, "tcp")
    assert why == [Label("management", "ssh", "Remote administration", "platform")]


def test_example_egress_of_the_desk(example_policy):
    desk = example_policy.host("desk1")
    assert desk.settings.egress
    assert desk.allowed_out("172.30.89.41", 514, "udp")      # ship-logs: desk1 is in all
    assert desk.allowed_out("fd89:7067::41", 3000, "tcp")    # office-dashboards: desk1 is in office
    assert desk.allowed_out("172.30.89.12", 443, "tcp")      # web-public: any
    assert not desk.allowed_out("172.30.89.31", 5432, "tcp")
    assert not desk.allowed_out("172.30.89.31", 22, "tcp")   # desk1 is not management
    assert not desk.allowed_out("172.30.89.41", 9100, "tcp")
    # Without egress enforcement every destination is allowed.
    assert example_policy.host("db1").allowed_out("192.0.2.1", 25, "tcp")
    assert example_policy.host("db1").egress == ()


def test_example_settings(example_policy):
    assert example_policy.host("db1").settings.deny == "drop"
    assert example_policy.host("web1").settings.deny == "reject"
    assert example_policy.host("web1").settings.addresses == ("172.30.89.11", "fd89:7067::11")
    assert [host for host in sorted(example_policy.hosts) if example_policy.hosts[host].egress] == ["desk1"]
