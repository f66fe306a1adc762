"""port_facts against the real kernel and ``ss`` (root).

Real sockets are opened in a fresh network namespace (``unshare --net``) by
port_facts_netns.py; what the collector finds there, from netlink and from
/proc/net, must equal what ``ss -Htlnup`` shows, socket for
socket, owner for owner. The module itself then runs through ``ansible``.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.ansible import ansible_env, tool
from support.requirements import need, require

from ansible_collections.portguard.hardening.plugins.module_utils.host.listeners import collect_listeners

HELPER = Path(__file__).with_name("port_facts_netns.py")
USERS = re.compile(r'\("((?:[^"\\]|\\.)*)",pid=(\d+),fd=\d+\)')


def parse_ss(text):
    """``ss -Htlnup`` lines as {(protocol, address, port, interface): (pids, name of the lowest pid)}."""
    found = {}
    for line in text.splitlines():
        # Netid State Recv-Q Send-Q Local Peer [Process]
        fields = line.split(None, 6)
        protocol, local = fields[0], fields[4]
        host, port = local.rsplit(":", 1)
        host, interface = (host.split("%", 1) + [""])[:2]
        # ss prints an IPv6 wildcard that also accepts IPv4 as "*", bracketed otherwise.
        address = "::" if host == "*" else host.strip("[]")
        owners = sorted((int(pid), name) for name, pid in USERS.findall(fields[6] if len(fields) > 6 else ""))
        found[(protocol, address, int(port), interface or None)] = (
            [pid for pid, _name in owners], owners[0][1] if owners else None)
        if host == "*":
            found[(protocol, address, int(port), interface or None)] += ("dual-stack",)
    return found


def ours(listeners, with_interface=True):
    found = {}
    for item in listeners:
        key = (item["protocol"], item["address"], item["port"], item["interface"] if with_interface else None)
        found[key] = (item["pids"], item["name"])
        if item["family"] == "ipv6" and item["address"] == "::" and item["v6only"] is False:
            found[key] += ("dual-stack",)
    return found


@pytest.fixture(scope="module")
def netns_report():
    require("unshare", "ss", "ip")
    out = subprocess.run(["unshare", "--net", sys.executable, str(HELPER)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return json.loads(out)


def test_netlink_matches_ss_exactly(netns_report):
    expected = parse_ss(netns_report["ss"])
    assert ours(netns_report["netlink"]) == expected
    # Everything the helper opened is there: ss is not the only witness.
    opened = {tuple(spec[i] for i in (0, 2, 3)) for spec in netns_report["opened"]}
    assert {key[:3] for key in expected} == opened


def test_proc_source_matches_ss_except_what_proc_cannot_say(netns_report):
    expected = {(*key[:3], None): value[:2] for key, value in parse_ss(netns_report["ss"]).items()}
    found = {key: value[:2] for key, value in ours(netns_report["proc"], with_interface=False).items()}
    assert found == expected


def test_owners_names_and_fields(netns_report):
    by_port = {(item["protocol"], item["port"]): item for item in netns_report["netlink"]}
    parent, child = netns_report["pid"], netns_report["child"]
    assert by_port[("tcp", 8080)]["pids"] == [parent]
    assert by_port[("tcp", 9090)]["pids"] == sorted([parent, child])
    assert by_port[("tcp", 9090)]["pid"] == min(parent, child)
    only_child = by_port[("udp", 9091)]
    assert (only_child["pid"], only_child["name"]) == (child, netns_report["child_name"])
    assert only_child["user"] == "root" and "port_facts_netns.py" in only_child["cmdline"]
    mapped = by_port[("tcp", 8447)]
    assert (mapped["address"], mapped["v4_mapped"], mapped["scope"]) == ("::ffff:127.0.0.1", True, "loopback")
    assert by_port[("tcp", 8448)]["scope"] == "specific"
    assert by_port[("tcp", 8443)]["scope"] == "wildcard"
    assert by_port[("udp", 5356)]["interface"] == "lo"
    # Not listening: established TCP (8081's peer side), connected UDP, TCP bound without listen().
    assert not {key[1] for key in by_port} & {6000, 6001}
    assert len([item for item in netns_report["netlink"] if item["port"] == 8081]) == 1


def run_module(*extra):
    command = tool("ansible")
    need(command, "ansible")
    env = ansible_env(ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    # -o: one line per host, "localhost | SUCCESS => {result as JSON}".
    result = subprocess.run([command, "localhost", "-o", "-m", "portguard.hardening.port_facts", *extra],
                            check=True, capture_output=True, text=True, env=env, timeout=120)
    return json.loads(result.stdout.split(" => ", 1)[1])


def test_module_through_ansible_reports_a_socket_we_hold():
    with socket.socket(socket.AF_INET6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        for extra in ([], ["--check"]):
            result = run_module(*extra)
            assert result["changed"] is False
            mine = [item for item in result["ansible_facts"]["portguard_listeners"]
                    if item["protocol"] == "tcp" and item["port"] == port]
            assert [(item["address"], item["pid"], item["v6only"]) for item in mine] == [("::1", os.getpid(), True)]
    result = run_module("-a", "protocols=udp include_process=false")
    assert {item["protocol"] for item in result["ansible_facts"]["portguard_listeners"]} <= {"udp"}
    assert all(item["pid"] is None for item in result["ansible_facts"]["portguard_listeners"])


def test_listeners_of_other_network_namespaces_are_skipped_harmlessly():
    require("unshare")
    # A process of this pid namespace listening in its own network namespace, as a container would.
    code = ("import socket, sys; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); sys.stdin.read()")
    with subprocess.Popen(["unshare", "--net", sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as other:
        try:
            other.stdout.readline()
            found = collect_listeners()
        finally:
            other.stdin.close()
    assert other.returncode == 0
    assert all(other.pid not in item["pids"] for item in found)
