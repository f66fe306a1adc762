"""The listening sockets of this network namespace, read from the kernel.

Sockets come from netlink ``NETLINK_SOCK_DIAG`` (one dump per family and
protocol), or, where the kernel refuses that, from ``/proc/net/{tcp,tcp6,udp,udp6}``.
What counts as listening is said in listeners.py. The parsers
(``parse_sock_diag``, ``parse_proc_net``) are plain functions over bytes or
text, tested on captured input; ``read_sock_diag``, ``read_proc_net`` and
``read_sockets`` read the live system.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import NamedTuple

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    PortguardError,
)

PROTOCOLS = ("tcp", "udp")
SOURCES = ("auto", "netlink", "proc")

# Kernel socket states (include/net/tcp_states.h), shared by TCP and UDP.
_TCP_CLOSE = 7
_TCP_LISTEN = 10
# The state a socket must be in to count as listening, per protocol.
_LISTEN_STATE = {"tcp": _TCP_LISTEN, "udp": _TCP_CLOSE}
_IPPROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
FAMILY_NAME = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_PROC_FILE = {
    ("tcp", socket.AF_INET): "tcp",
    ("tcp", socket.AF_INET6): "tcp6",
    ("udp", socket.AF_INET): "udp",
    ("udp", socket.AF_INET6): "udp6",
}

# Netlink constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_INET_DIAG_SKV6ONLY = 11

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
_REQ_V2 = struct.Struct("=BBBxI48x")
# nlmsghdr (length, type) followed by the inet_diag_msg fields that matter:
# family, state, source port (big-endian), source address, ifindex, uid, inode.
_DIAG_MSG = struct.Struct("=IH10xBB2x2s2x16s16xI8x12xII")
_DIAG_MSG_END = _NLMSGHDR.size + 72
_RTATTR = struct.Struct("=HH")
# The kernel fills at most about 32 KiB per read of a dump.
_RECV_SIZE = 65536
# A dump is fast even with many sockets (docs/benchmarks.md): a kernel silent this long means a broken path.
_RECV_TIMEOUT = 10


class SocketRecord(NamedTuple):
    """A listening socket as the kernel reports it; field order is the sort order."""

    protocol: str
    family: int
    port: int
    address: bytes
    ifindex: int
    inode: int
    uid: int
    v6only: bool | None


# Building a record in the hot loops without the Python-level __new__ call.
_record = tuple.__new__


class ListenerError(PortguardError):
    """The listening sockets could not be read at all."""


class NetlinkUnavailable(ListenerError):
    """sock_diag refused a dump (no diag support for that protocol, sandbox, ...)."""


def build_sock_diag_request(family: int, protocol: str, seq: int = 1) -> bytes:
    """The netlink message that dumps the listening sockets of one family and protocol."""
    body = _REQ_V2.pack(family, _IPPROTO[protocol], 0, 1 << _LISTEN_STATE[protocol])
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
    )
    return header + body


def parse_sock_diag(data: bytes, protocol: str) -> tuple[list[SocketRecord], bool]:
    """Parse a chunk of sock_diag dump replies into socket records.

    Returns the records and whether the dump is complete (``NLMSG_DONE`` seen).
    Records whose state is not the listening state of ``protocol`` are dropped
    (the kernel already filters on the requested states; this keeps the parser
    honest on captured input).
    """
    records = []
    append = records.append
    unpack_msg = _DIAG_MSG.unpack_from
    unpack_attr = _RTATTR.unpack_from
    want_state = _LISTEN_STATE[protocol]
    af_inet6 = socket.AF_INET6
    offset = 0
    end = len(data)
    while offset + _NLMSGHDR.size <= end:
        length, msg_type = _NLMSGHDR.unpack_from(data, offset)[:2]
        msg_end = offset + length
        if length < _NLMSGHDR.size or msg_end > end:
            raise ListenerError(f"truncated netlink message at offset {offset}")
        if msg_type == _NLMSG_DONE:
            return records, True
        if msg_type == _NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
            raise NetlinkUnavailable(f"sock_diag refused the dump: {os.strerror(-errno)}")
        if msg_type != SOCK_DIAG_BY_FAMILY or length < _DIAG_MSG_END:
            raise ListenerError(f"unexpected netlink message type {msg_type} at offset {offset}")
        _len, _type, family, state, sport, src, ifindex, uid, inode = unpack_msg(data, offset)
        if state == want_state:
            v6only = None
            if family == af_inet6:
                attr = offset + _DIAG_MSG_END
                while attr + 4 < msg_end:
                    attr_len, attr_type = unpack_attr(data, attr)
                    if attr_type == _INET_DIAG_SKV6ONLY:
                        v6only = data[attr + 4] != 0
                        break
                    if attr_len < 4:
                        break
                    attr += (attr_len + 3) & ~3
            else:
                src = src[:4]
            append(_record(SocketRecord, (protocol, family, (sport[0] << 8) | sport[1], src,
                                          ifindex, inode, uid, v6only)))
        offset += (length + 3) & ~3
    return records, False


def read_sock_diag(family: int, protocol: str) -> list[SocketRecord]:
    """Dump the listening sockets of one family and protocol over netlink."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise NetlinkUnavailable(f"cannot open a sock_diag socket: {exc}") from exc
    with sock:
        sock.settimeout(_RECV_TIMEOUT)
        try:
            sock.send(build_sock_diag_request(family, protocol))
            records = []
            while True:
                chunk = sock.recv(_RECV_SIZE)
                if not chunk:
                    raise NetlinkUnavailable("sock_diag closed the dump early")
                part, done = parse_sock_diag(chunk, protocol)
                records.extend(part)
                if done:
                    return records
        except OSError as exc:
            raise NetlinkUnavailable(f"sock_diag dump failed: {exc}") from exc


def _hex_to_address(text: str) -> bytes:
    """/proc/net prints an address as 32-bit words, each in host byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "big":
        return raw
    return b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))


def parse_proc_net(text: str, protocol: str, family: int) -> list[SocketRecord]:
    """Parse /proc/net/{tcp,tcp6,udp,udp6} into socket records (listening ones only)."""
    records = []
    want_state = _LISTEN_STATE[protocol]
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        if int(fields[3], 16) != want_state:
            continue
        address, port = fields[1].split(":")
        # /proc/net says neither the bound device nor whether an IPv6 socket
        # also accepts IPv4.
        records.append(SocketRecord(protocol, family, int(port, 16), _hex_to_address(address),
                                    0, int(fields[9]), int(fields[7]), None))
    return records


def read_proc_net(family: int, protocol: str, proc: str = "/proc") -> list[SocketRecord]:
    """Listening sockets of one family and protocol from /proc/net."""
    path = f"{proc}/net/{_PROC_FILE[(protocol, family)]}"
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except FileNotFoundError:
        # IPv6 disabled at boot, or no IPv6 in this kernel: no sockets of that family.
        if family == socket.AF_INET6:
            return []
        raise ListenerError(f"cannot read {path}") from None
    except OSError as exc:
        raise ListenerError(f"cannot read {path}: {exc}") from exc
    return parse_proc_net(text, protocol, family)


def read_sockets(protocols=PROTOCOLS, source: str = "auto",
                 proc: str = "/proc") -> list[SocketRecord]:
    """Listening socket records of this network namespace."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}")
    records = []
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        for family in (socket.AF_INET, socket.AF_INET6):
            if source != "proc":
                try:
                    records.extend(read_sock_diag(family, protocol))
                    continue
                except NetlinkUnavailable:
                    if source == "netlink":
                        raise
            records.extend(read_proc_net(family, protocol, proc))
    return records
