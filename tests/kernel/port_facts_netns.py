"""Open real sockets in a fresh network namespace, then report them two ways.

Run by tests/kernel/test_port_facts.py as ``unshare --net python3 port_facts_netns.py``.
Prints one JSON object: the sockets it opened, what ``collect_listeners`` found
(netlink and /proc sources) and the raw output of ``ss -Htlnup``.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from support.paths import COLLECTIONS
from support.sockets import open_socket

sys.path.insert(0, str(COLLECTIONS))
from ansible_collections.portguard.hardening.plugins.module_utils.host.listeners import (
    collect_listeners,
)

# (protocol, family, address, port, v6only, device)
LISTENING = [
    ("tcp", socket.AF_INET, "0.0.0.0", 8080, None, None),
    ("tcp", socket.AF_INET, "127.0.0.1", 8081, None, None),
    ("tcp", socket.AF_INET, "192.0.2.10", 8082, None, None),
    ("tcp", socket.AF_INET, "0.0.0.0", 8083, None, "lo"),
    ("tcp", socket.AF_INET6, "::", 8443, False, None),
    ("tcp", socket.AF_INET6, "::", 8444, True, None),
    ("tcp", socket.AF_INET6, "::1", 8445, True, None),
    ("tcp", socket.AF_INET6, "2001:db8::10", 8446, True, None),
    ("tcp", socket.AF_INET6, "::ffff:127.0.0.1", 8447, False, None),
    ("tcp", socket.AF_INET6, "::ffff:192.0.2.10", 8448, False, None),
    ("udp", socket.AF_INET, "0.0.0.0", 5353, None, None),
    ("udp", socket.AF_INET, "127.0.0.1", 5354, None, None),
    ("udp", socket.AF_INET, "192.0.2.10", 5355, None, None),
    ("udp", socket.AF_INET, "0.0.0.0", 5356, None, "lo"),
    ("udp", socket.AF_INET6, "::", 5357, False, None),
    ("udp", socket.AF_INET6, "::", 5358, True, None),
    ("udp", socket.AF_INET6, "2001:db8::10", 5359, True, None),
    ("udp", socket.AF_INET6, "::ffff:127.0.0.1", 5360, False, None),
]
# Held by a forked child renamed to CHILD_NAME as well as by this process.
SHARED = ("tcp", socket.AF_INET, "127.0.0.1", 9090, None, None)
# Held by the child only.
CHILD_ONLY = ("udp", socket.AF_INET6, "::1", 9091, True, None)
CHILD_NAME = "pg-child"
PR_SET_NAME = 15


def start_child(parent_only):
    """Fork a child that keeps SHARED, opens CHILD_ONLY and is named CHILD_NAME."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        for sock in parent_only:
            sock.close()
        ctypes.CDLL(None).prctl(PR_SET_NAME, CHILD_NAME.encode(), 0, 0, 0)
        own = open_socket(*CHILD_ONLY)
        os.write(ready_w, b"1")
        signal.sigwait({signal.SIGTERM})
        own.close()
        os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    return pid


def main():
    for command in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", "192.0.2.10/32", "dev", "lo"],
                    ["ip", "addr", "add", "2001:db8::10/128", "dev", "lo"]):
        subprocess.run(command, check=True)
    held = [open_socket(*spec) for spec in LISTENING]
    shared = open_socket(*SHARED)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    child = start_child(held)
    # Not listening, so never reported: an established TCP pair, a connected UDP socket
    # and a bound TCP socket that never called listen().
    client = socket.create_connection(("127.0.0.1", 8081))
    accepted = held[1].accept()[0]
    connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected.bind(("127.0.0.1", 6000))
    connected.connect(("127.0.0.1", 9))
    bound_only = socket.socket()
    bound_only.bind(("127.0.0.1", 6001))
    try:
        report = {
            "pid": os.getpid(),
            "child": child,
            "child_name": CHILD_NAME,
            "opened": [spec[:5] for spec in LISTENING] + [SHARED[:5], CHILD_ONLY[:5]],
            "netlink": collect_listeners(source="netlink"),
            "proc": collect_listeners(source="proc"),
            "ss": subprocess.run(["ss", "-Htlnup"], check=True, capture_output=True, text=True).stdout,
        }
    finally:
        os.kill(child, signal.SIGTERM)
        os.waitpid(child, 0)
    for sock in held + [shared, client, accepted, connected, bound_only]:
        sock.close()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
