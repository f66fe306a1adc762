"""Local multi-host lab: one podman container per inventory host.

Run through ``scripts/lab.sh`` (which points CONTAINERS_CONF at
scripts/lab/containers.conf). Standard library only, so it runs with the
system python3 or the repository venv.

Commands:
  up         create the dual-stack network and one container per inventory host,
             each with exactly its ``portguard_addresses``; idempotent
  down       remove the lab's containers and its network
  status     table of host, container, addresses and state (exit 3 if not all up)
  check      real TCP/UDP traffic between two lab hosts over IPv4 and IPv6
  ssh-setup  start sshd in hosts and authorize a key, for tests whose
             management connection must cross the (cuttable) network
  network    only create the dual-stack network (for Molecule platforms)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LABEL_NETWORK = "org.portguard.lab.network"
LABEL_PREFIX = "org.portguard.lab.prefix"
LABEL_HOST = "org.portguard.lab.host"
DEFAULTS = {
    "inventory": "examples/inventory",
    "prefix": "portguard-",
    "network": "portguard-lab",
    "subnet4": "172.30.89.0/24",
    "subnet6": "fd89:7067::/64",
    "image": os.environ.get("PORTGUARD_LAB_IMAGE", "localhost/portguard-lab:bookworm"),
    "state_dir": ".build/lab",
}


class LabError(Exception):
    """A lab operation failed; the message says what to do."""


@dataclass
class Host:
    name: str
    v4: str | None
    v6: str | None
    container: str = ""
    extra: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def run(
    cmd: list[str], *, check: bool = True, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def podman(
    *args: str, check: bool = True, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return run(["podman", *args], check=check, stdin=stdin, timeout=timeout)


# --- inventory -----------------------------------------------------------------------------------


def ansible_inventory_bin() -> str:
    candidates = [os.environ.get("PORTGUARD_ANSIBLE_INVENTORY", ""), str(REPO / ".venv/bin/ansible-inventory")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("ansible-inventory")
    if found:
        return found
    raise LabError("ansible-inventory not found: run scripts/setup.sh (creates .venv) or put ansible-core on PATH")


def load_hosts(
    inventory: str, subnet4: ipaddress.IPv4Network, subnet6: ipaddress.IPv6Network, prefix: str
) -> list[Host]:
    proc = run([ansible_inventory_bin(), "-i", inventory, "--list"])
    data = json.loads(proc.stdout)
    hostvars: dict[str, dict] = data.get("_meta", {}).get("hostvars", {})
    names = set(hostvars)
    for group, body in data.items():
        if group != "_meta" and isinstance(body, dict):
            names.update(body.get("hosts", []))
    if not names:
        raise LabError(f"inventory {inventory} has no hosts")
    hosts = []
    for name in sorted(names):
        addresses = hostvars.get(name, {}).get("portguard_addresses", [])
        if isinstance(addresses, str):
            addresses = [addresses]
        v4: list[str] = []
        v6: list[str] = []
        for raw in addresses:
            try:
                address = ipaddress.ip_address(str(raw))
            except ValueError as exc:
                raise LabError(f"{name}: portguard_addresses entry {raw!r} is not an IP address") from exc
            if address.version == 4:
                if address not in subnet4:
                    raise LabError(f"{name}: {address} is outside the lab subnet {subnet4}")
                v4.append(str(address))
            else:
                if address not in subnet6:
                    raise LabError(f"{name}: {address} is outside the lab subnet {subnet6}")
                v6.append(str(address))
        for family, found in (("IPv4", v4), ("IPv6", v6)):
            if len(found) > 1:
                raise LabError(f"{name}: a lab container has one {family} address, inventory gives {found}")
        hosts.append(Host(name, v4[0] if v4 else None, v6[0] if v6 else None, container=prefix + name))
    return hosts


# --- podman state --------------------------------------------------------------------------------


def inspect_container(name: str) -> dict | None:
    proc = podman("container", "inspect", name, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]


def container_addresses(info: dict, network: str) -> tuple[str | None, str | None]:
    net = info.get("NetworkSettings", {}).get("Networks", {}).get(network)
    if not net:
        return None, None
    return net.get("IPAddress") or None, net.get("GlobalIPv6Address") or None


def addresses_match(host: Host, v4: str | None, v6: str | None) -> bool:
    # A host without an address of a family in the inventory takes what podman assigns.
    return (host.v4 is None or host.v4 == v4) and (host.v6 is None or host.v6 == v6)


def image_id(image: str) -> str:
    proc = podman("image", "inspect", "--format", "{{.Id}}", image, check=False)
    if proc.returncode != 0:
        raise LabError(f"image {image} not found: run scripts/lab-image.sh first")
    return proc.stdout.strip()


def ensure_network(name: str, subnet4: str, subnet6: str) -> None:
    want = {subnet4, subnet6}
    proc = podman("network", "inspect", name, check=False)
    if proc.returncode == 0:
        have = {s["subnet"] for s in json.loads(proc.stdout)[0].get("subnets", [])}
        if have != want:
            raise LabError(
                f"network {name} exists with subnets {sorted(have)}, want {sorted(want)}: run 'lab.sh down' first"
            )
        return
    podman(
        "network",
        "create",
        "--ipv6",
        "--subnet",
        subnet4,
        "--subnet",
        subnet6,
        "--label",
        f"{LABEL_NETWORK}={name}",
        name,
    )
    log(f"created network {name} ({subnet4}, {subnet6})")


def lab_containers(network: str) -> list[str]:
    proc = podman("ps", "-a", "--filter", f"label={LABEL_NETWORK}={network}", "--format", "{{.Names}}")
    return [line for line in proc.stdout.split() if line]


def start_container(host: Host, args: argparse.Namespace) -> None:
    cmd = [
        "run",
        "--detach",
        "--name",
        host.container,
        "--hostname",
        host.name,
        "--network",
        args.network,
        # Capabilities to manage the container's own firewall and send raw probes,
        # and SYS_PTRACE so port_facts can read other users' /proc/<pid>/fd;
        # never the host's network namespace.
        "--cap-add",
        "NET_ADMIN,NET_RAW,SYS_PTRACE",
        # A PID 1 that handles SIGTERM: podman 4.3 ignores init=true in containers.conf.
        "--init",
        "--label",
        f"{LABEL_NETWORK}={args.network}",
        "--label",
        f"{LABEL_PREFIX}={args.prefix}",
        "--label",
        f"{LABEL_HOST}={host.name}",
    ]
    if host.v4:
        cmd += ["--ip", host.v4]
    if host.v6:
        cmd += ["--ip6", host.v6]
    podman(*cmd, args.image)


def netns_addresses(info: dict) -> list[dict]:
    """Addresses of the container's interfaces, read from its netns without podman exec."""
    sandbox = info.get("NetworkSettings", {}).get("SandboxKey", "")
    if sandbox and shutil.which("nsenter"):
        proc = run(["nsenter", f"--net={sandbox}", "ip", "-j", "addr", "show"], check=False)
    else:
        proc = podman("exec", info["Name"], "ip", "-j", "addr", "show", check=False)
    if proc.returncode != 0:
        return []
    return [addr for link in json.loads(proc.stdout or "[]") for addr in link.get("addr_info", [])]


def wait_addresses(hosts: list[Host], timeout: float) -> float:
    """Wait until every IPv6 address has passed duplicate address detection.

    A tentative address cannot be used as a source or receive traffic yet, so
    the first probes after ``up`` would fail at random without this wait.
    """
    start = time.monotonic()
    pending = {h.container: h for h in hosts}
    while pending:
        for name, host in list(pending.items()):
            info = inspect_container(name)
            if info is None:
                raise LabError(f"container {name} vanished while waiting for its addresses")
            found = netns_addresses(info)
            addrs = {a.get("local"): a for a in found}
            # Any tentative address (link-local included) means DAD is still running.
            ready = not any(a.get("tentative") for a in found)
            for want in (host.v4, host.v6):
                if want is None:
                    continue
                addr = addrs.get(want)
                if addr is None or addr.get("tentative") or addr.get("dadfailed"):
                    ready = False
                if addr is not None and addr.get("dadfailed"):
                    raise LabError(f"{name}: duplicate address detection failed for {want}")
            if ready:
                del pending[name]
        if not pending:
            break
        if time.monotonic() - start > timeout:
            raise LabError(f"addresses not ready after {timeout:.0f} s: {sorted(pending)}")
        time.sleep(0.2)
    return time.monotonic() - start


def write_connection_file(hosts: list[Host], path: Path, pipelined: bool) -> None:
    """Inventory fragment that reaches each host by ``podman exec``.

    JSON string quoting is valid YAML, so names cannot break the file.
    """
    plugins = REPO / "scripts/lab/connection_plugins"
    lines = [
        "# Written by scripts/lab.sh up: reach each lab host through podman exec.",
        "# Use together with the inventory: ansible-playbook -i <inventory> -i <this file> ...",
    ]
    if pipelined:
        lines += [
            f"# Needs ANSIBLE_CONNECTION_PLUGINS={plugins} and ANSIBLE_PIPELINING=true",
            "# (containers.podman.podman cannot pipeline: 4 podman exec per module instead of 1).",
        ]
    lines += [
        "all:",
        "  vars:",
        f"    ansible_connection: {'podman_pipelined' if pipelined else 'containers.podman.podman'}",
        "    ansible_python_interpreter: /usr/bin/python3",
        "  hosts:",
    ]
    for host in hosts:
        lines.append(f"    {json.dumps(host.name)}:")
        lines.append(f"      ansible_host: {json.dumps(host.container)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- commands ------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, hosts: list[Host]) -> int:
    start = time.monotonic()
    if not args.no_build:
        # Instant when the image matches its build inputs; builds it (~1 min) otherwise.
        proc = run(["bash", str(REPO / "scripts/lab-image.sh"), "--image", args.image], timeout=1800)
        log(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "image ready")
    want_image = image_id(args.image)
    ensure_network(args.network, args.subnet4, args.subnet6)
    wanted = {h.container for h in hosts}
    for stale in lab_containers(args.network):
        info = inspect_container(stale)
        if info and info.get("Config", {}).get("Labels", {}).get(LABEL_PREFIX) == args.prefix and stale not in wanted:
            podman("rm", "--force", "--time", "0", stale)
            log(f"removed {stale}: no longer in the inventory")
    created = kept = 0
    for host in hosts:
        info = inspect_container(host.container)
        if info is not None:
            v4, v6 = container_addresses(info, args.network)
            networks = set(info.get("NetworkSettings", {}).get("Networks", {}))
            good = (
                info.get("State", {}).get("Running")
                and info.get("Image") == want_image
                and networks == {args.network}
                and addresses_match(host, v4, v6)
            )
            if good:
                kept += 1
                continue
            podman("rm", "--force", "--time", "0", host.container)
            log(f"recreating {host.container}: state, image or addresses differ")
        start_container(host, args)
        created += 1
    waited = wait_addresses(hosts, args.timeout)
    write_connection_file(hosts, Path(args.connection_file), args.pipelined)
    prune_old_images()
    log(
        f"up: {created} created, {kept} kept, addresses ready after {waited:.1f} s, "
        f"total {time.monotonic() - start:.1f} s; connection inventory: {args.connection_file}"
    )
    return 0


def prune_old_images() -> None:
    """Remove lab images that a rebuild untagged, once no container uses them."""
    proc = podman("images", "--quiet", "--filter", "dangling=true", "--filter", "label=org.portguard.lab.inputs")
    for old in sorted(set(proc.stdout.split())):
        # No --force: an image still used by a container (another lab, Molecule) stays.
        podman("image", "rm", old, check=False)


def cmd_network(args: argparse.Namespace, hosts: list[Host]) -> int:
    """Only the dual-stack network, for tools that start their own containers (Molecule)."""
    ensure_network(args.network, args.subnet4, args.subnet6)
    log(f"network {args.network} ready ({args.subnet4}, {args.subnet6})")
    return 0


def cmd_down(args: argparse.Namespace, hosts: list[Host]) -> int:
    start = time.monotonic()
    names = set(lab_containers(args.network)) | {h.container for h in hosts}
    present = [n for n in sorted(names) if inspect_container(n) is not None]
    if present:
        podman("rm", "--force", "--time", "0", *present)
    if podman("network", "exists", args.network, check=False).returncode == 0:
        podman("network", "rm", args.network)
    conn = Path(args.connection_file)
    if conn.exists():
        conn.unlink()
    prune_old_images()
    log(f"down: removed {len(present)} containers and network {args.network} in {time.monotonic() - start:.1f} s")
    return 0


def cmd_status(args: argparse.Namespace, hosts: list[Host]) -> int:
    rows = [("HOST", "CONTAINER", "IPV4", "IPV6", "STATE")]
    all_up = podman("network", "exists", args.network, check=False).returncode == 0
    known = set()
    for host in hosts:
        known.add(host.container)
        info = inspect_container(host.container)
        if info is None:
            rows.append((host.name, host.container, host.v4 or "-", host.v6 or "-", "absent"))
            all_up = False
            continue
        v4, v6 = container_addresses(info, args.network)
        state = info.get("State", {}).get("Status", "?")
        if state != "running":
            all_up = False
        if not addresses_match(host, v4, v6):
            state += " (addresses differ from inventory)"
            all_up = False
        rows.append((host.name, host.container, v4 or "-", v6 or "-", state))
    for extra in lab_containers(args.network):
        if extra not in known:
            info = inspect_container(extra) or {}
            v4, v6 = container_addresses(info, args.network)
            rows.append(("(not in inventory)", extra, v4 or "-", v6 or "-", info.get("State", {}).get("Status", "?")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    if not all_up:
        print(
            f"network {args.network}: "
            + ("present" if podman("network", "exists", args.network, check=False).returncode == 0 else "absent")
        )
    return 0 if all_up else 3


def host_firewall_report() -> str:
    """What the host does to bridged traffic, to explain a failed check."""
    parts = []
    for sysctl in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
        path = Path("/proc/sys") / sysctl.replace(".", "/")
        parts.append(f"{sysctl}={path.read_text().strip() if path.exists() else 'n/a'}")
    for tool in ("iptables", "iptables-legacy", "ip6tables", "ip6tables-legacy"):
        if shutil.which(tool):
            proc = run([tool, "-w", "-S", "FORWARD"], check=False)
            lines = proc.stdout.splitlines()
            policy = next((ln for ln in lines if ln.startswith("-P")), "?")
            # netavark's own jump accepts lab traffic; anything else may drop it.
            others = [ln for ln in lines if ln.startswith("-A") and "NETAVARK" not in ln]
            parts.append(f"{tool}: {policy}" + (f", rules: {' | '.join(others[:5])}" if others else ""))
    return "; ".join(parts)


def lab_exec(container: str, script: str, *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return podman("exec", container, "sh", "-c", script, check=check, timeout=timeout)


# Runs inside a lab container: send one line over TCP or UDP, print the first answer.
PROBE = """
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
with socket.socket(family, kind) as sock:
    sock.settimeout(3)
    sock.connect((host, port))
    sock.sendall(b"ping\\n")
    print(sock.recv(4096).decode(errors="replace"))
"""


def cmd_check(args: argparse.Namespace, hosts: list[Host]) -> int:
    """Real traffic between two containers, both families, TCP and UDP, plus ping."""
    by_name = {h.name: h for h in hosts}
    names = [args.client, args.server] if args.client and args.server else [h.name for h in hosts[:2]]
    if len(names) < 2 or any(n not in by_name for n in names):
        raise LabError("check needs two inventory hosts (--client HOST --server HOST)")
    client, server = by_name[names[0]], by_name[names[1]]
    port = args.port
    token = f"portguard-lab-{os.getpid()}"
    # One dual-stack listener per protocol (ipv6only=0 also accepts IPv4); their
    # PIDs are recorded so that exactly these processes are stopped afterwards.
    pids = lab_exec(
        server.container,
        f"socat TCP6-LISTEN:{port},ipv6only=0,reuseaddr,fork SYSTEM:'echo {token}' >/dev/null 2>&1 & echo $!; "
        f"socat UDP6-RECVFROM:{port},ipv6only=0,reuseaddr,fork SYSTEM:'echo {token}' >/dev/null 2>&1 & echo $!",
    ).stdout.split()
    failures = []
    try:
        # Wait for the listeners inside the server before probing from the client.
        # Both sockets: probing before the UDP one is bound fails at random under load.
        for _attempt in range(50):
            if len(lab_exec(server.container, f"ss -Htuln 'sport = :{port}'").stdout.splitlines()) >= 2:
                break
            time.sleep(0.1)
        for family, address in (("IPv4", server.v4), ("IPv6", server.v6)):
            if address is None:
                continue
            for proto in ("tcp", "udp"):
                # The client returns as soon as the answer arrives (socat would wait a fixed
                # 0.5 s after its input ends, too short under load). UDP gets a second try:
                # a datagram may be lost, a blocked path stays blocked.
                for _attempt in range(2 if proto == "udp" else 1):
                    out = podman(
                        "exec", client.container, "python3", "-c", PROBE, proto, address, str(port), check=False
                    )  # fmt: skip
                    ok = token in out.stdout
                    if ok:
                        break
                print(f"{client.name} -> {server.name} {family} {proto}/{port}: {'ok' if ok else 'FAILED'}")
                if not ok:
                    failures.append(f"{family} {proto}: {(out.stderr.strip().splitlines() or ['no answer'])[-1]}")
            ping = "ping" if family == "IPv4" else "ping -6"
            out = lab_exec(client.container, f"{ping} -c1 -W2 {address}", check=False)
            print(f"{client.name} -> {server.name} {family} icmp echo: {'ok' if out.returncode == 0 else 'FAILED'}")
            if out.returncode != 0:
                failures.append(f"{family} ping: {out.stdout.strip()[-200:]}")
    finally:
        lab_exec(server.container, "kill " + " ".join(pids), check=False)
    if failures:
        print("host firewall: " + host_firewall_report(), file=sys.stderr)
        raise LabError("cross-container traffic failed: " + "; ".join(failures))
    return 0


def ensure_key(path: Path) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "portguard-lab", "-f", str(path)])
    return path


def wait_port(address: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def cmd_ssh_setup(args: argparse.Namespace, hosts: list[Host]) -> int:
    by_name = {h.name: h for h in hosts}
    targets = hosts if args.hosts == ["all"] else []
    for name in [] if targets else args.hosts:
        if name not in by_name:
            raise LabError(f"unknown host {name}")
        targets.append(by_name[name])
    ssh_dir = Path(args.state_dir) / "ssh"
    key = ensure_key(Path(args.key) if args.key else ssh_dir / "id_ed25519")
    pubkey = key.with_name(key.name + ".pub").read_text(encoding="utf-8")
    known_hosts = ssh_dir / "known_hosts"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    if known_hosts.exists():
        for line in known_hosts.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entries[line.split()[0]] = line
    for host in targets:
        if host.v4 is None:
            raise LabError(f"{host.name}: no IPv4 address to reach sshd on")
        # Host keys are made per container (the image ships none); /run/sshd is
        # sshd's privilege separation directory, absent in a fresh container.
        podman(
            "exec",
            "-i",
            host.container,
            "sh",
            "-c",
            "umask 077; mkdir -p /root/.ssh /run/sshd && cat > /root/.ssh/authorized_keys"
            " && ssh-keygen -A >/dev/null && (pgrep -x sshd >/dev/null || /usr/sbin/sshd)",
            stdin=pubkey,
        )
        hostkey = lab_exec(host.container, "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()
        names = ",".join(a for a in (host.v4, host.v6) if a)
        entries[names] = f"{names} {hostkey[0]} {hostkey[1]}"
        wait_port(host.v4, 22, 10)
    known_hosts.write_text("\n".join(entries[k] for k in sorted(entries)) + "\n", encoding="utf-8")
    ssh_opts = f"-i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes -o BatchMode=yes"
    for host in targets:
        # Prove the path works (and surface the exact ssh error if not).
        proc = run(["ssh", *shlex.split(ssh_opts), f"root@{host.v4}", "true"], check=False, timeout=30)
        if proc.returncode != 0:
            raise LabError(f"{host.name}: ssh root@{host.v4} failed: {proc.stderr.strip()}")
        fragment = ssh_dir / f"{host.name}.yml"
        fragment.write_text(
            "# Written by scripts/lab.sh ssh-setup: reach this host over its address (cuttable by its firewall).\n"
            "all:\n  hosts:\n"
            f"    {json.dumps(host.name)}:\n"
            "      ansible_connection: ssh\n"
            f"      ansible_host: {json.dumps(host.v4)}\n"
            "      ansible_user: root\n"
            f"      ansible_ssh_private_key_file: {json.dumps(str(key))}\n"
            f"      ansible_ssh_common_args: {json.dumps(f'-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes')}\n"
            "      ansible_python_interpreter: /usr/bin/python3\n",
            encoding="utf-8",
        )
        print(f"{host.name}: ssh {ssh_opts} root@{host.v4}    (inventory fragment: {fragment})")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lab.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status", "check", "ssh-setup", "network"])
    parser.add_argument("hosts", nargs="*", help="ssh-setup: inventory hosts, or 'all'")
    parser.add_argument("--inventory", "-i", default=DEFAULTS["inventory"])
    parser.add_argument("--prefix", default=DEFAULTS["prefix"], help="container name = prefix + inventory host")
    parser.add_argument("--network", default=DEFAULTS["network"])
    parser.add_argument("--subnet4", default=DEFAULTS["subnet4"])
    parser.add_argument("--subnet6", default=DEFAULTS["subnet6"])
    parser.add_argument("--image", default=DEFAULTS["image"])
    parser.add_argument("--state-dir", default=DEFAULTS["state_dir"], help="connection inventory and ssh keys go here")
    parser.add_argument("--connection-file", help="default: <state-dir>/connection.yml")
    parser.add_argument("--timeout", type=float, default=30, help="seconds to wait for addresses")
    parser.add_argument("--no-build", action="store_true", help="up: do not run lab-image.sh first")
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="up: connection.yml uses scripts/lab/connection_plugins/podman_pipelined (1 exec per module)",
    )
    parser.add_argument("--client", help="check: host that connects")
    parser.add_argument("--server", help="check: host that listens")
    parser.add_argument("--port", type=int, default=18089, help="check: port of the test listener")
    parser.add_argument("--key", help="ssh-setup: private key (made if absent); default <state-dir>/ssh/id_ed25519")
    args = parser.parse_args(argv)
    # Relative paths are relative to the repository, so the script works from any directory.
    for attr in ("inventory", "state_dir"):
        value = Path(getattr(args, attr))
        setattr(args, attr, str(value if value.is_absolute() else REPO / value))
    args.connection_file = args.connection_file or str(Path(args.state_dir) / "connection.yml")
    if args.command == "ssh-setup" and not args.hosts:
        parser.error("ssh-setup needs inventory hosts (or 'all')")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CONTAINERS_CONF", str(REPO / "scripts/lab/containers.conf"))
    try:
        subnet4 = ipaddress.IPv4Network(args.subnet4)
        subnet6 = ipaddress.IPv6Network(args.subnet6)
        if shutil.which("podman") is None:
            raise LabError("podman not found (apt-get install podman runc netavark aardvark-dns catatonit)")
        # The network alone needs no inventory (Molecule brings its own hosts).
        hosts = [] if args.command == "network" else load_hosts(args.inventory, subnet4, subnet6, args.prefix)
        command = {
            "up": cmd_up,
            "down": cmd_down,
            "status": cmd_status,
            "check": cmd_check,
            "ssh-setup": cmd_ssh_setup,
            "network": cmd_network,
        }
        return command[args.command](args, hosts)
    except (LabError, ValueError, subprocess.TimeoutExpired, OSError) as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
