"""The prober on loopback, without root: real sockets, real answers.

Open and closed come from real listeners and free ports; filtered without a
firewall comes from silence: a UDP socket that never answers, and a TCP
listener whose accept queue is full (Linux then drops further SYNs). The
overload tests make the event loop lag on purpose (every poll first sleeps
longer than the timeout) and check that lag only makes probes slower, never
wrong.
"""

import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.host import probe as probe_mod
from ansible_collections.portguard.hardening.plugins.module_utils.host import probe_limits
from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import (
    CLOSED,
    FILTERED,
    OPEN,
    ProbeError,
    probe_ports,
)
from ansible_collections.portguard.hardening.plugins.module_utils.host.probe_limits import default_concurrency

V4, V6 = "127.0.0.1", "::1"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind((V6, 0))
        return True
    except OSError:
        return False


HAS_V6 = _has_ipv6_loopback()
FAMILIES = [V4, pytest.param(V6, marks=pytest.mark.skipif(not HAS_V6, reason="no IPv6 loopback (::1) here"))]


def family(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def free_port(address, kind=socket.SOCK_STREAM) -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(family(address), kind) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class TcpListener:
    """Accepts and closes connections in a thread; remembers the peers' addresses."""

    def __init__(self, address, backlog=128):
        self.sock = socket.socket(family(address))
        self.sock.bind((address, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.peers = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            conn.close()

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(2)


class UdpEcho:
    """Echoes every datagram (``echo=False``: reads and never answers)."""

    def __init__(self, address, echo=True):
        self.sock = socket.socket(family(address), socket.SOCK_DGRAM)
        self.sock.bind((address, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.peers = []
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[0])
            if self.echo:
                self.sock.sendto(data, peer)

    def close(self):
        self.stopped = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def servers():
    """``servers(kind, address, **options)``: a started server, closed after the test."""
    started = []

    def start(kind, address, **options):
        server = kind(address, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@contextlib.contextmanager
def full_accept_queue(address):
    """A TCP listener that silently drops new SYNs: backlog 0 holds one connection, which we fill."""
    listener = socket.socket(family(address))
    listener.bind((address, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _filler in range(2):
            filler = socket.socket(family(address))
            filler.setblocking(False)
            filler.connect_ex((address, port))
            fillers.append(filler)
        time.sleep(0.05)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def states(results):
    return [(r["address"], r["port"], r["proto"], r["state"], r["reason"]) for r in results]


# Classification -------------------------------------------------------------------


@pytest.mark.parametrize("address", FAMILIES)
def test_tcp_open_and_closed(servers, address):
    listener = servers(TcpListener, address)
    closed = free_port(address)
    results = probe_ports([(address, listener.port, "tcp"), (address, closed, "tcp")], timeout=2)
    assert states(results) == [(address, listener.port, "tcp", OPEN, "handshake"),
                               (address, closed, "tcp", CLOSED, "refused")]
    assert all(r["rtt_ms"] is not None and r["rtt_ms"] < 2000 for r in results)


@pytest.mark.parametrize("address", FAMILIES)
def test_udp_echo_is_open_and_port_unreachable_is_closed(servers, address):
    echo = servers(UdpEcho, address)
    closed = free_port(address, socket.SOCK_DGRAM)
    results = probe_ports([(address, echo.port, "udp"), (address, closed, "udp")], timeout=2)
    assert states(results) == [(address, echo.port, "udp", OPEN, "echo"),
                               (address, closed, "udp", CLOSED, "port-unreachable")]


@pytest.mark.parametrize("address", FAMILIES)
def test_silence_is_filtered_by_timeout(servers, address):
    mute = servers(UdpEcho, address, echo=False)
    with full_accept_queue(address) as port:
        started = time.monotonic()
        results = probe_ports([(address, port, "tcp"), (address, mute.port, "udp")], timeout=0.3)
        elapsed = time.monotonic() - started
    assert states(results) == [(address, port, "tcp", FILTERED, "timeout"),
                               (address, mute.port, "udp", FILTERED, "timeout")]
    assert all(r["rtt_ms"] is None for r in results)
    assert mute.peers, "the UDP probe was not even sent"
    # Both waited in parallel, about one timeout.
    assert 0.3 <= elapsed < 1.5


def test_results_follow_the_order_of_the_targets(servers):
    tcp4, udp4 = servers(TcpListener, V4), servers(UdpEcho, V4)
    closed = free_port(V4)
    targets = [(V4, closed, "tcp"), (V4, udp4.port, "udp"), (V4, tcp4.port, "tcp"), (V4, closed, "tcp"),
               (V4, tcp4.port, "tcp")]
    expected = [CLOSED, OPEN, OPEN, CLOSED, OPEN]
    if HAS_V6:
        tcp6 = servers(TcpListener, V6)
        targets[2:2] = [(V6, tcp6.port, "tcp"), (V6, free_port(V6), "tcp")]
        expected[2:2] = [OPEN, CLOSED]
    # Many more targets than the concurrency: results come back in target order, not in answer order.
    many = targets * 20
    results = probe_ports(many, timeout=2, concurrency=3)
    assert [(r["address"], r["port"], r["proto"]) for r in results] == [tuple(t) for t in many]
    assert [r["state"] for r in results] == expected * 20


def test_lists_are_targets_too(servers):
    listener = servers(TcpListener, V4)
    results = probe_ports([[V4, listener.port, "tcp"], [V4, listener.port, "tcp", None]], timeout=2)
    assert [r["state"] for r in results] == [OPEN, OPEN]


def test_empty_target_list():
    assert probe_ports([], timeout=0.1) == []


# Source addresses -----------------------------------------------------------------


def test_source_per_target_and_default(servers):
    """127.0.0.0/8 is all local on Linux: probes can come from 127.0.0.2 and 127.0.0.3."""
    listener = servers(TcpListener, V4)
    echo = servers(UdpEcho, V4)
    targets = [(V4, listener.port, "tcp", "127.0.0.2"), (V4, listener.port, "tcp"),
               (V4, echo.port, "udp", "127.0.0.2"), (V4, echo.port, "udp", None)]
    results = probe_ports(targets, timeout=2, source="127.0.0.3")
    assert [r["state"] for r in results] == [OPEN] * 4
    assert [r["source"] for r in results] == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]
    deadline = time.monotonic() + 2
    while len(listener.peers) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(listener.peers) == ["127.0.0.2", "127.0.0.3"]
    assert echo.peers == ["127.0.0.2", "127.0.0.3"]


def test_no_source_lets_the_routing_table_choose(servers):
    listener = servers(TcpListener, V4)
    [result] = probe_ports([(V4, listener.port, "tcp")], timeout=2)
    assert result["source"] is None and result["state"] == OPEN


# Concurrency ----------------------------------------------------------------------


def _module_like(module, **replaced):
    """A stand-in for ``module`` (socket, select) with some names replaced, for the prober only."""
    fake = types.ModuleType(module.__name__)
    fake.__dict__.update(module.__dict__)
    fake.__dict__.update(replaced)
    return fake


def test_concurrency_cap_is_honoured(servers, monkeypatch):
    mute = servers(UdpEcho, V4, echo=False)

    class Counting(socket.socket):
        live = peak = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            Counting.live += 1
            Counting.peak = max(Counting.peak, Counting.live)

        def close(self):
            if self.fileno() != -1:
                Counting.live -= 1
            super().close()

    monkeypatch.setattr(probe_mod, "socket", _module_like(socket, socket=Counting))
    started = time.monotonic()
    results = probe_ports([(V4, mute.port, "udp")] * 12, timeout=0.2, concurrency=4)
    elapsed = time.monotonic() - started
    assert [r["state"] for r in results] == [FILTERED] * 12
    assert (Counting.peak, Counting.live) == (4, 0)
    # Three waves of four silent probes, one timeout each.
    assert elapsed >= 0.6


def test_default_concurrency_respects_the_open_file_limit(monkeypatch):
    monkeypatch.setattr(probe_limits.resource, "getrlimit", lambda _: (200, 200))
    assert default_concurrency() == 200 - probe_limits.FD_RESERVE
    monkeypatch.setattr(probe_limits.resource, "getrlimit", lambda _: (1024, 1 << 20))
    # A low soft limit is no cap: the run raises it up to the hard limit.
    assert default_concurrency() == min(probe_limits.PER_CPU * probe_limits._cpus(), probe_limits.MAX_CONCURRENCY)
    monkeypatch.setattr(probe_limits.resource, "getrlimit", lambda _: (20, 20))
    assert default_concurrency() == 16


def test_a_run_never_holds_more_sockets_than_the_file_limit_allows(servers):
    """A concurrency above what the process may open is clamped, not an EMFILE crash."""
    mute = servers(UdpEcho, V4, echo=False)
    soft = probe_limits.resource.getrlimit(probe_limits.resource.RLIMIT_NOFILE)[0]
    results = probe_ports([(V4, mute.port, "udp")] * 40, timeout=0.1, concurrency=soft * 4)
    assert [r["state"] for r in results] == [FILTERED] * 40


# Overload: lag makes probes slower, never wrong ---------------------------------------


def _lagging_select(lag):
    class Lagging:
        def __init__(self):
            self._real = select.epoll()

        def __getattr__(self, name):
            return getattr(self._real, name)

        def poll(self, timeout=-1, maxevents=-1):
            time.sleep(lag)  # the prober was descheduled: every deadline passes before it looks
            return self._real.poll(timeout, maxevents)

    return _module_like(select, epoll=Lagging)


@pytest.mark.parametrize("address", FAMILIES)
def test_a_lagging_loop_never_reports_answered_probes_as_filtered(servers, monkeypatch, address):
    tcp, udp, mute = servers(TcpListener, address), servers(UdpEcho, address), servers(UdpEcho, address, echo=False)
    closed_tcp, closed_udp = free_port(address), free_port(address, socket.SOCK_DGRAM)
    targets = [(address, tcp.port, "tcp"), (address, closed_tcp, "tcp"), (address, udp.port, "udp"),
               (address, closed_udp, "udp"), (address, mute.port, "udp")] * 4
    monkeypatch.setattr(probe_mod, "select", _lagging_select(0.4))
    results = probe_ports(targets, timeout=0.1, concurrency=7)
    assert [r["state"] for r in results] == [OPEN, CLOSED, OPEN, CLOSED, FILTERED] * 4
    assert [r["reason"] for r in results][:5] == ["handshake", "refused", "echo", "port-unreachable", "timeout"]


def test_timeouts_count_from_each_send_not_from_the_start(servers, monkeypatch):
    """With concurrency 1, each silent probe still gets its whole timeout: the run lasts n timeouts."""
    mute = servers(UdpEcho, V4, echo=False)
    started = time.monotonic()
    results = probe_ports([(V4, mute.port, "udp")] * 4, timeout=0.15, concurrency=1)
    elapsed = time.monotonic() - started
    assert [r["state"] for r in results] == [FILTERED] * 4
    assert elapsed >= 4 * 0.15


# Bad targets ----------------------------------------------------------------------


@pytest.mark.parametrize(("target", "message"), [
    (("not-an-address", 80, "tcp"), "address"),
    (("127.0.0.1", 0, "tcp"), "port"),
    (("127.0.0.1", 65536, "tcp"), "port"),
    (("127.0.0.1", "80", "tcp"), "port"),
    (("127.0.0.1", True, "tcp"), "port"),
    (("127.0.0.1", 80, "icmp"), "proto"),
    (("127.0.0.1", 80, "tcp", "not-a-source"), "source"),
    (("127.0.0.1", 80, "tcp", "::1"), "family"),
    (("127.0.0.1", 80), "target"),
    ("127.0.0.1:80", "target"),
])
def test_bad_targets_are_refused_before_anything_is_sent(servers, target, message):
    listener = servers(TcpListener, V4)
    with pytest.raises(ProbeError, match=message) as caught:
        probe_ports([(V4, listener.port, "tcp"), target], timeout=0.5)
    assert "targets[1]" in str(caught.value)
    assert isinstance(caught.value, PortguardError)
    time.sleep(0.05)
    assert listener.peers == [], "a probe was sent before the bad target was refused"


def test_more_targets_than_one_call_may_probe_are_refused_unread(servers):
    """A generator of 2 x MAX_TARGETS targets: refused after reading one past the bound, before any probe."""
    listener = servers(TcpListener, V4)
    read = []

    def many():
        for _index in range(2 * probe_mod.MAX_TARGETS):
            read.append(1)
            yield (V4, listener.port, "tcp")

    with pytest.raises(ProbeError, match=f"more than {probe_mod.MAX_TARGETS} targets in one call"):
        probe_ports(many(), timeout=0.5)
    assert len(read) == probe_mod.MAX_TARGETS + 1
    time.sleep(0.05)
    assert listener.peers == [], "a probe was sent before the request was refused"


def test_a_generator_of_targets_is_probed_in_order(servers):
    listener = servers(TcpListener, V4)
    closed = free_port(V4)
    results = probe_ports(((V4, port, "tcp") for port in (listener.port, closed)), timeout=2)
    assert [r["state"] for r in results] == [OPEN, CLOSED]


def test_udp_requests_carry_a_nonce_and_replies_are_never_requests():
    first, second = probe_mod.udp_request(), probe_mod.udp_request()
    assert len(first) == len(second) == probe_mod.REQUEST_BYTES
    assert first.startswith(probe_mod.REQUEST_MAGIC) and first != second
    # The listener answers REPLY_MAGIC + nonce: same length, other magic, so never itself a request.
    assert len(probe_mod.REPLY_MAGIC) == len(probe_mod.REQUEST_MAGIC)
    assert probe_mod.REPLY_MAGIC != probe_mod.REQUEST_MAGIC


def test_a_source_that_is_not_local_fails_the_run_naming_the_target(servers):
    listener = servers(TcpListener, V4)
    with pytest.raises(ProbeError, match=r"targets\[1\].*192\.0\.2\.1") as caught:
        probe_ports([(V4, listener.port, "tcp"), (V4, listener.port, "tcp", "192.0.2.1")], timeout=0.5)
    assert caught.value.errno == errno.EADDRNOTAVAIL


def test_bad_timeout_or_concurrency_is_refused():
    for kwargs in ({"timeout": 0}, {"timeout": -1}, {"concurrency": -3}):
        with pytest.raises(ProbeError):
            probe_ports([(V4, 80, "tcp")], **kwargs)


def test_no_socket_is_left_open(servers):
    listener = servers(TcpListener, V4)
    mute = servers(UdpEcho, V4, echo=False)
    before = len(os.listdir("/proc/self/fd"))
    probe_ports([(V4, listener.port, "tcp"), (V4, mute.port, "udp"), (V4, free_port(V4), "tcp")] * 10,
                timeout=0.1)
    with pytest.raises(ProbeError):
        probe_ports([(V4, listener.port, "tcp"), (V4, listener.port, "tcp", "192.0.2.1")], timeout=0.1)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_low_soft_file_limit_is_raised_for_the_run_and_restored(servers):
    """Ansible sessions often start with a soft limit of 1024: the run raises it (up to the hard limit) and puts it back.

    In a child process, so that pytest's own limit is never touched.
    """
    mute = servers(UdpEcho, V4, echo=False)
    code = f"""
import json, resource, sys, time
sys.path[:0] = {json.dumps([p for p in sys.path if p])}
from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import probe_ports
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard != resource.RLIM_INFINITY and hard < 1200:
    print(json.dumps({{"skip": hard}})); sys.exit()
resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
started = time.monotonic()
results = probe_ports([("{V4}", {mute.port}, "udp")] * 1000, timeout=0.5, concurrency=1000)
print(json.dumps({{"elapsed": time.monotonic() - started, "states": sorted({{r["state"] for r in results}}),
                  "after": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    if "skip" in out:
        pytest.skip(f"the hard open-file limit ({out['skip']}) is too low to show it")
    assert out["states"] == [FILTERED]
    # One wave of 1,000 (not five waves of the ~136 the soft limit of 200 would allow).
    assert out["elapsed"] < 1.5
    assert out["after"] == 200
