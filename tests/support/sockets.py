"""Real listening sockets for the listener readers' tests and fixtures."""

import socket


def open_socket(protocol, family, address, port, v6only, device):
    """A bound socket, listening if TCP; ``v6only`` for IPv6, ``device`` binds it to an interface."""
    sock = socket.socket(family, socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    if device:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    sock.bind((address, port))
    if protocol == "tcp":
        sock.listen()
    return sock
