"""temp_listener in real network namespaces (root): no reflection, no strangers signalled, bounds, IPv4 fallback.

Two namespaces over a veth pair, ``a`` (198.18.88.1) and ``b`` (198.18.88.2).
The module runs as a module runs on a host: its file executed by Python with
its arguments in a JSON file (what Ansible's module wrapper does), so the wall
time of a refusal is the module's own; one test runs it through ``ansible
localhost``. Every run sees its own ``/run/portguard`` (a directory of the
test bind-mounted there in a private mount namespace), as if each namespace
were a host of its own: two listeners can run at once, and the state file is
read by the test.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel_lab import run
from support.ansible import ansible_env, tool
from support.paths import COLLECTIONS, ROOT
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import REQUEST_MAGIC, udp_request

pytestmark = pytest.mark.kernel

MODULE = ROOT / "plugins" / "modules" / "temp_listener.py"
RUNNER = Path(__file__).with_name("probe_runner.py")
NO_IPV6 = Path(__file__).with_name("no_ipv6.py")
ADDRESS = {"a": "198.18.88.1", "b": "198.18.88.2"}


class Hosts:
    """Two namespaces, each with its own /run/portguard; runs the module in either."""

    def __init__(self, tmp: Path, tag: str):
        self.ns = {"a": f"pg-tla-{tag}", "b": f"pg-tlb-{tag}"}
        self.run_dir = {name: tmp / f"run-{name}" for name in self.ns}
        self.pids: set[int] = set()

    def setup(self) -> None:
        for name, namespace in self.ns.items():
            run("ip", "netns", "add", namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
            self.run_dir[name].mkdir()
        run("ip", "link", "add", "pgtla", "netns", self.ns["a"], "type", "veth", "peer", "name", "pgtlb",
            "netns", self.ns["b"])
        for name, interface in (("a", "pgtla"), ("b", "pgtlb")):
            run("ip", "-n", self.ns[name], "address", "add", f"{ADDRESS[name]}/24", "dev", interface)
            run("ip", "-n", self.ns[name], "link", "set", interface, "up")

    def teardown(self) -> None:
        for pid in self.pids:
            # Only a listener these tests started, checked by its command line (its Python source).
            with contextlib.suppress(OSError):
                if b"selectors" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        for namespace in self.ns.values():
            run("ip", "netns", "delete", namespace, check=False)

    def command(self, name: str, *command: str) -> list[str]:
        """``command`` in host ``name``: its network namespace and its own /run/portguard."""
        script = 'mkdir -p /run/portguard && mount --bind "$0" /run/portguard && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.run_dir[name]),
                "ip", "netns", "exec", self.ns[name], *command]

    def module(self, name: str, args: dict, wrapper=(), limit: str | None = None) -> tuple[dict, float]:
        """Run temp_listener in host ``name``: (its JSON result, wall time in seconds)."""
        args_file = self.run_dir[name].parent / f"args-{name}.json"
        args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
        prefix = ["prlimit", f"--nofile={limit}"] if limit else []
        command = self.command(name, *prefix, *wrapper, sys.executable, str(MODULE), str(args_file))
        env = {**os.environ, "PYTHONPATH": str(COLLECTIONS)}
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
        elapsed = time.monotonic() - started
        try:
            output = json.loads(result.stdout)
        except ValueError:
            raise AssertionError(f"no JSON from the module: {result.stdout}{result.stderr}") from None
        if isinstance(output.get("pid"), int):
            self.pids.add(output["pid"])
        return output, elapsed

    def start(self, name: str, ports, lifetime: int = 60) -> dict:
        output, _elapsed = self.module(name, {"ports": ports, "lifetime": lifetime})
        assert not output.get("failed"), output
        return output

    def state(self, name: str):
        path = self.run_dir[name] / "listener.json"
        return json.loads(path.read_text()) if path.exists() else None

    def python(self, name: str, code: str, timeout: float = 30) -> str:
        result = subprocess.run(["ip", "netns", "exec", self.ns[name], sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=timeout, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def hosts(tmp_path):
    require("ip", "nft", "unshare", "prlimit")
    lab = Hosts(tmp_path, os.urandom(2).hex())
    try:
        lab.setup()
        yield lab
    finally:
        lab.teardown()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def udp_counter(hosts: Hosts, name: str, port: int) -> None:
    rules = (f"table inet pgcount {{\n counter hits {{ }}\n chain input {{\n type filter hook input priority -10;\n"
             f" udp dport {port} counter name hits\n }}\n}}\n")
    run("ip", "netns", "exec", hosts.ns[name], "nft", "-f", "-", input=rules)


def udp_count(hosts: Hosts, name: str) -> int:
    out = run("ip", "netns", "exec", hosts.ns[name], "nft", "-j", "list", "counter", "inet", "pgcount", "hits").stdout
    return next(item["counter"]["packets"] for item in json.loads(out)["nftables"] if "counter" in item)


def spoof(hosts: Hosts, src: str, sport: int, dst: str, dport: int, payload: bytes) -> None:
    """From host a, one UDP datagram with a forged source (raw IPv4, IP_HDRINCL; UDP checksum 0: none)."""
    code = f"""
import socket, struct
payload = {payload!r}
udp = struct.pack("!HHHH", {sport}, {dport}, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
                 socket.inet_aton({src!r}), socket.inet_aton({dst!r}))
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
    sock.sendto(ip + udp, ({dst!r}, 0))
"""
    hosts.python("a", code)


@pytest.mark.parametrize("same_port", [False, True], ids=["other-ports", "same-port"])
def test_two_listeners_never_bounce_a_spoofed_datagram(hosts, same_port):
    """One datagram forged as coming from listener a's port to listener b: b answers once at most, a never."""
    port_a, port_b = (40500, 40500) if same_port else (40500, 40600)
    hosts.start("a", [{"port": port_a, "proto": "udp"}])
    hosts.start("b", [{"port": port_b, "proto": "udp"}])
    udp_counter(hosts, "a", port_a)
    udp_counter(hosts, "b", port_b)
    # The worst case: a well-formed probe request, as if the prober on a's port had sent it.
    spoof(hosts, ADDRESS["a"], port_a, ADDRESS["b"], port_b, udp_request())
    time.sleep(2)
    at_a, at_b = udp_count(hosts, "a"), udp_count(hosts, "b")
    assert at_b == 1, f"listener b saw {at_b} datagrams on {port_b}/udp in 2 s, listener a {at_a}"
    assert at_a == (0 if same_port else 1), f"listener a saw {at_a} datagrams on {port_a}/udp in 2 s"


def request_from(hosts: Hosts, sport: int, count: int = 1, per_second: int = 1000) -> int:
    """Send ``count`` probe requests to b's 40600/udp from a's source port ``sport``; the replies received.

    Replies are read while sending, so no receive buffer caps the count.
    """
    code = f"""
import os, socket, time
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind(({ADDRESS['a']!r}, {sport}))
    sock.connect(({ADDRESS['b']!r}, 40600))
    sock.setblocking(False)
    replies, started = 0, time.monotonic()
    def drain():
        global replies
        try:
            while True:
                sock.recv(64)
                replies += 1
        except (BlockingIOError, ConnectionRefusedError):
            pass
    for index in range({count}):
        sock.send({REQUEST_MAGIC!r} + os.urandom(16))
        drain()
        time.sleep(max(0.0, started + (index + 1) / {per_second} - time.monotonic()))
    end = time.monotonic() + 1
    while time.monotonic() < end:
        drain()
        time.sleep(0.01)
print(replies)
"""
    return int(hosts.python("a", code))


def test_no_answer_to_privileged_source_ports_and_only_to_requests(hosts):
    hosts.start("b", [{"port": 40600, "proto": "udp"}])
    assert request_from(hosts, 41000) == 1
    assert request_from(hosts, 999) == 0, "a datagram from source port 999 was answered"
    code = f"""
import socket
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.connect(({ADDRESS['b']!r}, 40600))
    sock.send(b"anything else")
    sock.settimeout(1)
    try:
        print(len(sock.recv(64)))
    except TimeoutError:
        print(0)
"""
    assert hosts.python("a", code).strip() == "0", "a datagram that is not a probe request was answered"


def test_replies_are_rate_limited(hosts):
    hosts.start("b", [{"port": 40600, "proto": "udp"}])
    # 1,000 requests in one second: a bucket of 200 refilled at 200 per second answers about 400.
    replies = request_from(hosts, 41001, count=1000)
    assert 150 <= replies <= 500, f"{replies} replies to 1000 requests in one second"


def test_probes_see_the_listener_open(hosts):
    """The prober's own requests are answered: TCP and UDP open, both through the module via Ansible."""
    ansible = tool("ansible")
    env = ansible_env(ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    args = {"ports": [{"port": 40700, "proto": "tcp"}, {"port": 40700, "proto": "udp"}], "lifetime": 60}
    started = subprocess.run(hosts.command("b", ansible, "localhost", "-o", "-m", "portguard.hardening.temp_listener",
                                           "-a", json.dumps(args)), capture_output=True, text=True, env=env,
                             timeout=120, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    output = json.loads(started.stdout.split(" => ", 1)[1])
    hosts.pids.add(output["pid"])
    assert output["started"] == args["ports"] and output["ipv6"] is True
    request = {"targets": [[ADDRESS["b"], 40700, "tcp", None], [ADDRESS["b"], 40700, "udp", None]], "timeout": 1.0}
    probed = run("ip", "netns", "exec", hosts.ns["a"], sys.executable, str(RUNNER), str(COLLECTIONS),
                 input=json.dumps(request))
    assert [(r["state"], r["reason"]) for r in json.loads(probed.stdout)["results"]] == [
        ("open", "handshake"), ("open", "echo")]
    stopped = subprocess.run(hosts.command("b", ansible, "localhost", "-o", "-m", "portguard.hardening.temp_listener",
                                           "-a", '{"state": "stopped"}'), capture_output=True, text=True, env=env,
                             timeout=120, check=False)
    assert stopped.returncode == 0 and '"changed": true' in stopped.stdout, stopped.stdout + stopped.stderr
    assert not alive(output["pid"]) and hosts.state("b") is None


def test_udp_probes_never_come_from_a_port_the_listener_serves(hosts):
    """a's ephemeral ports are 40600-40603 and b serves 40600-40602/udp: every probe must come from 40603."""
    hosts.start("b", [{"port": port, "proto": "udp"} for port in (40600, 40601, 40602)])
    run("ip", "netns", "exec", hosts.ns["a"], "sysctl", "-qw", "net.ipv4.ip_local_port_range=40600 40603")
    request = {"targets": [[ADDRESS["b"], port, "udp", None] for port in (40600, 40601, 40602)] * 4,
               "timeout": 1.0, "concurrency": 1}
    probed = run("ip", "netns", "exec", hosts.ns["a"], sys.executable, str(RUNNER), str(COLLECTIONS),
                 input=json.dumps(request))
    states = [(r["port"], r["state"], r["reason"]) for r in json.loads(probed.stdout)["results"]]
    assert states == [(t[1], "open", "echo") for t in request["targets"]]


@pytest.mark.parametrize("state", ["started", "stopped"])
def test_a_stale_state_file_never_gets_a_stranger_killed(hosts, state):
    """listener.json names a pid that now belongs to a sleep: with a wrong start time, and with the right one."""
    for start in ("wrong", "right"):
        sleeper = subprocess.Popen(["sleep", "300"])
        try:
            fields = Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()
            record = {"pid": sleeper.pid, "start": fields[19] if start == "right" else "1",
                      "started": [], "busy": []}
            (hosts.run_dir["b"] / "listener.json").write_text(json.dumps(record))
            output, _elapsed = hosts.module("b", {"state": state, "ports": []})
            time.sleep(0.2)
            assert sleeper.poll() is None, f"the module signalled a sleep process (start time {start})"
            assert not output.get("failed") and output["changed"] is False, output
            assert (hosts.state("b") or {}).get("pid") != sleeper.pid, "the stale state file was left behind"
        finally:
            sleeper.kill()
            sleeper.wait()


def test_the_state_file_goes_when_the_listener_ends_by_itself(hosts):
    output = hosts.start("b", [{"port": 40800, "proto": "tcp"}], lifetime=1)
    assert hosts.state("b")["pid"] == output["pid"]
    deadline = time.monotonic() + 5
    while alive(output["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(output["pid"])
    assert hosts.state("b") is None, "the listener left listener.json behind at the end of its lifetime"
    output = hosts.start("b", [{"port": 40800, "proto": "tcp"}])
    os.kill(output["pid"], signal.SIGTERM)
    time.sleep(0.5)
    assert hosts.state("b") is None, "the listener left listener.json behind after SIGTERM"


def test_a_new_run_replaces_the_previous_listener_without_finding_its_ports_busy(hosts):
    ports = [{"port": 40850, "proto": "tcp"}, {"port": 40850, "proto": "udp"}]
    first = hosts.start("b", ports)
    second = hosts.start("b", ports)
    assert not alive(first["pid"])
    assert second["started"] == ports and second["busy"] == [], second
    assert hosts.state("b")["pid"] == second["pid"]


@pytest.mark.parametrize(("args", "message"), [
    ({"ports": [{"port": 70000, "proto": "udp"}]}, "ports[0].port: 70000 is out of range 1-65535"),
    ({"ports": [{"port": 22}, {"port": 0}]}, "ports[1].port: 0 is out of range 1-65535"),
    ({"ports": [{"port": 40900}], "lifetime": 10**9}, "lifetime: 1000000000 is out of range 1-3600 seconds"),
    ({"ports": [{"port": 40900}], "lifetime": 0}, "lifetime: 0 is out of range 1-3600 seconds"),
], ids=["port-70000", "port-0", "lifetime-1e9", "lifetime-0"])
def test_out_of_bounds_arguments_are_refused_at_once(hosts, args, message):
    output, elapsed = hosts.module("b", args)
    assert output.get("failed") and output["msg"] == message, output
    assert elapsed < 2, f"the refusal took {elapsed:.1f} s"
    assert hosts.state("b") is None


def test_a_port_held_by_another_socket_is_busy_at_once(hosts):
    holder = subprocess.Popen(["ip", "netns", "exec", hosts.ns["b"], sys.executable, "-c",
                               "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                               "s.bind(('0.0.0.0', 41100)); print('ready', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        output, elapsed = hosts.module("b", {"ports": [{"port": 41100, "proto": "udp"}, {"port": 41100}]})
    finally:
        holder.stdin.close()
        holder.wait()
    assert elapsed < 2, f"took {elapsed:.1f} s"
    assert output["busy"] == [{"port": 41100, "proto": "udp", "reason": "Address already in use"}], output
    assert output["started"] == [{"port": 41100, "proto": "tcp"}]


def test_a_listener_that_cannot_open_its_sockets_fails_the_task_at_once(hosts):
    """Under an open-file limit too low for its ports, the module fails in well under its 10 s guard, naming the port."""
    ports = [{"port": 42000 + index, "proto": "tcp"} for index in range(60)]
    output, elapsed = hosts.module("b", {"ports": ports}, limit="40:40")
    assert output.get("failed"), output
    assert "cannot open a socket: Too many open files" in output["msg"] and "ports[" in output["msg"], output
    assert elapsed < 2, f"the failure took {elapsed:.1f} s"
    assert hosts.state("b") is None


def test_without_ipv6_the_listener_serves_ipv4_and_says_so(hosts):
    """As booted with ipv6.disable=1: IPv6 turned off in b, and socket(AF_INET6) refused (no_ipv6.py)."""
    run("ip", "netns", "exec", hosts.ns["b"], "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1")
    ports = [{"port": 43000, "proto": "tcp"}, {"port": 43000, "proto": "udp"}]
    output, elapsed = hosts.module("b", {"ports": ports}, wrapper=(sys.executable, str(NO_IPV6)))
    assert not output.get("failed"), output
    assert elapsed < 2, f"took {elapsed:.1f} s"
    assert output["ipv6"] is False and output["started"] == ports
    # Run directly, a module's warnings are structured (Ansible prints their text).
    assert "IPv6 is not available on this host" in json.dumps(output.get("warnings")), output
    targets = [(ADDRESS["b"], 43000, "tcp"), (ADDRESS["b"], 43000, "udp")]
    code = (f"import json, sys; sys.path.insert(0, {str(COLLECTIONS)!r}); "
            "from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import probe_ports; "
            f"print(json.dumps([r['state'] for r in probe_ports({targets!r}, timeout=1.0)]))")
    assert json.loads(hosts.python("a", code)) == ["open", "open"]
