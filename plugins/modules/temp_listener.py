#!/usr/bin/python
# Copyright: portguard.hardening contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: temp_listener
short_description: Temporary TCP listeners and UDP probe responders for reachability checks
version_added: 0.1.0
description:
  - Starts one background process that listens on the given ports (all addresses, IPv4 and IPv6) where
    nothing listens yet. TCP connections are accepted and closed.
  - A UDP datagram is answered only when it is exactly the request that M(portguard.hardening.port_probe)
    sends (a fixed magic and a nonce), with a reply that is not itself a request, so two listeners can never
    bounce a datagram between them. Datagrams from source ports below 1024 or from a port this listener
    serves get no answer, and all replies together are limited to 200 per second.
  - Used by the C(verify) role so that a blocked port is proven blocked by the firewall, not by the absence
    of a listener. Stops by itself after O(lifetime) seconds, or when called with O(state=stopped); it removes
    its state file when it stops.
  - Before it signals a listener started earlier, it checks that the recorded process id still belongs to that
    listener (same start time, same owner, same command), so a reused process id is never signalled.
  - On a host without IPv6 (booted with C(ipv6.disable=1)) it serves IPv4 only and says so (RV(ipv6), a warning).
  - Fails at once, naming the port, when the listener cannot open or bind a socket for a reason other than
    another socket holding the port (those ports are reported in RV(busy)).
author:
  - portguard maintainers (@portguard)
extends_documentation_fragment:
  - portguard.hardening.attributes
attributes:
  check_mode:
    support: none
    details: Listeners are needed for the probes to mean anything; nothing else is changed.
  diff_mode:
    support: none
    details: Nothing to show a diff of.
options:
  ports:
    description: The ports to listen on.
    type: list
    elements: dict
    default: []
    suboptions:
      port:
        description:
          - Port number, 1-65535. C(0) (any free port) is refused, since the probes need to know the port.
        type: int
        required: true
      proto:
        description: Protocol.
        type: str
        choices: [tcp, udp]
        default: tcp
  state:
    description: C(started) starts the listeners; C(stopped) stops the ones this module started.
    type: str
    choices: [started, stopped]
    default: started
  lifetime:
    description: Seconds after which the listeners stop by themselves, 1-3600.
    type: int
    default: 600
"""

EXAMPLES = r"""
- name: Listen on 5432/tcp and 53/udp where nothing listens
  portguard.hardening.temp_listener:
    ports:
      - {port: 5432, proto: tcp}
      - {port: 53, proto: udp}

- name: Stop them
  portguard.hardening.temp_listener:
    state: stopped
"""

RETURN = r"""
started:
  description: The ports now served by the temporary listener.
  returned: state=started
  type: list
  elements: dict
busy:
  description: The ports skipped because another socket already holds them, with the reason.
  returned: state=started
  type: list
  elements: dict
pid:
  description: Process id of the listener.
  returned: state=started
  type: int
ipv6:
  description: Whether the listener serves IPv6 too; false on a host without IPv6, where it serves IPv4 only.
  returned: state=started
  type: bool
"""

import json
import os
import select
import shlex
import signal
import sys
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import STATE_DIR
from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import (
    REPLY_MAGIC,
    REQUEST_BYTES,
    REQUEST_MAGIC,
)
from ansible_collections.portguard.hardening.plugins.module_utils.host.processes import is_ours, start_time

STATE_FILE = os.path.join(STATE_DIR, "listener.json")
# In the listener's command line: with the pid and its start time, it tells our listener from a stranger.
MARKER = "portguard-temp-listener"
MAX_LIFETIME = 3600
REPLIES_PER_SECOND = 200
READY_TIMEOUT = 10
STOP_TIMEOUT = 5

# The listener process. It reports on the pipe ``ready_fd`` once, then closes it: {"error": ...} when it
# cannot serve, else what it serves; the module reads until the pipe closes, so a crash is known at once.
LISTENER = r"""
import errno, json, os, resource, selectors, signal, socket, sys, time

config = json.loads(sys.argv[2])
ready = os.fdopen(config["ready_fd"], "w")
request_magic, reply_magic = bytes.fromhex(config["request_magic"]), bytes.fromhex(config["reply_magic"])
request_bytes, rate = config["request_bytes"], config["rate"]


class Refused(Exception):
    pass


def stop(signum, frame):
    raise SystemExit(0)


def start_time():
    with open("/proc/self/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[19]


def bind_all(ports):
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        family, wildcard = socket.AF_INET6, "::"
    except OSError as exc:
        if exc.errno != errno.EAFNOSUPPORT:
            raise
        family, wildcard = socket.AF_INET, "0.0.0.0"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = len(ports) + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
    sel, started, busy = selectors.DefaultSelector(), [], []
    for index, item in enumerate(ports):
        where = f"ports[{index}] ({item['port']}/{item['proto']})"
        kind = socket.SOCK_STREAM if item["proto"] == "tcp" else socket.SOCK_DGRAM
        try:
            sock = socket.socket(family, kind)
        except OSError as exc:
            raise Refused(f"{where}: cannot open a socket: {exc.strerror}")
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_STREAM:
            # Our own closed connections leave TIME_WAIT behind; they must not make the next run's port busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((wildcard, item["port"]))
            if kind == socket.SOCK_STREAM:
                sock.listen(512)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise Refused(f"{where}: cannot bind: {exc.strerror}")
            busy.append({**item, "reason": exc.strerror})
            continue
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, item["proto"])
        started.append(item)
    return sel, started, busy, family == socket.AF_INET6


def forget(path, me):
    try:
        with open(path) as handle:
            if json.load(handle) != me:
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def serve(sel, udp_ports, deadline):
    tokens, refilled = float(rate), time.monotonic()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for key, mask in sel.select(min(left, 1.0)):
            sock = key.fileobj
            try:
                if key.data == "tcp":
                    conn, peer = sock.accept()
                    conn.close()
                    continue
                data, peer = sock.recvfrom(request_bytes + 1)
            except OSError:
                continue
            # Only a probe request, never from a privileged port (other services) or from a port we serve
            # (another listener), and within the rate: nothing here can be turned into a reflector.
            if len(data) != request_bytes or not data.startswith(request_magic):
                continue
            if peer[1] < 1024 or peer[1] in udp_ports:
                continue
            now = time.monotonic()
            tokens, refilled = min(float(rate), tokens + (now - refilled) * rate), now
            if tokens < 1:
                continue
            tokens -= 1
            try:
                sock.sendto(reply_magic + data[len(request_magic):], peer)
            except OSError:
                pass


def main():
    signal.signal(signal.SIGTERM, stop)
    try:
        os.setsid()
    except OSError:
        pass
    me = None
    try:
        try:
            sel, started, busy, ipv6 = bind_all(config["ports"])
            me = {"pid": os.getpid(), "start": start_time()}
            with open(config["state"] + ".tmp", "w") as handle:
                json.dump(me, handle)
            os.replace(config["state"] + ".tmp", config["state"])
        except Refused as exc:
            ready.write(json.dumps({"error": str(exc)}))
            return
        except Exception as exc:
            ready.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
            return
        ready.write(json.dumps({"pid": me["pid"], "started": started, "busy": busy, "ipv6": ipv6}))
        ready.close()
        udp_ports = {item["port"] for item in started if item["proto"] == "udp"}
        serve(sel, udp_ports, time.monotonic() + config["lifetime"])
    finally:
        if not ready.closed:
            ready.close()
        if me is not None:
            forget(config["state"], me)


main()
"""


def _read_state():
    try:
        with open(STATE_FILE) as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else {}


def _stop():
    """Stop the listener recorded in the state file, if it is still ours; forget the record. True if one was stopped."""
    state = _read_state()
    if state is None:
        return False
    stopped = False
    if is_ours(state.get("pid"), state.get("start"), MARKER):
        try:
            os.kill(state["pid"], signal.SIGTERM)
            stopped = True
        except ProcessLookupError:
            pass
        # Its ports must be free before a new listener binds them.
        deadline = time.monotonic() + STOP_TIMEOUT
        while stopped and start_time(state["pid"]) == state["start"] and time.monotonic() < deadline:
            time.sleep(0.02)
    if _read_state() == state:
        try:
            os.unlink(STATE_FILE)
        except FileNotFoundError:
            pass
    return stopped


def check_params(params):
    """The ports (deduplicated) and lifetime, or a message naming the offending key."""
    ports, seen = [], set()
    for index, item in enumerate(params["ports"]):
        if not 1 <= item["port"] <= 65535:
            return None, f"ports[{index}].port: {item['port']} is out of range 1-65535"
        key = (item["port"], item["proto"])
        if key not in seen:
            seen.add(key)
            ports.append({"port": item["port"], "proto": item["proto"]})
    if not 1 <= params["lifetime"] <= MAX_LIFETIME:
        return None, f"lifetime: {params['lifetime']} is out of range 1-{MAX_LIFETIME} seconds"
    return ports, None


def _wait_ready(read_fd):
    """The listener's report: read until it closes its end of the pipe (at once when it dies)."""
    chunks, deadline = [], time.monotonic() + READY_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_fd], [], [], left)[0]:
            return {"error": f"the temporary listener did not report within {READY_TIMEOUT} s"}
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        return {"error": "the temporary listener exited before it was ready"}
    return report if isinstance(report, dict) else {"error": "the temporary listener sent an unreadable report"}


def _start(module, ports):
    os.makedirs(os.path.dirname(STATE_FILE), mode=0o700, exist_ok=True)
    read_fd, write_fd = os.pipe()
    config = {"ports": ports, "lifetime": module.params["lifetime"], "state": STATE_FILE, "ready_fd": write_fd,
              "request_magic": REQUEST_MAGIC.hex(), "reply_magic": REPLY_MAGIC.hex(),
              "request_bytes": REQUEST_BYTES, "rate": REPLIES_PER_SECOND}
    argv = [sys.executable, "-c", LISTENER, MARKER, json.dumps(config)]
    # Detached (backgrounded by the shell, its own session) so that it outlives this module; only the pipe
    # stays shared, and the listener closes it once it has reported.
    command = f"{' '.join(shlex.quote(a) for a in argv)} </dev/null >/dev/null 2>&1 &"
    try:
        rc, _out, err = module.run_command(command, use_unsafe_shell=True, pass_fds=[write_fd])
    finally:
        os.close(write_fd)
    if rc != 0:
        os.close(read_fd)
        module.fail_json(msg=f"could not start the temporary listener: {err}")
    try:
        return _wait_ready(read_fd)
    finally:
        os.close(read_fd)


def main():
    module = AnsibleModule(
        argument_spec={
            "ports": {"type": "list", "elements": "dict", "default": [], "options": {
                "port": {"type": "int", "required": True},
                "proto": {"type": "str", "choices": ["tcp", "udp"], "default": "tcp"},
            }},
            "state": {"type": "str", "choices": ["started", "stopped"], "default": "started"},
            "lifetime": {"type": "int", "default": 600},
        },
        supports_check_mode=False,
    )
    ports, problem = check_params(module.params)
    if problem:
        module.fail_json(msg=problem)
    stopped = _stop()
    if module.params["state"] == "stopped":
        module.exit_json(changed=stopped)
    report = _start(module, ports)
    if "error" in report:
        module.fail_json(msg=f"the temporary listener cannot serve: {report['error']}")
    if not report["ipv6"]:
        module.warn("IPv6 is not available on this host (socket(AF_INET6) is refused): the temporary listener "
                    "serves IPv4 only")
    module.exit_json(changed=bool(report["started"]), **report)


if __name__ == "__main__":
    main()
