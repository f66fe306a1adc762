"""Concurrent TCP/UDP probes that tell open, closed and filtered apart.

One thread, one epoll, non-blocking sockets. Each attempt's timeout counts
from the moment its own packet was sent, and before an attempt is called
filtered its socket is asked once more (connected? an error queued?), so a
prober that falls behind its event loop never turns an answered probe into
"filtered": lag can only make a probe slower, not wrong.

Classification:

- TCP: handshake completes -> ``open``; RST (``ECONNREFUSED``) -> ``closed``;
  ICMP administratively prohibited (``EHOSTUNREACH``/``EACCES``) -> ``filtered``
  (``reason: rejected``); no answer -> ``filtered`` (``reason: timeout``).
- UDP: the payload is echoed -> ``open``; ICMP port unreachable -> ``closed``;
  ICMP prohibited -> ``filtered`` (rejected); no answer -> ``filtered`` (timeout).
"""

import errno
import ipaddress
import math
import os
import resource
import select
import socket
import struct
import time
from collections import deque

from ansible_collections.portguard.hardening.plugins.module_utils.errors import PortguardError

OPEN, CLOSED, FILTERED = "open", "closed", "filtered"
REJECT_ERRNOS = {errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH, errno.EPERM}
PAYLOAD = b"portguard-probe\n"
_LINGER_RST = struct.pack("ii", 1, 0)
# Linux socket options the socket module does not name (linux/in.h, linux/in6.h).
IP_RECVERR = 11
IPV6_RECVERR = 25
# File descriptors left to the rest of the process (Ansible's module glue, stdio) when sizing a run.
FD_RESERVE = 64


class ProbeError(PortguardError):
    """A target or option the prober cannot use; raised before any probe is sent.

    ``errno`` is set when the operating system refused it (a source address that is not local).
    """

    def __init__(self, message: str, error: int | None = None):
        super().__init__(message)
        self.errno = error


def default_concurrency() -> int:
    """In-flight attempts: enough to sweep every port under drop, no more than the CPU and fd limit serve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(16, min(2048 * cpus, soft - 64, 8192))


class _Attempt:
    __slots__ = ("index", "target", "sock", "sent")

    def __init__(self, index, target):
        self.index = index
        self.target = target
        self.sock = None
        self.sent = 0.0


def _result(target, state, reason, rtt=None):
    address, port, proto = target
    return {"address": address, "port": port, "proto": proto, "state": state, "reason": reason,
            "rtt_ms": None if rtt is None else round(rtt * 1000, 2)}


def _family_of(address, cache):
    family = cache.get(address)
    if family is None:
        family = cache[address] = ipaddress.ip_address(address).version
    return family


def check_targets(targets, source=None):
    """Refuse a malformed target (naming its index), before anything is sent; returns each one's source."""
    cache = {}
    sources = []
    for index, target in enumerate(targets):
        where = f"targets[{index}]"
        if not isinstance(target, (tuple, list)) or len(target) not in (3, 4):
            raise ProbeError(f"{where}: a target is (address, port, proto[, source]), got {target!r}")
        address, port, proto = target[:3]
        try:
            family = _family_of(address, cache) if isinstance(address, str) else None
        except ValueError:
            family = None
        if family is None:
            raise ProbeError(f"{where}: bad address {address!r}: expected an IPv4 or IPv6 address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ProbeError(f"{where}: bad port {port!r}: expected an integer from 1 to 65535")
        if proto not in ("tcp", "udp"):
            raise ProbeError(f"{where}: bad proto {proto!r}: expected tcp or udp")
        chosen = (target[3] if len(target) > 3 else None) or source
        if chosen:
            try:
                source_family = _family_of(chosen, cache) if isinstance(chosen, str) else None
            except ValueError:
                source_family = None
            if source_family is None:
                raise ProbeError(f"{where}: bad source {chosen!r}: expected an IPv4 or IPv6 address")
            if source_family != family:
                raise ProbeError(f"{where}: source {chosen} and address {address} are not of the same family")
        sources.append(chosen or None)
    # A source that is not an address of this host fails at bind(): find out now, not halfway through.
    seen = set()
    for index, chosen in enumerate(sources):
        if chosen and chosen not in seen:
            seen.add(chosen)
            kind = socket.AF_INET6 if cache[chosen] == 6 else socket.AF_INET
            with socket.socket(kind, socket.SOCK_DGRAM) as sock:
                try:
                    sock.bind((chosen, 0))
                except OSError as exc:
                    raise ProbeError(f"targets[{index}]: source {chosen} cannot be used here: {exc.strerror}",
                                     exc.errno) from exc
    return sources


def _fd_room():
    """How many more sockets this process may open (soft limit less the descriptors in use and a reserve)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 0
    return max(1, soft - in_use - FD_RESERVE)


def probe_ports(targets, *, timeout=1.0, concurrency=None, source=None):
    """Probe ``targets``, ``(address, port, proto[, source])`` tuples; one result dict per target, in order.

    ``source`` is the default source address for targets that name none. A bad
    target or option raises ``ProbeError`` before anything is sent. The
    concurrency is clamped to the sockets the process may open.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ProbeError(f"bad timeout {timeout!r}: expected a positive number of seconds")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 0):
        raise ProbeError(f"bad concurrency {concurrency!r}: expected a positive integer (0: the default)")
    sources = check_targets(targets, source)
    concurrency = min(concurrency or default_concurrency(), _fd_room())
    results = [None] * len(targets)
    pending = deque(enumerate(targets))
    inflight: dict[int, _Attempt] = {}
    by_age: deque[_Attempt] = deque()  # started in order, so the oldest is always first
    poller = select.epoll()
    try:
        while pending or inflight:
            while pending and len(inflight) < concurrency:
                index, target = pending.popleft()
                attempt = _Attempt(index, tuple(target[:3]))
                done = _start(attempt, sources[index])
                if done is not None:
                    results[index] = done
                    continue
                inflight[attempt.sock.fileno()] = attempt
                by_age.append(attempt)
                events = select.EPOLLOUT if target[2] == "tcp" else select.EPOLLIN | select.EPOLLERR
                poller.register(attempt.sock.fileno(), events)
            while by_age and by_age[0].sock is None:
                by_age.popleft()
            if pending and len(inflight) < concurrency:
                wait = 0
            elif by_age:
                wait = max(0.0, min(by_age[0].sent + timeout - time.monotonic(), 0.05))
            else:
                wait = 0
            for fd, _ in poller.poll(wait):
                attempt = inflight.get(fd)
                if attempt is None:
                    continue
                outcome = _finish(attempt, final=False)
                if outcome is not None:
                    results[attempt.index] = outcome
                    _close(poller, inflight, attempt)
            now = time.monotonic()
            while by_age and (by_age[0].sock is None or now - by_age[0].sent >= timeout):
                attempt = by_age.popleft()
                if attempt.sock is not None:
                    results[attempt.index] = _finish(attempt, final=True)
                    _close(poller, inflight, attempt)
    finally:
        for attempt in list(inflight.values()):
            _close(poller, inflight, attempt)
        poller.close()
    for chosen, result in zip(sources, results):
        result["source"] = chosen
    return results


def _start(attempt, source):
    address, port, proto = attempt.target
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    if proto == "tcp":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    # ICMP errors become hard errors at once, even one that arrives during the connect() call itself.
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    attempt.sock = sock
    attempt.sent = time.monotonic()
    try:
        if source:
            sock.bind((source, 0))
        if proto == "tcp":
            error = sock.connect_ex((address, port))
            if error not in (0, errno.EINPROGRESS):
                sock.close()
                return _classify_error(attempt.target, error, attempt.sent)
        else:
            sock.connect((address, port))
            sock.send(PAYLOAD)
    except OSError as exc:
        sock.close()
        return _classify_error(attempt.target, exc.errno, attempt.sent)
    return None


def _classify_error(target, error, sent):
    rtt = time.monotonic() - sent
    if error == errno.ECONNREFUSED:
        return _result(target, CLOSED, "refused" if target[2] == "tcp" else "port-unreachable", rtt)
    if error in REJECT_ERRNOS:
        return _result(target, FILTERED, "rejected", rtt)
    return _result(target, FILTERED, f"error: {errno.errorcode.get(error, error)}", rtt)


def _finish(attempt, final):
    """The outcome if the socket has one; on the final check, a timeout is the outcome."""
    sock, target = attempt.sock, attempt.target
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        return _classify_error(target, error, attempt.sent)
    if target[2] == "tcp":
        try:
            sock.getpeername()
            return _result(target, OPEN, "handshake", time.monotonic() - attempt.sent)
        except OSError:
            pass
    else:
        try:
            data = sock.recv(4096)
            if data:
                return _result(target, OPEN, "echo", time.monotonic() - attempt.sent)
        except BlockingIOError:
            pass
        except OSError as exc:
            return _classify_error(target, exc.errno, attempt.sent)
    if final:
        return _result(target, FILTERED, "timeout")
    return None


def _close(poller, inflight, attempt):
    fd = attempt.sock.fileno()
    inflight.pop(fd, None)
    try:
        poller.unregister(fd)
    except (OSError, ValueError):
        pass
    attempt.sock.close()
    attempt.sock = None
