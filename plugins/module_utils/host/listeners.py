"""Listening sockets of this host, read from the kernel, with their owning process.

Sockets come from netlink ``NETLINK_SOCK_DIAG`` (one dump per family and
protocol), or, where the kernel refuses that, from ``/proc/net/{tcp,tcp6,udp,udp6}``.
Owners come from one pass over ``/proc/[pid]/fd``. No external command runs.

What counts as listening (the same sockets as ``ss -tuln`` shows):

- TCP: state LISTEN. A TCP socket that is bound but not listening is not in
  the kernel's lookup tables and accepts nothing, so it is not reported.
- UDP: state CLOSE in kernel terms, which for UDP means bound and *not
  connected*: it receives datagrams from any peer (``ss`` prints ``UNCONN``).
  Connected UDP sockets (``ESTAB``) accept datagrams from their one peer only;
  they are clients, not services, and are left out.

Scope: the network namespace of the caller. Processes of this pid namespace
whose sockets live in another network namespace (containers) are scanned
harmlessly: their inodes match none of ours. A listener that no process of
this pid namespace holds is reported with ``pid`` and ``name`` null.

The sockets are read in sockets.py. Here: their owners (``map_socket_owners``,
``read_process``) and the listener dicts (``build_listeners``, which also looks
up user and interface names). The parsers (``parse_cmdline``,
``parse_status_uid``, ``describe_address`` and those of sockets.py) are plain
functions over bytes or text, tested on captured input; ``collect_listeners``
runs the readers.
"""

from __future__ import annotations

import os
import pwd
import socket

from ansible_collections.portguard.hardening.plugins.module_utils.core.printable import escape_bytes
from ansible_collections.portguard.hardening.plugins.module_utils.host.sockets import (
    FAMILY_NAME,
    PROTOCOLS,
    ListenerError,
    SocketRecord,
    read_sockets,
)


def map_socket_owners(inodes: set[int], proc: str = "/proc") -> dict[int, list[int]]:
    """Map each socket inode in ``inodes`` to the sorted pids that hold it open.

    One pass over /proc/[pid]/fd. A process that exits or closes descriptors
    during the pass, or whose descriptors may not be read, is skipped.
    """
    if not inodes:
        return {}
    # Compare link targets as text: cheaper than parsing every socket link.
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners: dict[int, list[int]] = {}
    readlink = os.readlink
    try:
        entries = os.listdir(proc)
    except OSError as exc:
        raise ListenerError(f"cannot list {proc}: {exc}") from exc
    for entry in entries:
        if not entry.isdigit():
            continue
        fd_dir = f"{proc}/{entry}/fd/"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        pid = int(entry)
        for fd in fds:
            try:
                inode = wanted.get(readlink(fd_dir + fd))
            except OSError:
                continue
            if inode is not None:
                pids = owners.setdefault(inode, [])
                if not pids or pids[-1] != pid:
                    pids.append(pid)
    for pids in owners.values():
        pids.sort()
    return owners


def parse_cmdline(raw: bytes) -> str:
    """/proc/[pid]/cmdline (NUL-separated arguments) as one space-separated, display-safe line."""
    return " ".join(escape_bytes(arg) for arg in raw.split(b"\0") if arg)


def parse_status_uid(text: str) -> int | None:
    """The effective uid from /proc/[pid]/status (what ``ps -o user`` shows)."""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    return None


def read_process(pid: int, proc: str = "/proc") -> dict | None:
    """Name, command line and effective uid of a process; None once it has gone.

    Name and command line are chosen by the process's user: they come display-safe (``escape_bytes``).
    """
    base = f"{proc}/{pid}"
    try:
        with open(f"{base}/comm", "rb") as handle:
            # The kernel ends the name with one newline; the name itself may hold more.
            name = escape_bytes(handle.read()[:-1])
        with open(f"{base}/cmdline", "rb") as handle:
            cmdline = parse_cmdline(handle.read())
        with open(f"{base}/status", encoding="utf-8", errors="replace") as handle:
            uid = parse_status_uid(handle.read())
    except OSError:
        # Gone since the fd scan (ENOENT/ESRCH), or not readable: no owner to show.
        return None
    return {"name": name, "cmdline": cmdline, "uid": uid}


def user_name(uid: int) -> str:
    """Login name of ``uid``, or the number as text when it has no passwd entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def interface_name(ifindex: int) -> str:
    """Name of a network interface, or its index as text once it has gone."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return str(ifindex)


_V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"
_V6_LOOPBACK = b"\0" * 15 + b"\1"


def describe_address(family: int, raw: bytes) -> tuple[str, str, bool]:
    """Text form, scope (``wildcard``, ``loopback``, ``specific``) and v4-mapped flag.

    A v4-mapped IPv6 address (``::ffff:127.0.0.1``) keeps that text form and
    takes the scope of the IPv4 address it maps.
    """
    text = socket.inet_ntop(family, raw)
    v4_mapped = family == socket.AF_INET6 and raw[:12] == _V4_MAPPED_PREFIX
    if family == socket.AF_INET or v4_mapped:
        v4 = raw[-4:]
        if v4 == b"\0\0\0\0":
            return text, "wildcard", v4_mapped
        return text, "loopback" if v4[0] == 127 else "specific", v4_mapped
    if raw == b"\0" * 16:
        return text, "wildcard", False
    return text, "loopback" if raw == _V6_LOOPBACK else "specific", False


def build_listeners(records: list[SocketRecord], owners: dict[int, list[int]] | None,
                    processes: dict[int, dict | None]) -> list[dict]:
    """Turn socket records plus owner data into the documented listener dicts.

    ``owners`` maps an inode to its sorted pids (None or empty when process
    lookup was not asked for). ``processes`` maps each of those pids to
    ``read_process`` output, None for a process that vanished.
    Output is sorted by protocol, family, port, address, interface and inode.
    """
    addresses: dict = {}
    interfaces: dict = {}
    users: dict = {}
    listeners = []
    append = listeners.append
    seen = set()
    owners = owners or {}
    gone = {pid for pid, info in processes.items() if info is None}
    for protocol, family, port, raw, ifindex, inode, sock_uid, v6only in sorted(records):
        if (protocol, inode) in seen:
            continue
        seen.add((protocol, inode))
        described = addresses.get((family, raw))
        if described is None:
            described = addresses[(family, raw)] = describe_address(family, raw)
        pids = owners.get(inode)
        if pids and gone:
            pids = [pid for pid in pids if pid not in gone]
        info = processes[pids[0]] if pids else None
        # The process's effective user is the one ``ps`` shows; without a
        # process, the user that created the socket is the best there is.
        uid = sock_uid if info is None or info["uid"] is None else info["uid"]
        user = users.get(uid)
        if user is None:
            user = users[uid] = user_name(uid)
        interface = None
        if ifindex:
            interface = interfaces.get(ifindex)
            if interface is None:
                interface = interfaces[ifindex] = interface_name(ifindex)
        append({
            "protocol": protocol,
            "family": FAMILY_NAME[family],
            "address": described[0],
            "port": port,
            "scope": described[1],
            "v4_mapped": described[2],
            "v6only": v6only,
            "interface": interface,
            "inode": inode,
            "pid": pids[0] if pids else None,
            "pids": pids or [],
            "name": info["name"] if info else None,
            "cmdline": info["cmdline"] if info else None,
            "uid": uid,
            "user": user,
        })
    return listeners


def collect_listeners(protocols=PROTOCOLS, include_process: bool = True,
                      source: str = "auto", proc: str = "/proc") -> list[dict]:
    """Listening TCP and bound, unconnected UDP sockets with their owning processes.

    ``source`` is ``auto`` (netlink, else /proc/net), ``netlink`` or ``proc``.
    """
    records = read_sockets(protocols, source, proc)
    owners = None
    processes: dict[int, dict | None] = {}
    if include_process:
        owners = map_socket_owners({rec.inode for rec in records}, proc)
        for pids in owners.values():
            for pid in pids:
                if pid not in processes:
                    processes[pid] = read_process(pid, proc)
    return build_listeners(records, owners, processes)
