"""The host-side readers of port_activity: log lines, kmsg records, counters, cursors."""

import json
import subprocess
from pathlib import Path

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.ipset import parse_ipset_save
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import parse_iptables_save
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import parse_nft_json
from ansible_collections.portguard.hardening.plugins.module_utils.host import activity

FIXTURES = Path(__file__).parent / "fixtures" / "kmsg"
PREFIX = "portguard-deny: "


def records():
    return [line for line in (FIXTURES / "records.txt").read_text().splitlines() if line and not line.startswith("#")]


def test_parse_kmsg_record():
    facility, seq, usec, message = activity.parse_kmsg_record(records()[0] + "\n SUBSYSTEM=net\n")
    assert (facility, seq, usec) == (activity.KERNEL_FACILITY, 1766, 3160218012)
    assert message.startswith("portguard-deny: IN=pgr-vb OUT= ")
    # written to /dev/kmsg from user space: priority 12 is user.warning
    assert activity.parse_kmsg_record("12,1800,1,-;portguard-deny: IN=eth0")[0] == 1
    assert activity.parse_kmsg_record("garbage") is None
    assert activity.parse_kmsg_record("6,x,1,-;text") is None
    assert activity.parse_kmsg_record("x,1,1,-;text") is None


def test_parse_captured_lines():
    events = [activity.parse_log_message(activity.parse_kmsg_record(r)[3], PREFIX) for r in records()]
    assert events[0] == {"direction": "in", "src": "172.30.111.1", "dst": "172.30.111.2", "proto": "tcp", "port": 6379}
    assert events[1] == {"direction": "in", "src": "172.30.111.1", "dst": "172.30.111.2", "proto": "udp", "port": 161}
    # the kernel writes IPv6 addresses fully expanded; they come out as ipaddress writes them
    assert events[2] == {"direction": "in", "src": "fd89:7211::1", "dst": "fd89:7211::2", "proto": "tcp", "port": 6379}
    assert events[3]["proto"] == "udp" and events[3]["port"] == 161
    assert events[4] == {"direction": "in", "src": "fd89:7211::1", "dst": "ff02::1:ff00:2", "proto": "icmpv6",
                         "port": "type 135"}
    assert events[5] is None  # not ours


def test_parse_outbound_and_other_prefix():
    line = ("pg-out: IN= OUT=eth0 SRC=10.0.0.5 DST=10.0.0.9 LEN=60 TOS=0x00 PREC=0x00 TTL=64 ID=1 DF "
            "PROTO=TCP SPT=4000 DPT=5432 WINDOW=1 RES=0x00 SYN URGP=0")
    assert activity.parse_log_message(line, "pg-out: ") == {
        "direction": "out", "src": "10.0.0.5", "dst": "10.0.0.9", "proto": "tcp", "port": 5432}
    assert activity.parse_log_message(line, PREFIX) is None
    # the prefix anywhere but at the start is someone else's text (a crashing file's name, say)
    assert activity.parse_log_message("traps: a.out[1] segfault in x " + line, "pg-out: ") is None
    assert activity.parse_log_message("portguard-deny: IN=eth0 SRC=bogus DST=1.2.3.4 PROTO=TCP", PREFIX) is None


def test_read_kmsg_groups_filters_and_cursor(monkeypatch, tmp_path):
    recs = [r + "\n" for r in records()]
    recs.append("6,1770,3170000000,-;portguard-deny: IN=eth0 OUT= SRC=172.30.111.9 DST=10.9.9.9 PROTO=TCP SPT=1 DPT=22\n")
    recs.append("6,1771,3171000000,-;portguard-deny: IN=pgr-vb OUT= SRC=172.30.111.1 DST=172.30.111.2 "
                "LEN=60 PROTO=TCP SPT=47609 DPT=6379 SYN\n")

    def fake_open(path, flags):
        fake_open.queue = list(recs)
        return 99

    def fake_read(fd, size):
        if not fake_open.queue:
            raise BlockingIOError
        return fake_open.queue.pop(0).encode()

    monkeypatch.setattr(activity.os, "open", fake_open)
    monkeypatch.setattr(activity.os, "read", fake_read)
    monkeypatch.setattr(activity.os, "close", lambda fd: None)
    monkeypatch.setattr(activity, "_boot_id", lambda: "boot-1")
    result = activity.read_kmsg(PREFIX, ["172.30.111.2", "fd89:7211::2"])
    assert result["source"] == "kmsg" and result["readable"] and not result["lost"]
    assert result["cursor"] == {"source": "kmsg", "boot_id": "boot-1", "seq": 1771}
    # the multicast ND line and the other namespace's line (DST 10.9.9.9) are not this host's
    assert result["lines"] == 5
    tcp4 = [g for g in result["groups"] if g["src"] == "172.30.111.1" and g["proto"] == "tcp"]
    assert len(tcp4) == 1 and tcp4[0]["count"] == 2 and tcp4[0]["first"] < tcp4[0]["last"]
    again = activity.read_kmsg(PREFIX, ["172.30.111.2"], since=result["cursor"])
    assert again["lines"] == 0 and again["cursor"]["seq"] == 1771
    partial = activity.read_kmsg(PREFIX, ["172.30.111.2"], since={"source": "kmsg", "boot_id": "boot-1", "seq": 1767})
    assert partial["lines"] == 1  # only 1771 (1768-1770 are IPv6 or another host's)
    lost = activity.read_kmsg(PREFIX, ["172.30.111.2"], since={"source": "kmsg", "boot_id": "boot-1", "seq": 1000})
    assert lost["lost"] is True
    other_boot = activity.read_kmsg(PREFIX, ["172.30.111.2"], since={"source": "kmsg", "boot_id": "boot-0", "seq": 1771})
    assert other_boot["lines"] == 3


FORGED = (
    # a user-space write to /dev/kmsg: the kernel files it under the user facility (14 = user.info)
    "14,1772,3172000000,-;portguard-deny: IN=pgr-vb OUT= SRC=203.0.113.9 DST=172.30.111.2 PROTO=TCP SPT=1 DPT=22\n",
    # a kernel record whose end a local user chose: the prefix in the middle
    "6,1773,3173000000,-;traps: a.out[1] segfault at 0 ip 0 sp 0 error 4 in portguard-deny: IN=pgr-vb OUT= "
    "SRC=203.0.113.7 DST=172.30.111.2 PROTO=TCP SPT=1 DPT=23 [1000+1000]\n",
)
GENUINE = ("6,1774,3174000000,-;portguard-deny: IN=pgr-vb OUT= SRC=172.30.111.1 DST=172.30.111.2 "
           "LEN=60 PROTO=TCP SPT=47610 DPT=6379 SYN\n")


def test_read_kmsg_ignores_forged_records(monkeypatch):
    queue = []

    def fake_read(fd, size):
        if not queue:
            raise BlockingIOError
        return queue.pop(0).encode()

    monkeypatch.setattr(activity.os, "open", lambda path, flags: queue.extend([*FORGED, GENUINE]) or 99)
    monkeypatch.setattr(activity.os, "read", fake_read)
    monkeypatch.setattr(activity.os, "close", lambda fd: None)
    monkeypatch.setattr(activity, "_boot_id", lambda: "b")
    result = activity.read_kmsg(PREFIX, ["172.30.111.2"])
    assert [(g["src"], g["port"], g["count"]) for g in result["groups"]] == [("172.30.111.1", 6379, 1)]
    assert result["cursor"]["seq"] == 1774 and result["lost"] is False


def test_read_journal_keeps_kernel_facility_records_only(monkeypatch):
    def entry(message, facility, cursor):
        return json.dumps({"MESSAGE": message, "SYSLOG_FACILITY": facility, "_TRANSPORT": "kernel",
                           "__CURSOR": cursor, "__REALTIME_TIMESTAMP": "1700000000000000"})

    lines = [entry(FORGED[0].split(";", 1)[1].strip(), "1", "c1"), entry(FORGED[1].split(";", 1)[1].strip(), "0", "c2"),
             entry(GENUINE.split(";", 1)[1].strip(), "0", "c3")]
    seen = {}

    def fake_run(argv, **kwargs):
        seen["argv"] = argv
        return subprocess.CompletedProcess(argv, 0, "\n".join(lines) + "\n", "")

    monkeypatch.setattr(activity, "run", fake_run)
    result = activity.read_journal(PREFIX, ["172.30.111.2"])
    assert [(g["src"], g["port"]) for g in result["groups"]] == [("172.30.111.1", 6379)]
    assert result["cursor"] == {"source": "journal", "cursor": "c3"}
    assert "SYSLOG_FACILITY=0" in seen["argv"]


def test_read_log_without_kmsg_or_journal(tmp_path, monkeypatch):
    monkeypatch.setattr(activity.shutil, "which", lambda name: None)
    result = activity.read_log(PREFIX, (), None, kmsg=str(tmp_path / "kmsg"))
    assert result["readable"] is False and result["source"] == "none"
    assert "no " + str(tmp_path / "kmsg") in result["reason"] and "journald" in result["reason"]


def test_nft_log_counter_and_iptables_log_counter():
    listing = {"nftables": [
        {"counter": {"family": "inet", "name": "denied_in", "table": "portguard", "packets": 12, "bytes": 700}},
        {"rule": {"chain": "input", "expr": [{"limit": {"rate": 10, "burst": 7, "per": "minute"}},
                                             {"counter": {"packets": 7, "bytes": 400}},
                                             {"log": {"prefix": PREFIX, "level": "info"}}]}},
        {"rule": {"chain": "input", "expr": [{"counter": "denied_in"}, {"reject": {"type": "icmpx"}}]}},
    ]}
    parsed = parse_nft_json(json.dumps(listing))
    assert parsed["denied_in"] == 12 and parsed["logged_in"] == 7 and parsed["logged_out"] is None
    saved = ("[3:180] -A PORTGUARD-IN -m limit --limit 10/min -j LOG --log-prefix \"portguard-deny: \" --log-level 6\n"
             "[9:540] -A PORTGUARD-IN -m comment --comment denied_in -j REJECT --reject-with icmp-admin-prohibited\n")
    parsed = parse_iptables_save({"ipv4": saved, "ipv6": saved.replace("[3:180]", "[1:80]")})
    assert parsed["logged_in"] == 4 and parsed["denied_in"] == 18


def test_last_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(activity, "STATE_DIR", str(tmp_path))
    assert activity.last_replaced() is None
    (tmp_path / "applied.json").write_text(json.dumps({"at": 100.0, "token": "a"}))
    (tmp_path / "reverted.json").write_text(json.dumps({"at": 150.0, "token": "a"}))
    assert activity.last_replaced() == {"at": 150.0, "event": "reverted"}


def test_first_read_skips_lines_before_the_last_apply(monkeypatch):
    recs = [r + "\n" for r in records()[:2]]
    queue = []

    def fake_read(fd, size):
        if not queue:
            raise BlockingIOError
        return queue.pop(0).encode()

    monkeypatch.setattr(activity.os, "open", lambda path, flags: queue.extend(recs) or 99)
    monkeypatch.setattr(activity.os, "read", fake_read)
    monkeypatch.setattr(activity.os, "close", lambda fd: None)
    monkeypatch.setattr(activity, "_boot_id", lambda: "b")
    monkeypatch.setattr(activity.time, "clock_gettime", lambda clock: 3160.3)
    monkeypatch.setattr(activity.time, "time", lambda: 10_000.0)
    # the records are stamped 3160.218012 and 3160.218102 s after boot: wall 9999.918..
    assert activity.read_kmsg(PREFIX, (), None, not_before=9999.9)["lines"] == 2
    assert activity.read_kmsg(PREFIX, (), None, not_before=9999.95)["lines"] == 0
    # with a cursor, the cursor decides
    cursor = {"source": "kmsg", "boot_id": "b", "seq": 1}
    assert activity.read_kmsg(PREFIX, (), cursor, not_before=9999.95)["lines"] == 2


def test_ipset_elements_are_counted_like_iptables_rules():
    saved = ('create portguard-in4 hash:net,port family inet hashsize 64 maxelem 65536 counters comment\n'
             'add portguard-in4 10.0.0.0/24,tcp:22 packets 3 bytes 180 comment "management/ssh: Remote administration"\n'
             'add portguard-out6 2001:db8::1,udp:53 packets 0 bytes 0\n'
             'add f2b-sshd 198.51.100.7,tcp:22 packets 9 bytes 9\n')
    assert parse_ipset_save(saved) == [
        {"set": "PORTGUARD-IN/ipv4", "addresses": "10.0.0.0/24", "ports": "tcp:22",
         "comment": "management/ssh: Remote administration", "packets": 3, "bytes": 180},
        {"set": "PORTGUARD-OUT/ipv6", "addresses": "2001:db8::1", "ports": "udp:53", "comment": "", "packets": 0,
         "bytes": 0},
    ]
