"""Smoke test of the podman lab (scripts/lab-image.sh, scripts/lab.sh).

Builds (or reuses) the lab image, starts a two-host lab on its own network and
subnets (so it never collides with the demo lab of examples/inventory), and
checks what later tests rely on: Ansible reaches the hosts through podman,
real TCP crosses the network between containers in both families, and sshd in
a container is reachable from the host over a path its firewall can cut.
Needs root and podman: missing requirements fail in CI and skip elsewhere.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.ansible import tool
from support.requirements import need, require

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
LAB = ROOT / "scripts" / "lab.sh"
IMAGE_SCRIPT = ROOT / "scripts" / "lab-image.sh"
CONTAINERS_CONF = ROOT / "scripts" / "lab" / "containers.conf"

PREFIX = "portguard-labtest-"
NETWORK = "portguard-labtest"
SUBNET4 = "172.30.90.0/24"
SUBNET6 = "fd89:7068::/64"
HOSTS = {
    "alpha": ("172.30.90.11", "fd89:7068::11"),
    "beta": ("172.30.90.12", "fd89:7068::12"),
}
INVENTORY = f"""\
all:
  children:
    clients:
      hosts:
        alpha:
          portguard_addresses: [{HOSTS["alpha"][0]}, "{HOSTS["alpha"][1]}"]
    servers:
      hosts:
        beta:
          portguard_addresses: [{HOSTS["beta"][0]}, "{HOSTS["beta"][1]}"]
"""


def run(
    cmd: list[str], *, env: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def lab_env() -> dict:
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF), ANSIBLE_DEPRECATION_WARNINGS="False")
    # lab.sh runs ansible-inventory; prefer the one next to the running interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("ANSIBLE_CONFIG", None)
    return env


class Lab:
    def __init__(self, state: Path):
        self.state = state
        self.inventory = state / "inventory.yml"
        self.connection = state / "connection.yml"
        self.env = lab_env()

    def sh(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        opts = [
            "--inventory", str(self.inventory), "--prefix", PREFIX, "--network", NETWORK,
            "--subnet4", SUBNET4, "--subnet6", SUBNET6, "--state-dir", str(self.state),
        ]  # fmt: skip
        return run([str(LAB), *args, *opts], env=self.env, check=check, timeout=timeout)

    def exec(self, host: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["podman", "exec", PREFIX + host, "sh", "-c", script], env=self.env, check=check, timeout=60)

    def ansible(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return run([tool("ansible") or "ansible", *args], env=env or self.env, timeout=180)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require("podman", "runc", "debootstrap", "ssh", "ssh-keygen")
    for name in ("ansible", "ansible-inventory"):
        need(tool(name) is not None, f"{name} (ansible-core; run scripts/setup.sh)")
    found = run([tool("ansible-doc"), "-t", "connection", "-l"], env=lab_env(), check=False).stdout
    need(
        "containers.podman.podman" in found,
        "the containers.podman collection (pip install ansible, see requirements-dev.txt)",
    )

    # Two test runs on one machine (two checkouts, xdist) would fight over the same
    # container names and network: the second waits for the first.
    # Opened without truncation and not through a symlink another user may have planted in /tmp.
    lock = os.fdopen(os.open(Path(tempfile.gettempdir()) / "portguard-labtest.lock",
                             os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    state = tmp_path_factory.mktemp("lab")
    lab = Lab(state)
    lab.inventory.write_text(INVENTORY, encoding="utf-8")
    started = time.monotonic()
    run(["bash", str(IMAGE_SCRIPT)], env=lab.env, timeout=900)
    lab.image_seconds = time.monotonic() - started
    # A previous run killed midway may have left the test lab behind.
    lab.sh("down")
    started = time.monotonic()
    lab.sh("up")
    lab.up_seconds = time.monotonic() - started
    try:
        yield lab
    finally:
        try:
            lab.sh("down")
            assert run(["podman", "network", "exists", NETWORK], env=lab.env, check=False).returncode != 0
            left = run(["podman", "ps", "-a", "--filter", f"name={PREFIX}", "--format", "{{.Names}}"], env=lab.env)
            assert not left.stdout.strip(), f"containers left after down: {left.stdout}"
        finally:
            lock.close()


def test_status_lists_every_host_running_with_its_addresses(lab):
    out = lab.sh("status").stdout
    for host, (v4, v6) in HOSTS.items():
        row = next(line for line in out.splitlines() if line.startswith(host + " "))
        assert row.split() == [host, PREFIX + host, v4, v6, "running"]


def test_up_again_keeps_the_running_containers(lab):
    before = run(["podman", "inspect", "--format", "{{.Id}}", PREFIX + "alpha", PREFIX + "beta"], env=lab.env).stdout
    result = lab.sh("up")
    assert "0 created, 2 kept" in result.stderr
    after = run(["podman", "inspect", "--format", "{{.Id}}", PREFIX + "alpha", PREFIX + "beta"], env=lab.env).stdout
    assert before == after


def test_containers_have_exactly_the_inventory_addresses_and_no_tentative_ones(lab):
    for host, (v4, v6) in HOSTS.items():
        out = lab.exec(host, "ip -o addr show dev eth0").stdout
        assert f"inet {v4}/24" in out
        assert f"inet6 {v6}/64" in out
        assert "tentative" not in out


def test_ansible_reaches_every_host_through_podman(lab):
    out = lab.ansible("all", "-i", str(lab.inventory), "-i", str(lab.connection), "-m", "ansible.builtin.ping").stdout
    assert out.count('"ping": "pong"') == len(HOSTS), out


def test_pipelined_podman_connection_needs_one_exec_per_module(lab):
    env = dict(
        lab.env, ANSIBLE_PIPELINING="True", ANSIBLE_CONNECTION_PLUGINS=str(ROOT / "scripts/lab/connection_plugins")
    )
    out = lab.ansible(
        "alpha", "-i", str(lab.inventory), "-i", str(lab.connection),
        "-e", "ansible_connection=podman_pipelined", "-m", "ansible.builtin.ping", "-vvv",
        env=env,
    ).stdout  # fmt: skip
    assert '"ping": "pong"' in out
    execs = re.findall(r"RUN \[b'[^']*podman', b'exec'", out)
    assert len(execs) == 1, out


def test_tcp_crosses_the_network_between_containers_in_both_families(lab):
    # The listener answers with the peer address it saw, proving the connection came
    # from alpha's own address over the lab network (no NAT, no loopback).
    pid = lab.exec(
        "beta",
        "socat TCP6-LISTEN:18090,ipv6only=0,reuseaddr,fork SYSTEM:'echo peer=$SOCAT_PEERADDR' >/dev/null 2>&1 & echo $!",
    ).stdout.strip()
    try:
        for _attempt in range(50):
            if ":18090 " in lab.exec("beta", "ss -Htln 'sport = :18090'").stdout:
                break
            time.sleep(0.1)
        for family, index in (("IPv4", 0), ("IPv6", 1)):
            target = HOSTS["beta"][index] if index == 0 else f"[{HOSTS['beta'][index]}]"
            # -t5: socat waits only 0.5 s for the answer after its input ends, too short under load.
            out = lab.exec(
                "alpha", f"echo hello | timeout 10 socat -t5 -T5 - TCP:{target}:18090,connect-timeout=5"
            ).stdout
            peer = ipaddress.ip_address(out.strip().removeprefix("peer=").strip("[]"))
            # A dual-stack listener sees an IPv4 peer as an IPv4-mapped IPv6 address.
            peer = getattr(peer, "ipv4_mapped", None) or peer
            assert peer == ipaddress.ip_address(HOSTS["alpha"][index]), f"{family}: {out!r}"
    finally:
        lab.exec("beta", f"kill {pid}", check=False)


def test_lab_check_passes(lab):
    out = lab.sh("check", "--client", "alpha", "--server", "beta").stdout
    assert out.count(": ok") == 6, out


def test_sshd_path_is_reachable_from_the_host_and_cuttable_by_the_container_firewall(lab):
    lab.sh("ssh-setup", "alpha")
    fragment = lab.state / "ssh" / "alpha.yml"
    out = lab.ansible("alpha", "-i", str(lab.inventory), "-i", str(fragment), "-m", "ansible.builtin.ping").stdout
    assert '"ping": "pong"' in out
    ssh = [
        "ssh", "-i", str(lab.state / "ssh" / "id_ed25519"), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={lab.state / 'ssh' / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
        "-o", "ConnectTimeout=3",
    ]  # fmt: skip
    for address in HOSTS["alpha"]:
        assert run([*ssh, f"root@{address}", "hostname"], timeout=30).stdout.strip() == "alpha"
    # A firewall rule inside the container cuts the ssh path, while podman exec
    # (which never crosses the network) still works: what a rollback test needs.
    rules = (
        "table inet labtest_cut {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 22 drop\n }\n}\n"
    )
    subprocess.run(
        ["podman", "exec", "-i", PREFIX + "alpha", "nft", "-f", "-"],
        input=rules, capture_output=True, text=True, env=lab.env, timeout=30, check=True,
    )  # fmt: skip
    try:
        cut = run([*ssh, f"root@{HOSTS['alpha'][0]}", "true"], timeout=30, check=False)
        assert cut.returncode == 255 and "timed out" in cut.stderr, cut.stderr
    finally:
        lab.exec("alpha", "nft delete table inet labtest_cut")
    assert run([*ssh, f"root@{HOSTS['alpha'][0]}", "true"], timeout=30).returncode == 0
