"""Report file names, directory and writes, shared by the report actions and the report_file_name filter."""

import os
from urllib.parse import unquote

from ansible_collections.portguard.hardening.plugins.filter.portguard import FilterModule
from ansible_collections.portguard.hardening.plugins.plugin_utils.report_files import (
    report_file_name,
    report_root,
    write_report,
)


def test_report_file_names_are_distinct_safe_and_reversible():
    hosts = ["web/1", "web_1", "web:1", "Web1", "web%2F1", "../../etc/x", ".hidden", "-rf", "..", ".", "report",
             "ü", "x" * 300, "x" * 299 + "y", "", "a\x00b", "a\nb"]
    names = [report_file_name(host) for host in hosts]
    assert len(set(names)) == len(hosts)
    for host, name in zip(hosts, names):
        assert set(name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-%~"), name
        assert name[0] not in ".-" and name != "report" and 0 < len(name) <= 120
        if "~" not in name:
            assert unquote(name) == host
    assert names[:3] == ["web%2F1", "web_1", "web%3A1"]
    assert names[5] == "%2E.%2F..%2Fetc%2Fx"


def test_the_filter_names_files_as_the_reports_do():
    name = FilterModule().filters()["report_file_name"]
    assert [name(host) for host in ("web/1", "../x", "db1")] == ["web%2F1", "%2E.%2Fx", "db1"]


def test_report_root_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report_root(None, {}) == str(tmp_path / "portguard-reports")
    assert report_root(None, {"portguard_report_dir": "out"}) == str(tmp_path / "out")
    assert report_root("given", {"portguard_report_dir": "out"}) == str(tmp_path / "given")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert report_root("~/r", {}) == str(tmp_path / "home" / "r")


def test_write_report_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    write_report(str(path), "new\n")
    assert path.read_text() == "new\n" and os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["a.json"]
