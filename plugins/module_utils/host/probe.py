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
- UDP: any answer (the temporary listener's reply, or a service's) -> ``open``;
  ICMP port unreachable -> ``closed``; ICMP prohibited -> ``filtered`` (rejected);
  no answer -> ``filtered`` (timeout).

The UDP request is ``REQUEST_MAGIC`` plus a random nonce; the temporary
listener answers only that exact form, with ``REPLY_MAGIC`` plus the nonce. A
reply is never a request, so two listeners cannot bounce a datagram between
them (see plugins/modules/temp_listener.py). The listener does not answer a
datagram from a port it serves, so a UDP probe never comes from a port that
the same run probes over UDP.
"""

import errno
import ipaddress
import itertools
import math
import os
import select
import socket
import struct
import time
from collections import deque

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.host.probe_limits import (
    FileLimit,
    default_concurrency,
)

OPEN, CLOSED, FILTERED = "open", "closed", "filtered"
REJECT_ERRNOS = {errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH, errno.EPERM}
# The UDP request and the listener's reply: same length, different magic, so a reply is never a request.
REQUEST_MAGIC = b"portguard-probe?"
REPLY_MAGIC = b"portguard-probe!"
NONCE_BYTES = 16
REQUEST_BYTES = len(REQUEST_MAGIC) + NONCE_BYTES
# The most targets one call may probe: a full TCP sweep of two addresses (IPv4 and IPv6 of one host).
MAX_TARGETS = 2 * 65536
_LINGER_RST = struct.pack("ii", 1, 0)
# Linux socket options the socket module does not name (linux/in.h, linux/in6.h).
IP_RECVERR = 11
IPV6_RECVERR = 25
IP_BIND_ADDRESS_NO_PORT = 24
SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0o4000)
# Attempts started between two looks at the answers.
START_BATCH = 512


class ProbeError(PortguardError):
    """A target or option the prober cannot use; raised before any probe is sent.

    ``errno`` is set when the operating system refused it (a source address that is not local).
    """

    def __init__(self, message, error=None):
        super().__init__(message)
        self.errno = error


def udp_request() -> bytes:
    """A UDP probe: the magic and a fresh nonce (the temporary listener answers nothing else)."""
    return REQUEST_MAGIC + os.urandom(NONCE_BYTES)


class _Attempt:
    __slots__ = ("index", "target", "tcp", "sock", "sent", "connected")

    def __init__(self, index, target):
        self.index = index
        self.target = target
        self.tcp = target[2] == "tcp"
        self.sock = None
        self.sent = 0.0
        self.connected = False


def _result(target, state, reason, rtt=None):
    address, port, proto = target
    return {"address": address, "port": port, "proto": proto, "state": state, "reason": reason,
            "rtt_ms": None if rtt is None else round(rtt * 1000, 2)}


def _family_of(address, cache):
    """4 or 6, or None for anything that is not an IP address in text form."""
    if not isinstance(address, str):
        return None
    family = cache.get(address)
    if family is None:
        try:
            family = cache[address] = ipaddress.ip_address(address).version
        except ValueError:
            return None
    return family


def check_targets(targets, source=None):
    """Refuse a malformed target (naming its index) before anything is sent; ``(family, source)`` per target."""
    cache = {}
    plan = []
    for index, target in enumerate(targets):
        where = f"targets[{index}]"
        if not isinstance(target, (tuple, list)) or len(target) not in (3, 4):
            raise ProbeError(f"{where}: a target is (address, port, proto[, source]), got {target!r}")
        address, port, proto = target[:3]
        family = _family_of(address, cache)
        if family is None:
            raise ProbeError(f"{where}: bad address {address!r}: expected an IPv4 or IPv6 address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ProbeError(f"{where}: bad port {port!r}: expected an integer from 1 to 65535")
        if proto not in ("tcp", "udp"):
            raise ProbeError(f"{where}: bad proto {proto!r}: expected tcp or udp")
        chosen = (target[3] if len(target) > 3 else None) or source
        if chosen:
            source_family = _family_of(chosen, cache)
            if source_family is None:
                raise ProbeError(f"{where}: bad source {chosen!r}: expected an IPv4 or IPv6 address")
            if source_family != family:
                raise ProbeError(f"{where}: source {chosen} and address {address} are not of the same family")
        plan.append((socket.AF_INET6 if family == 6 else socket.AF_INET, chosen or None))
    # A source that is not an address of this host fails at bind(): find out now, not halfway through.
    seen = set()
    for index, (family, chosen) in enumerate(plan):
        if chosen and chosen not in seen:
            seen.add(chosen)
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                try:
                    sock.bind((chosen, 0))
                except OSError as exc:
                    raise ProbeError(f"targets[{index}]: source {chosen} cannot be used here: {exc.strerror}",
                                     exc.errno) from exc
    return plan


def probe_ports(targets, *, timeout=1.0, concurrency=None, source=None):
    """Probe ``targets``, ``(address, port, proto[, source])`` tuples; one result dict per target, in order.

    ``targets`` may be any iterable (a generator is read lazily): more than
    ``MAX_TARGETS`` raise ``ProbeError`` before more than that are held in memory.

    ``source`` is the default source address for targets that name none. A bad
    target or option raises ``ProbeError`` before anything is sent. The
    concurrency is clamped to the sockets the process may open.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ProbeError(f"bad timeout {timeout!r}: expected a positive number of seconds")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 0):
        raise ProbeError(f"bad concurrency {concurrency!r}: expected a positive integer (0: the default)")
    targets = list(itertools.islice(targets, MAX_TARGETS + 1))
    if len(targets) > MAX_TARGETS:
        raise ProbeError(f"more than {MAX_TARGETS} targets in one call: split them over several calls")
    plan = check_targets(targets, source)
    with FileLimit(concurrency or default_concurrency()) as limit:
        # The temporary listener never answers a datagram from a port it serves: no UDP probe may come from
        # a port that this run probes over UDP (a port the listener may serve), or it would look filtered.
        avoid = {target[1] for target in targets if target[2] == "udp"}
        results = _run(targets, plan, timeout, min(limit.wanted, limit.room), avoid)
    for (_family, chosen), result in zip(plan, results):
        result["source"] = chosen
    return results


def _run(targets, plan, timeout, concurrency, avoid):
    count = len(targets)
    results = [None] * count
    following = 0
    inflight: dict[int, _Attempt] = {}
    by_age: deque[_Attempt] = deque()  # started in order, same timeout: the oldest deadline is always first
    poller = select.epoll()
    tcp_events, udp_events = select.EPOLLOUT, select.EPOLLIN
    error_events = select.EPOLLERR | select.EPOLLHUP
    try:
        while following < count or inflight:
            # Start in batches, so that answers are read while a large wave is still being sent.
            batch = START_BATCH
            while following < count and len(inflight) < concurrency and batch:
                batch -= 1
                family, chosen = plan[following]
                attempt = _Attempt(following, tuple(targets[following][:3]))
                try:
                    done = _start(attempt, family, chosen, avoid)
                except _OutOfSockets:
                    if not inflight:
                        raise ProbeError(f"targets[{following}]: no socket can be opened (open-file limit)") from None
                    concurrency = len(inflight)  # the process limit is lower than we thought: stay under it
                    break
                following += 1
                if done is not None:
                    results[attempt.index] = done
                    continue
                fd = attempt.sock.fileno()
                inflight[fd] = attempt
                by_age.append(attempt)
                poller.register(fd, tcp_events if attempt.tcp else udp_events)
            while by_age and by_age[0].sock is None:
                by_age.popleft()
            if following < count and len(inflight) < concurrency:
                wait = 0
            elif by_age:
                wait = max(0.0, by_age[0].sent + timeout - time.monotonic())
            else:
                wait = 0
            for fd, events in poller.poll(wait):
                attempt = inflight.get(fd)
                if attempt is None:
                    continue
                if attempt.tcp and not events & error_events:
                    # Writable and no error: the handshake completed (a connecting socket is never writable).
                    attempt.connected = True
                    outcome = _result(attempt.target, OPEN, "handshake", time.monotonic() - attempt.sent)
                else:
                    outcome = _finish(attempt, final=False)
                if outcome is not None:
                    results[attempt.index] = outcome
                    _close(inflight, attempt)
            # Past its deadline, a probe's socket is asked once more: an answer that came in while the
            # loop lagged still counts; only a socket with nothing to say is a timeout.
            now = time.monotonic()
            while by_age and (by_age[0].sock is None or now - by_age[0].sent >= timeout):
                attempt = by_age.popleft()
                if attempt.sock is not None:
                    results[attempt.index] = _finish(attempt, final=True)
                    _close(inflight, attempt)
    finally:
        for attempt in list(inflight.values()):
            _close(inflight, attempt)
        poller.close()
    return results


class _OutOfSockets(Exception):
    """socket() failed for want of file descriptors or memory: wait for sockets in flight to close."""


_OUT_OF_SOCKETS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def _start(attempt, family, source, avoid):
    """Send the attempt's first packet; returns a result when it is known at once, else None (in flight).

    A UDP attempt's source port is never one of ``avoid``.
    """
    address, port = attempt.target[:2]
    try:
        sock = socket.socket(family, (socket.SOCK_STREAM if attempt.tcp else socket.SOCK_DGRAM) | SOCK_NONBLOCK)
    except OSError as exc:
        if exc.errno in _OUT_OF_SOCKETS:
            raise _OutOfSockets() from exc
        raise ProbeError(f"targets[{attempt.index}]: cannot open a socket: {exc.strerror}", exc.errno) from exc
    attempt.sock = sock
    try:
        _recverr(sock, family)
        if source:
            if attempt.tcp:
                # The source port is picked at connect(), per destination: thousands of probes from one
                # source address would otherwise run out of ports at bind().
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        attempt.sent = time.monotonic()
        if not attempt.tcp:
            sock.connect((address, port))
            if sock.getsockname()[1] in avoid:
                sock = attempt.sock = _udp_from_another_port(sock, family, source, (address, port), avoid)
            sock.send(udp_request())
            return None
        error = sock.connect_ex((address, port))
        if error == errno.EINPROGRESS:
            return None
        if error == 0:
            attempt.connected = True
            result = _result(attempt.target, OPEN, "handshake", time.monotonic() - attempt.sent)
        else:
            result = _classify_error(attempt.target, error, attempt.sent)
    except OSError as exc:
        result = _classify_error(attempt.target, exc.errno, attempt.sent or time.monotonic())
    _close(None, attempt)
    return result


def _recverr(sock, family):
    """ICMP errors become hard errors at once, even one that arrives during the connect() call itself."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def _udp_from_another_port(sock, family, source, peer, avoid, tries=8):
    """A UDP socket connected to ``peer`` like ``sock``, from a source port not in ``avoid`` (after ``tries``, the last).

    Each unwanted socket stays open until the end, so that the kernel picks another port every time.
    """
    held = [sock]
    try:
        for _try in range(tries):
            fresh = socket.socket(family, socket.SOCK_DGRAM | SOCK_NONBLOCK)
            held.append(fresh)
            _recverr(fresh, family)
            if source:
                fresh.bind((source, 0))
            fresh.connect(peer)
            if fresh.getsockname()[1] not in avoid:
                break
        return held.pop()
    finally:
        for other in held:
            other.close()


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
    if attempt.tcp:
        try:
            sock.getpeername()
            attempt.connected = True
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


def _close(inflight, attempt):
    """Close the attempt's socket (closing also takes it out of the epoll set)."""
    sock = attempt.sock
    if sock is None:
        return
    if inflight is not None:
        inflight.pop(sock.fileno(), None)
    if attempt.connected:
        # Reset, not FIN: no TIME_WAIT on the prober, no half-closed connection left to the service.
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    sock.close()
    attempt.sock = None
