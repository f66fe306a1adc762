"""Packet helper run inside a network namespace (``ip netns exec NS python nsagent.py ...``).

``listen PORT...``: TCP accept and UDP echo on every port, IPv4 and IPv6
(wildcard), until stdin closes; prints ``ready`` once everything is bound.

``probe``: reads ``{"tcp_timeout": s, "udp_timeout": s, "parallel": n,
"probes": [[dst, port, proto, src or null], ...]}`` as JSON on stdin and
prints one state per probe: ``open`` (handshake completed / echo answered),
``refused`` (TCP RST or ICMP port unreachable: nothing listens), ``timeout``,
or the errno name of another failure (ICMP admin-prohibited becomes
``EHOSTUNREACH`` over IPv4 and ``EACCES`` over IPv6). Probes run
concurrently from one event loop, so a run of dropped probes costs about one
timeout, not one per probe.

Standard library only: it runs with whatever Python runs pytest, without the
collection on its path.
"""

import errno
import json
import resource
import selectors
import socket
import struct
import sys
import time

# Not exported by every Python's socket module.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
PAYLOAD = b"portguard-probe"


def listen(ports: list[int]) -> None:
    selector = selectors.DefaultSelector()
    for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for port in ports:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                sock = socket.socket(family, kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_DGRAM:
                    # The namespace has many addresses: an echo must come from the
                    # one the probe was sent to, or the connected prober ignores it.
                    if family == socket.AF_INET:
                        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                    else:
                        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                sock.bind((wildcard, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(4096)
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, kind)
    selector.register(sys.stdin, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _unused in selector.select():
            if key.data is None:
                if not sys.stdin.readline():
                    return
                continue
            sock = key.fileobj
            try:
                if key.data == socket.SOCK_STREAM:
                    conn, _unused = sock.accept()
                    conn.close()
                else:
                    data, ancillary, _unused, peer = sock.recvmsg(2048, 256)
                    sock.sendmsg([data], ancillary, 0, peer)  # the packet info names the source
            except OSError:
                pass  # a peer gone or unreachable must not stop the listener


def _errno_name(code: int) -> str:
    return "refused" if code == errno.ECONNREFUSED else errno.errorcode.get(code, str(code))


def _start(dst: str, port: int, proto: str, src: str | None) -> tuple[socket.socket, str | None]:
    """Open a probe: a TCP connect in progress, or a UDP datagram sent. Returns the socket and a final state, if any."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        if src:
            # Take the source port at connect(), not at bind(): thousands of
            # probes from one address would otherwise run out of ports.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src, 0))
        if proto == "tcp":
            # Over a veth a reject comes back while connect() still holds the
            # socket; TCP then keeps it as a soft error and retransmits the SYN
            # a second later. With RECVERR the error is queued on the socket
            # all the same, and poll reports it at once.
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            code = sock.connect_ex((dst, port))
            return sock, None if code in (0, errno.EINPROGRESS) else _errno_name(code)
        sock.connect((dst, port))
        sock.send(PAYLOAD)
        return sock, None
    except OSError as error:
        return sock, _errno_name(error.errno)


def _finish(sock: socket.socket, proto: str) -> str | None:
    """The state of a probe whose socket is ready, or None if it is not final yet."""
    if proto == "udp":
        try:
            return "open" if sock.recv(2048) == PAYLOAD else "garbled"
        except BlockingIOError:
            return None
        except OSError as error:
            return _errno_name(error.errno)
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        return _errno_name(code)
    try:
        _unused, ancillary, _unused, _unused = sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
    except BlockingIOError:
        return "open"
    for _unused, _unused, data in ancillary:  # struct sock_extended_err starts with ee_errno
        return _errno_name(struct.unpack_from("=I", data)[0])
    return "open"


def probe(request: dict) -> list[str]:
    probes = request["probes"]
    timeouts = {"tcp": request["tcp_timeout"], "udp": request["udp_timeout"]}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, request["parallel"] + 64)) if hard != resource.RLIM_INFINITY else request["parallel"] + 64
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    parallel = min(request["parallel"], wanted - 64)
    results: list[str | None] = [None] * len(probes)
    selector = selectors.DefaultSelector()
    following = 0
    active: dict[int, tuple[socket.socket, float]] = {}
    while following < len(probes) or active:
        while following < len(probes) and len(active) < parallel:
            index = following
            following += 1
            dst, port, proto, src = probes[index]
            sock, state = _start(dst, port, proto, src)
            if state is not None:
                results[index] = state
                sock.close()
                continue
            events = selectors.EVENT_WRITE if proto == "tcp" else selectors.EVENT_READ
            selector.register(sock, events, (index, proto))
            active[index] = (sock, time.monotonic() + timeouts[proto])
        if not active:
            continue
        wait = max(0.0, min(deadline for _unused, deadline in active.values()) - time.monotonic())
        for key, _unused in selector.select(wait):
            index, proto = key.data
            state = _finish(key.fileobj, proto)
            if state is not None:
                results[index] = state
                selector.unregister(key.fileobj)
                key.fileobj.close()
                del active[index]
        now = time.monotonic()
        for index, (sock, deadline) in list(active.items()):
            if deadline <= now:
                results[index] = "timeout"
                selector.unregister(sock)
                sock.close()
                del active[index]
    return results


def main() -> None:
    if sys.argv[1] == "listen":
        listen([int(port) for port in sys.argv[2:]])
    elif sys.argv[1] == "probe":
        json.dump(probe(json.load(sys.stdin)), sys.stdout)
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
