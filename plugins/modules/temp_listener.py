#!/usr/bin/python
# Copyright: portguard.hardening contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
module: temp_listener
short_description: Temporary TCP and UDP echo listeners for reachability checks
version_added: 0.1.0
description:
  - Starts one background process that listens on the given ports (IPv4 and IPv6, all addresses) where
    nothing listens yet. TCP connections are accepted and closed, UDP datagrams are echoed back.
  - Used by the C(verify) role so that a blocked port is proven blocked by the firewall, not by the absence
    of a listener. Stops by itself after O(lifetime) seconds, or when called with O(state=stopped).
author:
  - portguard maintainers (@portguard)
attributes:
  check_mode:
    support: none
    description: Listeners are needed for the probes to mean anything; nothing else is changed.
  diff_mode:
    support: none
    description: Nothing to show a diff of.
  platform:
    support: full
    platforms: posix
    description: Linux hosts (netfilter, /proc).
options:
  ports:
    description: The ports to listen on.
    type: list
    elements: dict
    default: []
    suboptions:
      port:
        description: Port number.
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
    description: Seconds after which the listeners stop by themselves.
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
  description: The ports skipped because something already listens on them.
  returned: state=started
  type: list
  elements: dict
pid:
  description: Process id of the listener.
  returned: state=started
  type: int
"""

import json
import os
import shlex
import signal
import sys
import time

from ansible.module_utils.basic import AnsibleModule

STATE_FILE = "/run/portguard/listener.json"

# The listener process: binds what it can, reports which, then serves until killed or its lifetime ends.
LISTENER = r"""
import json, os, selectors, socket, sys, time
ports, report, lifetime = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
sel = selectors.DefaultSelector()
started, busy = [], []
for item in ports:
    kind = socket.SOCK_STREAM if item["proto"] == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(("::", item["port"]))
    except OSError:
        sock.close()
        busy.append(item)
        continue
    if kind == socket.SOCK_STREAM:
        sock.listen(512)
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ, item["proto"])
    started.append(item)
with open(report + ".tmp", "w") as handle:
    json.dump({"pid": os.getpid(), "started": started, "busy": busy}, handle)
os.replace(report + ".tmp", report)
deadline = time.time() + lifetime
while time.time() < deadline:
    for key, _ in sel.select(1.0):
        sock = key.fileobj
        try:
            if key.data == "tcp":
                conn, _ = sock.accept()
                conn.close()
            else:
                data, peer = sock.recvfrom(2048)
                sock.sendto(data, peer)
        except OSError:
            pass
"""


def _stop():
    try:
        with open(STATE_FILE) as handle:
            state = json.load(handle)
    except (FileNotFoundError, ValueError):
        return False
    os.unlink(STATE_FILE)
    try:
        os.kill(state["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


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
    stopped = _stop()
    if module.params["state"] == "stopped":
        module.exit_json(changed=stopped)
    os.makedirs(os.path.dirname(STATE_FILE), mode=0o700, exist_ok=True)
    report = STATE_FILE + ".start"
    if os.path.exists(report):
        os.unlink(report)
    ports = [{"port": p["port"], "proto": p["proto"]} for p in module.params["ports"]]
    # Detached (own session, no pipes back) so that it outlives this module; the shell returns at once.
    argv = [sys.executable, "-c", LISTENER, json.dumps(ports), report, str(module.params["lifetime"])]
    command = f"setsid {' '.join(shlex.quote(a) for a in argv)} </dev/null >/dev/null 2>&1 &"
    rc, _out, err = module.run_command(command, use_unsafe_shell=True)
    if rc != 0:
        module.fail_json(msg=f"could not start the temporary listener: {err}")
    deadline = time.time() + 10
    while not os.path.exists(report):
        if time.time() > deadline:
            module.fail_json(msg="the temporary listener did not start within 10 s")
        time.sleep(0.05)
    with open(report) as handle:
        state = json.load(handle)
    os.replace(report, STATE_FILE)
    module.exit_json(changed=bool(state["started"]), **state)


if __name__ == "__main__":
    main()
