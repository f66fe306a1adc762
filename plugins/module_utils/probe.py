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
import os
import resource
import select
import socket
import struct
import time
from collections import deque

OPEN, CLOSED, FILTERED = "open", "closed", "filtered"
REJECT_ERRNOS = {errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH, errno.EPERM}
PAYLOAD = b"portguard-probe\n"
_LINGER_RST = struct.pack("ii", 1, 0)
# Linux socket options the socket module does not name (linux/in.h, linux/in6.h).
IP_RECVERR = 11
IPV6_RECVERR = 25


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


def probe_ports(targets, *, timeout=1.0, concurrency=None, source=None):
    """Probe ``targets``, ``(address, port, proto[, source])`` tuples; one result dict per target, in order.

    ``source`` is the default source address for targets that name none.
    """
    concurrency = concurrency or default_concurrency()
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
                done = _start(attempt, target[3] if len(target) > 3 and target[3] else source)
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
    for target, result in zip(targets, results):
        result["source"] = target[3] if len(target) > 3 and target[3] else source
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
    if source:
        sock.bind((source, 0))
    attempt.sock = sock
    attempt.sent = time.monotonic()
    try:
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
