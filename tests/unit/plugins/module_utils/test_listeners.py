"""Unit tests of the listener parsers on captured kernel output (see fixtures/listeners/capture.py)."""

import json
import random
import shutil
import socket
import struct
from pathlib import Path

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    PortguardError,
)
from ansible_collections.portguard.hardening.plugins.module_utils.host import listeners, sockets
from ansible_collections.portguard.hardening.plugins.module_utils.host.sockets import (
    ListenerError,
    NetlinkUnavailable,
    SocketRecord,
)

FIXTURES = Path(__file__).parent / "fixtures" / "listeners"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
FAMILIES = {"4": socket.AF_INET, "6": socket.AF_INET6}


def proc_records():
    records = []
    for protocol in ("tcp", "udp"):
        for suffix, family in FAMILIES.items():
            name = protocol + ("6" if suffix == "6" else "")
            text = (FIXTURES / f"proc_net_{name}.txt").read_text()
            records += sockets.parse_proc_net(text, protocol, family)
    return records


def netlink_records():
    records = []
    for protocol in ("tcp", "udp"):
        for suffix in FAMILIES:
            data = (FIXTURES / f"sock_diag_{protocol}{suffix}.bin").read_bytes()
            part, done = sockets.parse_sock_diag(data, protocol)
            assert done
            records += part
    return records


def summary(listener, keys=("protocol", "family", "address", "port")):
    return tuple(listener[key] for key in keys)


def test_proc_net_fixtures_give_exactly_the_listening_sockets():
    # The fixtures also hold an established TCP pair and a connected UDP socket.
    found = listeners.build_listeners(proc_records(), None, {})
    assert sorted(map(summary, found)) == sorted(map(summary, EXPECTED))
    assert all(item["v6only"] is None and item["interface"] is None for item in found)


def test_sock_diag_fixtures_give_the_listening_sockets_with_v6only_and_device():
    keys = ("protocol", "family", "address", "port", "v6only")
    found = listeners.build_listeners(netlink_records(), None, {})
    expected = [{**item, "v6only": item["v6only"] if item["family"] == "ipv6" else None}
                for item in EXPECTED]
    assert sorted(summary(item, keys) for item in found) == sorted(
        summary(item, keys) for item in expected)
    bound = {rec.port: rec.ifindex for rec in netlink_records()}
    assert {port for port, ifindex in bound.items() if ifindex} == {
        item["port"] for item in EXPECTED if item["interface"]}


def test_both_sources_agree_on_inodes_and_owner_uid():
    def key(rec):
        return rec.protocol, rec.family, rec.port, rec.address, rec.inode, rec.uid
    assert sorted(map(key, proc_records())) == sorted(map(key, netlink_records()))


def test_sock_diag_parses_across_chunks():
    data = (FIXTURES / "sock_diag_tcp6.bin").read_bytes()
    whole = sockets.parse_sock_diag(data, "tcp")[0]
    first_len = struct.unpack_from("=I", data)[0]
    head, done = sockets.parse_sock_diag(data[:first_len], "tcp")
    assert not done and head == whole[:1]
    tail, done = sockets.parse_sock_diag(data[first_len:], "tcp")
    assert done and head + tail == whole


def test_sock_diag_error_reply_means_netlink_unavailable():
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -2) + bytes(16)
    with pytest.raises(NetlinkUnavailable, match="No such file"):
        sockets.parse_sock_diag(error, "udp")


def test_sock_diag_truncated_reply_is_refused():
    data = (FIXTURES / "sock_diag_tcp4.bin").read_bytes()
    with pytest.raises(ListenerError, match="truncated"):
        sockets.parse_sock_diag(data[:50], "tcp")
    assert issubclass(ListenerError, PortguardError)


def test_request_asks_for_the_listening_state_only():
    tcp = sockets.build_sock_diag_request(socket.AF_INET6, "tcp")
    udp = sockets.build_sock_diag_request(socket.AF_INET, "udp")
    assert len(tcp) == struct.unpack_from("=I", tcp)[0] == 72
    assert struct.unpack_from("=BBBxI", tcp, 16) == (socket.AF_INET6, socket.IPPROTO_TCP, 0, 1 << 10)
    assert struct.unpack_from("=BBBxI", udp, 16) == (socket.AF_INET, socket.IPPROTO_UDP, 0, 1 << 7)


ADDRESSES = [
    # family, address, scope, v4_mapped
    (socket.AF_INET, "0.0.0.0", "wildcard", False),
    (socket.AF_INET, "127.0.0.53", "loopback", False),
    (socket.AF_INET, "10.20.0.5", "specific", False),
    (socket.AF_INET6, "::", "wildcard", False),
    (socket.AF_INET6, "::1", "loopback", False),
    (socket.AF_INET6, "fe80::1", "specific", False),
    (socket.AF_INET6, "2001:db8::10", "specific", False),
    (socket.AF_INET6, "::ffff:127.0.0.1", "loopback", True),
    (socket.AF_INET6, "::ffff:0.0.0.0", "wildcard", True),
    (socket.AF_INET6, "::ffff:10.20.0.5", "specific", True),
]


@pytest.mark.parametrize(("family", "address", "scope", "v4_mapped"), ADDRESSES)
def test_describe_address(family, address, scope, v4_mapped):
    raw = socket.inet_pton(family, address)
    assert listeners.describe_address(family, raw) == (address, scope, v4_mapped)


def test_v4_mapped_listener_is_shown_as_such():
    found = listeners.build_listeners(proc_records(), None, {})
    mapped = [item for item in found if item["v4_mapped"]]
    assert {(item["protocol"], item["address"], item["scope"]) for item in mapped} == {
        ("tcp", "::ffff:127.0.0.1", "loopback"), ("udp", "::ffff:127.0.0.1", "loopback")}
    assert all(item["family"] == "ipv6" for item in mapped)


def make_proc(tmp_path, processes):
    """A fake /proc: {pid: {"fds": {fd: target}, "comm": ..., "cmdline": ..., "uid": ...}}."""
    root = tmp_path / "proc"
    root.mkdir()
    (root / "self").symlink_to("1")
    for pid, spec in processes.items():
        base = root / str(pid)
        base.mkdir()
        if spec.get("fds") is not None:
            (base / "fd").mkdir()
            for fd, target in spec["fds"].items():
                (base / "fd" / str(fd)).symlink_to(target)
        if "comm" in spec:
            (base / "comm").write_text(spec["comm"] + "\n")
            (base / "cmdline").write_bytes(spec["cmdline"])
            (base / "status").write_text(
                f"Name:\t{spec['comm']}\nUid:\t{spec['uid']}\t{spec['uid']}\t{spec['uid']}\t{spec['uid']}\n")
    return root


def test_map_socket_owners_one_pass(tmp_path):
    proc = make_proc(tmp_path, {
        100: {"fds": {3: "socket:[111]", 4: "socket:[222]", 5: "/dev/null", 6: "socket:[111]"}},
        200: {"fds": {3: "socket:[111]", 4: "pipe:[111]"}},
        300: {},                               # exited: no fd directory left
        400: {"fds": {3: "socket:[999]"}},     # a socket of another network namespace
    })
    owners = listeners.map_socket_owners({111, 222, 333}, str(proc))
    assert owners == {111: [100, 200], 222: [100]}
    assert listeners.map_socket_owners(set(), str(proc)) == {}


def test_read_process(tmp_path):
    proc = make_proc(tmp_path, {
        42: {"fds": {}, "comm": "nginx", "cmdline": b"nginx: master\0-g\0daemon off;\0", "uid": 33},
        43: {"fds": {}},                       # gone between the fd scan and this read
    })
    assert listeners.read_process(42, str(proc)) == {
        "name": "nginx", "cmdline": "nginx: master -g daemon off;", "uid": 33}
    assert listeners.read_process(43, str(proc)) is None
    assert listeners.read_process(44, str(proc)) is None


def record(port, inode, protocol="tcp", address="0.0.0.0", uid=0):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return SocketRecord(protocol, family, port, socket.inet_pton(family, address), 0, inode, uid,
                        False if family == socket.AF_INET6 else None)


def test_build_listeners_owners_and_vanished_processes():
    records = [record(22, 1), record(80, 2), record(53, 3, "udp"), record(9000, 4, uid=65534)]
    owners = {1: [10], 2: [20, 21], 3: [30]}
    processes = {
        10: {"name": "sshd", "cmdline": "sshd -D", "uid": 0},
        20: {"name": "nginx", "cmdline": "nginx: master", "uid": 0},
        21: {"name": "nginx", "cmdline": "nginx: worker", "uid": 33},
        30: None,                              # vanished before its details were read
    }
    found = {item["port"]: item for item in listeners.build_listeners(records, owners, processes)}
    assert (found[22]["pid"], found[22]["name"], found[22]["user"]) == (10, "sshd", "root")
    assert (found[80]["pid"], found[80]["pids"], found[80]["cmdline"]) == (20, [20, 21], "nginx: master")
    assert (found[53]["pid"], found[53]["pids"], found[53]["name"]) == (None, [], None)
    # No process in this pid namespace holds it: the socket's creator is the user.
    assert (found[9000]["pid"], found[9000]["uid"], found[9000]["user"]) == (None, 65534, "nobody")


def test_build_listeners_is_sorted_deduplicated_and_order_independent():
    records = [record(443, 5), record(22, 1, address="::"), record(22, 2), record(53, 3, "udp"),
               record(22, 4, address="127.0.0.1"), record(22, 2)]
    expected = listeners.build_listeners(records, None, {})
    assert [(item["protocol"], item["family"], item["port"], item["address"]) for item in expected] == [
        ("tcp", "ipv4", 22, "0.0.0.0"), ("tcp", "ipv4", 22, "127.0.0.1"), ("tcp", "ipv4", 443, "0.0.0.0"),
        ("tcp", "ipv6", 22, "::"), ("udp", "ipv4", 53, "0.0.0.0")]
    for seed in range(5):
        random.Random(seed).shuffle(records)
        assert listeners.build_listeners(records, None, {}) == expected


def copy_proc_net(proc):
    (proc / "net").mkdir()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        shutil.copy(FIXTURES / f"proc_net_{name}.txt", proc / "net" / name)


def test_collect_listeners_from_proc_end_to_end(tmp_path):
    inodes = {rec.port: rec.inode for rec in proc_records()}
    proc = make_proc(tmp_path, {
        7: {"fds": {3: f"socket:[{inodes[8080]}]", 4: f"socket:[{inodes[5353]}]"},
            "comm": "daemon", "cmdline": b"/usr/sbin/daemon\0--foreground\0", "uid": 0},
    })
    copy_proc_net(proc)
    found = listeners.collect_listeners(source="proc", proc=str(proc))
    assert sorted(map(summary, found)) == sorted(map(summary, EXPECTED))
    owned = {(item["protocol"], item["port"]): item for item in found if item["pid"]}
    assert set(owned) == {("tcp", 8080), ("udp", 5353)}
    assert owned[("tcp", 8080)]["cmdline"] == "/usr/sbin/daemon --foreground"
    only_tcp = listeners.collect_listeners(["tcp"], include_process=False, source="proc", proc=str(proc))
    assert {item["protocol"] for item in only_tcp} == {"tcp"}
    assert all(item["pid"] is None for item in only_tcp)


def test_auto_falls_back_to_proc_when_netlink_is_refused(tmp_path, monkeypatch):
    def refuse(family, protocol):
        raise NetlinkUnavailable("no udp_diag")
    monkeypatch.setattr(sockets, "read_sock_diag", refuse)
    proc = make_proc(tmp_path, {})
    copy_proc_net(proc)
    assert len(sockets.read_sockets(source="auto", proc=str(proc))) == len(EXPECTED)
    with pytest.raises(NetlinkUnavailable):
        sockets.read_sockets(source="netlink", proc=str(proc))


def test_missing_proc_net_files(tmp_path):
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "tcp").write_text((FIXTURES / "proc_net_tcp.txt").read_text())
    # No tcp6: IPv6 disabled at boot. No tcp listening sockets lost either way.
    assert sockets.read_proc_net(socket.AF_INET6, "tcp", str(proc)) == []
    assert len(sockets.read_proc_net(socket.AF_INET, "tcp", str(proc))) == 3
    with pytest.raises(ListenerError, match="net/udp"):
        sockets.read_proc_net(socket.AF_INET, "udp", str(proc))


def test_bad_arguments():
    with pytest.raises(ValueError, match="sctp"):
        sockets.read_sockets(["sctp"], source="proc")
    with pytest.raises(ValueError, match="ss"):
        sockets.read_sockets(source="ss")


@pytest.mark.parametrize(("raw", "line"), [
    (b"/usr/bin/python3\0-m\0http.server\0", "/usr/bin/python3 -m http.server"),
    (b"nginx: worker process\0\0\0", "nginx: worker process"),   # rewritten argv, padded
    (b"", ""),                                                  # kernel thread
])
def test_parse_cmdline(raw, line):
    assert listeners.parse_cmdline(raw) == line


def test_parse_status_uid_takes_the_effective_uid():
    assert listeners.parse_status_uid("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n") == 0
    assert listeners.parse_status_uid("Name:\tx\n") is None
