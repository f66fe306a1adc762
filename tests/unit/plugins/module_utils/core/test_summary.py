"""The policy summary (the ``summary`` filter and the harden playbook's overview) of the example inventory."""

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.summary import (
    format_table,
    host_row,
    policy_summary,
)

HOSTS = ["web2", "mon1", "db1", "app1", "web1", "desk1"]  # in play order: the summary sorts them

EXAMPLE_SUMMARY = """\
host   addresses                    mode     deny    egress  in  out  flows let in
-----  ---------------------------  -------  ------  ------  --  ---  ----------------------------------------------------------------------
app1   172.30.89.21, fd89:7067::21  enforce  reject  no      8   0    management, scrape-metrics, web-to-app
db1    172.30.89.31, fd89:7067::31  enforce  drop    no      8   0    app-to-db, management, scrape-metrics
desk1  172.30.89.51, fd89:7067::51  enforce  reject  yes     6   12   management, scrape-metrics
mon1   172.30.89.41, fd89:7067::41  enforce  reject  no      24  0    internal-dns, management, office-dashboards, scrape-metrics, ship-logs
web1   172.30.89.11, fd89:7067::11  enforce  reject  no      10  0    management, scrape-metrics, web-public
web2   172.30.89.12, fd89:7067::12  enforce  reject  no      10  0    management, scrape-metrics, web-public

warning: portguard_flows[7].expires: flow office-legacy-ftp expired on 2025-06-30: not rendered"""


def test_the_example_summary(example_policy):
    assert policy_summary(example_policy, HOSTS) == EXAMPLE_SUMMARY


@pytest.mark.parametrize(("host", "expected"), [
    ("db1", {"deny": "drop", "egress": False, "ingress_entries": 8, "egress_entries": 0,
             "entries_by_family": {"ipv4/tcp": 4, "ipv6/tcp": 4}, "flows": ["app-to-db", "management", "scrape-metrics"]}),
    ("desk1", {"deny": "reject", "egress": True, "ingress_entries": 6, "egress_entries": 12,
               "entries_by_family": {"ipv4/tcp": 3, "ipv6/tcp": 3}, "flows": ["management", "scrape-metrics"]}),
    ("mon1", {"ingress_entries": 24, "entries_by_family": {"ipv4/tcp": 6, "ipv4/udp": 6, "ipv6/tcp": 6, "ipv6/udp": 6},
              "flows": ["internal-dns", "management", "office-dashboards", "scrape-metrics", "ship-logs"]}),
])
def test_host_rows_count_entries_per_family_and_name_the_flows(example_policy, host, expected):
    row = host_row(example_policy, host)
    assert {key: row[key] for key in expected} == expected
    assert (row["host"], row["mode"], row["backend"]) == (host, "enforce", "auto")


def test_a_table_shows_missing_values_booleans_and_lists():
    rows = [{"host": "a", "on": True, "items": ["x", "y"]}, {"host": "bbb", "on": False, "items": []}]
    assert format_table(rows, [("host", "host"), ("on", "on"), ("items", "items"), ("gone", "gone")]) == (
        "host  on   items  gone\n"
        "----  ---  -----  ----\n"
        "a     yes  x, y   -\n"
        "bbb   no   -      -")


def test_names_from_inventories_cannot_steer_the_terminal():
    text = format_table([{"host": "web1\x1b[2J\nroot", "addresses": ["10.0.0.1\r"]}],
                        [("host", "host"), ("addresses", "addresses")])
    assert "\x1b" not in text and "\r" not in text and len(text.splitlines()) == 3
    assert text.splitlines()[2] == "web1\\x1b[2J\\x0aroot  10.0.0.1\\x0d"
