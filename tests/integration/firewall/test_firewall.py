"""portguard.hardening.firewall: real ``ansible-playbook`` runs against real podman containers.

Every host is a container of ``localhost/portguard-lab:bookworm`` (built by ``scripts/lab-image.sh``) on a
podman network of these tests (``pgit-net``, 172.30.91.0/24), with NET_ADMIN to manage its own firewall.
Most tests manage it with the podman connection: ``podman exec`` never crosses the container's network,
so nothing the firewall does can cut it. The lockout and killed-controller tests manage it over ssh to
its address, the path the firewall can cut, as on a real host.

Every container starts with foreign firewall state (Docker-like iptables-nft chains and NAT, a
fail2ban-like and a firewalld-like ``inet`` table, a kube-proxy-like ``ip`` table) that must come out of every run
byte-identical.

Not tested here, and why:
- the boot unit itself: these containers run no systemd. The unit's ExecStart command (the loader
  script) is run in a fresh container instead (``test_boot_loader_*``).
- a ruleset that passes ``nft -c`` and then fails to load: no such ruleset is known to us.

Needs root, podman and the lab image; skips locally when one is missing, fails under CI=true.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support.ansible import ansible_env
from support.requirements import need

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends import contract
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.persist import UNIT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"
ROOT = HERE.parents[2]
IMAGE = "localhost/portguard-lab:bookworm"
NETWORK = "pgit-net"
RUN = f"{os.getpid():x}"  # suffix of this run's container names
SUBNET = "172.30.91.0/24"
GATEWAY = "172.30.91.1"
BACKENDS = ("nftables", "iptables")
# Seconds before an unconfirmed change reverts: the default for runs that must confirm (a loaded
# 2-core machine needs seconds per `podman exec`), short for the runs that must revert.
ROLLBACK = 30
REVERT = 8

# Foreign firewall state: what Docker, fail2ban, firewalld and kube-proxy would leave on a host. None of these
# rules matches the tests' traffic, so even their counters must stay the same.
FOREIGN_SETUP = r"""
set -e
iptables -N DOCKER-USER
iptables -A DOCKER-USER -s 198.51.100.99 -j DROP
iptables -A DOCKER-USER -j RETURN
iptables -N DOCKER
iptables -A FORWARD -j DOCKER-USER
iptables -A FORWARD -o docker0 -j DOCKER
iptables -A INPUT -s 198.51.100.7 -j DROP
iptables -t nat -N DOCKER
iptables -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
iptables -t nat -A PREROUTING -s 198.51.100.0/24 -m addrtype --dst-type LOCAL -j DOCKER
ip6tables -N DOCKER-USER
ip6tables -A DOCKER-USER -j RETURN
ip6tables -A INPUT -s 2001:db8:66::7 -j DROP
ipset create f2b-sshd hash:ip
ipset add f2b-sshd 203.0.113.66
iptables -I INPUT -p tcp --dport 22 -m set --match-set f2b-sshd src -j REJECT
nft -f - <<'EOF'
table inet f2b-table {
    set addr-set-sshd { type ipv4_addr; elements = { 203.0.113.66 } }
    chain f2b-chain {
        type filter hook input priority filter - 1; policy accept;
        tcp dport 22 ip saddr @addr-set-sshd reject with icmp port-unreachable
    }
}
table inet firewalld {
    chain filter_INPUT {
        type filter hook input priority filter + 10; policy accept;
        ct state established,related accept
    }
}
table ip kube-proxy {
    map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }
    chain services {
        ip daddr . meta l4proto . th dport vmap @service-ips
    }
}
EOF
"""


# Logs every ipset call of the module (found first on PATH), then runs the real one.
IPSET_SHIM = """#!/bin/sh
echo "$*" >> /tmp/pgit-ipset.log
exec /usr/sbin/ipset "$@"
"""
IPSET_READS = {"list", "save", "test", "version", "help", "-n", "-v"}


# ------------------------------------------------------------------ the lab
class Lab:
    """Podman, the network and the environment of every ansible-playbook run."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.bin = Path(sys.executable).parent
        self.env = ansible_env(
            workdir,
            CONTAINERS_CONF=str(ROOT / "scripts" / "lab" / "containers.conf"),
            ANSIBLE_PIPELINING="1",
            ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
            ANSIBLE_HOST_KEY_CHECKING="0",
            # a short path: ssh control sockets must fit in 108 bytes
            ANSIBLE_SSH_CONTROL_PATH_DIR=tempfile.mkdtemp(prefix="pgcp"),
        )
        plugins = ROOT / "scripts" / "lab" / "connection_plugins"
        if (plugins / "podman_pipelined.py").exists():
            # containers.podman.podman cannot pipeline; this lab plugin adds `podman exec -i`
            self.env["ANSIBLE_CONNECTION_PLUGINS"] = str(plugins)
            self.podman_connection = "podman_pipelined"
        else:
            self.podman_connection = "containers.podman.podman"
        self.created_network = False

    def podman(self, *args, input=None, check=True, timeout=120):
        proc = subprocess.run(
            ["podman", *args], input=input, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check and proc.returncode:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def setup(self):
        if self.podman("network", "exists", NETWORK, check=False).returncode:
            created = self.podman("network", "create", "--subnet", SUBNET, "--gateway", GATEWAY, NETWORK, check=False)
            self.created_network = created.returncode == 0
            # another run of the suite may have created it meanwhile
            assert self.podman("network", "exists", NETWORK, check=False).returncode == 0, created.stderr

    def teardown(self):
        for sock in Path(self.env["ANSIBLE_SSH_CONTROL_PATH_DIR"]).glob("*"):
            subprocess.run(
                ["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "pgit"], capture_output=True, check=False, timeout=10
            )
        shutil.rmtree(self.env["ANSIBLE_SSH_CONTROL_PATH_DIR"], ignore_errors=True)
        if self.created_network:
            self.podman("network", "rm", NETWORK, check=False)  # refused while another run still uses it

    def container(self, name, ip=None, foreign=True, network=None):
        """A fresh container ``<name>-<run>``, on pgit-net with ``network`` (or an ``ip``), else without one.

        Names and addresses are per run (podman assigns the address; an ``ip`` only asks for the network):
        two runs of the suite on one machine (a CI clone and a work tree) must not clobber each other.
        """
        name = f"{name}-{RUN}"
        on_network = bool(ip) if network is None else network
        self.podman("rm", "-f", "-t", "0", name, check=False)  # a leftover of an interrupted run
        attach = ["--network", NETWORK] if on_network else ["--network", "none"]
        self.podman("run", "-d", "--name", name, "--hostname", name, *attach, "--cap-add", "NET_ADMIN,NET_RAW", IMAGE)
        ip = None
        if on_network:
            ip = self.podman(
                "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{NETWORK}").IPAddress}}}}', name
            ).stdout.strip()
        box = Box(self, name, ip)
        box.pid = self.podman("inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
        box.sh("cat > /usr/local/sbin/ipset && chmod 755 /usr/local/sbin/ipset", input=IPSET_SHIM)
        if foreign:
            box.sh(FOREIGN_SETUP)
        box.foreign_before = foreign_tables(box)
        return box

    def playbook(self, inventory, playbook="harden.yml", *, check=False, extra=(), background=None):
        argv = [str(self.bin / "ansible-playbook"), "-i", str(inventory), str(FILES / playbook), "--diff"]
        if check:
            argv.append("--check")
        for item in extra:
            argv += ["-e", item if isinstance(item, str) else json.dumps(item)]
        if background:
            with open(background, "w") as out:
                return subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir, start_new_session=True
                )
        started = time.monotonic()
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, cwd=self.workdir, timeout=300, check=False
        )
        return Run.parse(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@dataclass
class Run:
    rc: int
    data: dict
    stdout: str
    stderr: str
    seconds: float

    @classmethod
    def parse(cls, rc, stdout, stderr, seconds):
        try:
            data = json.loads(stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(
                f"ansible-playbook printed no JSON (rc {rc}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
            ) from exc
        return cls(rc, data, stdout, stderr, seconds)

    def result(self, host, task=0):
        return self.data["plays"][0]["tasks"][task]["hosts"][host]

    def stats(self, host):
        return self.data["stats"][host]

    def ok(self, host):
        """The firewall task's result, after checking that the run succeeded."""
        result = self.result(host)
        assert self.rc == 0 and not result.get("failed"), f"run failed: {result.get('msg')}\n{self.stderr[-2000:]}"
        return result


class Box:
    """One container: a host of the lab."""

    def __init__(self, lab, name, ip):
        self.lab, self.name, self.ip = lab, name, ip
        self.foreign_before = {}

    def sh(self, script, input=None, check=True):
        """Run ``script`` in the container's namespaces. The test's own look-ups use nsenter, not
        ``podman exec``: the same view of the host, without seconds of podman overhead on a loaded
        machine, which matters for the polls of the revert tests."""
        proc = subprocess.run(
            ["nsenter", "-t", self.pid, "-a", "sh", "-c", script],
            input=input,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            timeout=120,
            check=False,
        )
        if check and proc.returncode:
            raise AssertionError(
                f"{self.name}: {script!r} failed ({proc.returncode}): {proc.stderr.strip()} {proc.stdout.strip()}"
            )
        return proc.stdout if check else proc

    def exists(self, path):
        return self.sh(f"test -e {path}", check=False).returncode == 0

    def read_json(self, path):
        return json.loads(self.sh(f"cat {path}"))

    def remove(self):
        self.lab.podman("rm", "-f", "-t", "0", self.name, check=False)

    def ours(self, backend):
        """Our table or chains (with jumps to them), counters left out; '' when absent."""
        if backend == "nftables":
            proc = self.sh("nft -s list table inet portguard", check=False)
            return proc.stdout if proc.returncode == 0 else ""
        saved = self.sh("iptables-save -t filter; ip6tables-save -t filter")
        rules = [line for line in saved.splitlines() if "PORTGUARD" in line]
        sets = self.sh("for s in $(/usr/sbin/ipset list -n | grep '^portguard-'); do /usr/sbin/ipset save $s; done")
        # counters, and the hash parameters a fresh `create` picks at random, left out; elements sorted
        sets = [re.sub(r" (packets|bytes|hashsize|bucketsize|initval) \S+", "", line) for line in sets.splitlines()]
        return "\n".join(
            rules
            + sorted(line for line in sets if line.startswith("create"))
            + sorted(line for line in sets if line.startswith("add"))
        )

    def state_files(self):
        return {name: self.exists(f"/run/portguard/{name}") for name in ("pending.json", "reverted.json")}


def foreign_tables(box):
    """Every table but ours, as ``nft list table`` prints it (counters included), and every ipset but ours."""
    names = [line.removeprefix("table ") for line in box.sh("nft list tables").splitlines() if line.strip()]
    found = {name: strip_ours(box.sh(f"nft list table {name}")) for name in names if name != "inet portguard"}
    for name in box.sh("/usr/sbin/ipset list -n").split():  # the real one, not the shim
        if not name.startswith("portguard-"):
            found[f"ipset {name}"] = box.sh(f"/usr/sbin/ipset list {name}")
    return found


def strip_ours(text):
    """Drop the iptables backend's own chains (with the blank line that separates them) and jumps."""
    if "PORTGUARD-" not in text:
        return text
    kept, skipping, drop_blank = [], False, False
    for line in text.split("\n"):
        if re.fullmatch(r"\tchain PORTGUARD-(IN|OUT) \{", line):
            skipping = True
            if kept and kept[-1] == "":
                kept.pop()
            else:  # the table's first chain: the blank line follows it
                drop_blank = True
        elif skipping:
            skipping = line != "\t}"
        elif drop_blank and line == "":
            drop_blank = False
        elif "jump PORTGUARD-" not in line:
            drop_blank = False
            kept.append(line)
    return "\n".join(kept)


@contextlib.contextmanager
def kernel_writes(box):
    """Collect the kernel writes on ``box`` during the block: nf_tables events and ipset writes.

    ``nft monitor`` sees nft and iptables-nft. ipsets are not nf_tables objects and have no event
    stream: the containers' ``ipset`` is a shim (IPSET_SHIM) that logs each call, and every call
    but a read (list, save, test, version) counts as a write. A marker table added and deleted
    before and after the block proves the monitor was listening.
    """
    events = []
    ipset_calls = len(box.sh("cat /tmp/pgit-ipset.log 2>/dev/null || true").splitlines())
    tag = uuid.uuid4().hex[:8]
    log = f"/tmp/pgit-monitor-{tag}"
    box.lab.podman("exec", "-d", box.name, "sh", "-c", f"echo $$ > {log}.pid; exec nft monitor > {log} 2>&1")

    def mark(step):
        box.sh(f"nft add table inet pgit_mark_{tag}_{step}; nft delete table inet pgit_mark_{tag}_{step}")
        deadline = time.monotonic() + 10
        while f"delete table inet pgit_mark_{tag}_{step}" not in box.sh(f"cat {log}"):
            assert time.monotonic() < deadline, "nft monitor did not report the marker"
            time.sleep(0.1)

    deadline = time.monotonic() + 10
    while not box.exists(f"{log}.pid"):
        assert time.monotonic() < deadline, "nft monitor did not start"
        time.sleep(0.05)
    time.sleep(0.2)
    mark("start")
    try:
        yield events
    finally:
        mark("end")
        box.sh(f"kill $(cat {log}.pid)", check=False)
        lines = box.sh(f"cat {log}").splitlines()
        start = lines.index(f"delete table inet pgit_mark_{tag}_start")
        end = lines.index(f"add table inet pgit_mark_{tag}_end")
        events += [line for line in lines[start + 1 : end] if line.strip() and not line.startswith("#")]
        calls = box.sh("cat /tmp/pgit-ipset.log 2>/dev/null || true").splitlines()[ipset_calls:]
        events += [f"ipset {call}" for call in calls if call.split(" ")[0] not in IPSET_READS]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    need(os.geteuid() == 0, "root (containers with NET_ADMIN)")
    need(shutil.which("podman"), "podman")
    need(shutil.which("nsenter"), "nsenter (util-linux)")
    need((Path(sys.executable).parent / "ansible-playbook").exists(), "ansible-playbook next to the interpreter")
    instance = Lab(tmp_path_factory.mktemp("lab"))
    need(
        instance.podman("image", "exists", IMAGE, check=False).returncode == 0,
        f"image {IMAGE} (build it with scripts/lab-image.sh)",
    )
    site = Path(sysconfig.get_paths()["purelib"]) / "ansible_collections"
    need(
        (site / "containers" / "podman").is_dir() and (site / "ansible" / "posix").is_dir(),
        "the containers.podman and ansible.posix collections (pip install ansible)",
    )
    instance.setup()
    yield instance
    instance.teardown()


def write_inventory(path: Path, hosts: dict, catalog="catalog.yml"):
    """An inventory of ``hosts`` (name -> variables) with the catalog in ``all.vars``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    variables = yaml.safe_load((FILES / catalog).read_text())
    path.write_text(json.dumps({"all": {"vars": variables, "hosts": hosts}}, indent=1))  # JSON is YAML
    return path


def podman_host(lab, box, backend):
    return {
        box.name: {
            "ansible_connection": lab.podman_connection,
            "ansible_python_interpreter": "/usr/bin/python3",
            "portguard_addresses": [box.ip],
            "portguard_backend": backend,
            "portguard_rollback_timeout": ROLLBACK,
        }
    }


@pytest.fixture(scope="module", params=BACKENDS)
def core(lab, request, tmp_path_factory):
    """A fresh host per backend, managed with the podman connection."""
    backend = request.param
    box = lab.container(f"pgit-core-{backend}", network=True)
    box.backend = backend
    box.inventory = write_inventory(
        tmp_path_factory.mktemp(f"core-{backend}") / "hosts.yml", podman_host(lab, box, backend)
    )
    yield box
    box.remove()


def converge(lab, box, force=False):
    """Bring ``box`` to the catalog's state; a no-op when the previous test left it there.

    ``box.converged`` is cleared by a test before it changes the host, and set when it leaves the
    host converged, so a failed test never leaves a wrong state marked as converged.
    """
    if getattr(box, "converged", False) and not force:
        return None
    result = lab.playbook(box.inventory).ok(box.name)
    assert result.get("state", "confirmed") == "confirmed"
    box.converged = True
    return result


# ------------------------------------------------------------------ core: check, first, second, drift, foreign
# The tests of one backend run in file order on one host; each converges first when it needs to.
RULE_LINES = {
    "nftables": ["ip saddr . udp dport @in4_udp accept", "element 198.51.100.0/24 . 443"],
    "iptables": [
        "ipv4 -A PORTGUARD-IN -m set --match-set portguard-in4 src,dst -j ACCEPT",
        "ipset add portguard-in4 198.51.100.0/24,udp:53",
        "ipset add portguard-in6 2001:db8:51::/64,udp:53",
    ],
}


def test_check_mode_changes_nothing(lab, core):
    """Check mode on a fresh host reports the change with a rule-level diff and writes nothing at all."""
    assert core.ours(core.backend) == ""
    before = core.sh("nft list ruleset")
    with kernel_writes(core) as events:
        run = lab.playbook(core.inventory, check=True)
    result = run.ok(core.name)
    assert result["changed"] is True
    assert result["diff"]["before"] == ""
    for line in RULE_LINES[core.backend]:
        assert line in result["diff"]["after"]
    assert events == [], "check mode wrote to the kernel"
    assert core.sh("nft list ruleset") == before
    assert not core.exists("/etc/portguard") and not core.exists(contract.LOADER_PATH)
    assert core.state_files() == {"pending.json": False, "reverted.json": False}


def test_first_run_applies_confirms_and_persists(lab, core):
    """The first real run changes the host: ruleset live, confirmed (no revert pending), persisted."""
    run = lab.playbook(core.inventory)
    result = run.ok(core.name)
    assert result["changed"] is True and result["state"] == "confirmed" and result["token"]
    core.converged = True
    live = core.ours(core.backend)
    if core.backend == "nftables":
        assert '198.51.100.0/24 . 443 counter comment "clients-web/https: Public web traffic"' in live
        assert "reject with icmpx admin-prohibited" in live
    else:
        for line in RULE_LINES["iptables"]:
            assert line.split(" ", 1)[1] in live
        assert "-A INPUT -j PORTGUARD-IN" in live
    assert core.state_files() == {"pending.json": False, "reverted.json": False}
    persisted = "ruleset.nft" if core.backend == "nftables" else "ruleset.ipv4"
    assert core.exists(f"/etc/portguard/{persisted}") and core.exists(contract.LOADER_PATH)
    assert "systemd is not running" in result["persistence"]["unit"]
    assert foreign_tables(core) == core.foreign_before


def test_second_run_is_unchanged_without_kernel_write(lab, core):
    """A second run reports changed=0 and does not write to nf_tables at all (nft monitor stays silent)."""
    converge(lab, core)
    with kernel_writes(core) as events:
        run = lab.playbook(core.inventory)
    result = run.ok(core.name)
    assert result["changed"] is False and result["token"] is None
    assert run.stats(core.name)["changed"] == 0
    assert events == [], f"an unchanged run wrote to the kernel: {events[:5]}"
    assert foreign_tables(core) == core.foreign_before


def test_drift_is_reported_in_check_mode_and_repaired(lab, core):
    """A deleted rule and an added allow are reported by check mode (diff) and repaired by the next run."""
    converge(lab, core)
    good = core.ours(core.backend)
    core.converged = False
    if core.backend == "nftables":
        handles = core.sh("nft -a list chain inet portguard input")
        handle = re.search(r"ip saddr \. udp dport @in4_udp accept # handle (\d+)", handles).group(1)
        core.sh(f"nft delete rule inet portguard input handle {handle}")
        core.sh("nft add element inet portguard in4_tcp '{ 203.0.113.0/24 . 22 }'")
        removed, added = "ip saddr . udp dport @in4_udp accept", "203.0.113.0/24 . 22"
    else:
        core.sh("ipset del portguard-in4 198.51.100.0/24,udp:53")
        core.sh("ipset add portguard-in4 203.0.113.0/24,tcp:22")
        core.sh("iptables -I PORTGUARD-IN 1 -s 203.0.113.0/24 -p tcp --dport 22 -j ACCEPT")
        core.sh("ip6tables -D INPUT -j PORTGUARD-IN")  # IPv6 left unfiltered, e.g. by a script flushing INPUT
        removed, added = RULE_LINES["iptables"][1], "203.0.113.0/24"
        assert core.sh("ip6tables -C INPUT -j PORTGUARD-IN", check=False).returncode != 0
    drifted = core.ours(core.backend)
    assert drifted != good

    check = lab.playbook(core.inventory, check=True).ok(core.name)
    assert check["changed"] is True
    assert removed in check["diff"]["after"] and removed not in check["diff"]["before"]
    assert added in check["diff"]["before"] and added not in check["diff"]["after"]
    if core.backend == "iptables":
        jump = "ipv6 -A INPUT -j PORTGUARD-IN"
        assert jump in check["diff"]["after"] and jump not in check["diff"]["before"]
    assert core.ours(core.backend) == drifted, "check mode repaired the drift"

    repair = lab.playbook(core.inventory).ok(core.name)
    assert repair["changed"] is True and repair["state"] == "confirmed"
    assert core.ours(core.backend) == good

    # drift of the persisted boot files alone (the live rules are right): repaired too
    persisted = f"{contract.PERSIST_DIR}/{'ruleset.nft' if core.backend == 'nftables' else 'ruleset.ipv4'}"
    saved = core.sh(f"cat {persisted}")
    core.sh(f"echo '# edited by hand' >> {persisted}")
    files = lab.playbook(core.inventory).ok(core.name)
    assert files["changed"] is True and files["persistence"]["files"] == [persisted]
    assert core.sh(f"cat {persisted}") == saved

    assert lab.playbook(core.inventory).ok(core.name)["changed"] is False
    core.converged = True
    assert foreign_tables(core) == core.foreign_before


def test_state_absent_removes_only_ours(lab, core):
    """state=absent removes our table/chains and persisted files, and nothing else; a second time is unchanged."""
    converge(lab, core)
    core.converged = False
    result = lab.playbook(core.inventory, extra=[{"pgit_state": "absent"}]).ok(core.name)
    assert result["changed"] is True
    assert core.ours(core.backend) == ""
    assert not core.sh("ls -A /etc/portguard 2>/dev/null || true").strip()
    assert not core.exists(contract.LOADER_PATH)
    assert foreign_tables(core) == core.foreign_before
    again = lab.playbook(core.inventory, extra=[{"pgit_state": "absent"}]).ok(core.name)
    assert again["changed"] is False


def test_iptables_without_ipset_falls_back_to_rules(lab, tmp_path):
    """A host whose ipset does not work gets one rule per source, a warning, and an idempotent second run.

    The ``ipset`` the module finds fails as it does on a kernel without ip_set; the foreign set of the
    fail2ban-like setup stays, read by the test through the real tool.
    """
    box = lab.container("pgit-noipset", network=True)
    try:
        box.sh(
            "cat > /usr/local/sbin/ipset",
            input='#!/bin/sh\necho "$*" >> /tmp/pgit-ipset.log\n'
            "echo 'ipset v7.17: Kernel error received: Protocol not supported' >&2\nexit 1\n",
        )
        inventory = write_inventory(tmp_path / "hosts.yml", podman_host(lab, box, "iptables"))
        first = lab.playbook(inventory).ok(box.name)
        assert first["changed"] is True and first["state"] == "confirmed"
        assert first["iptables_whitelist"] == "rules"
        assert any("no usable ipset" in warning for warning in first["warnings"])
        live = box.ours("iptables")
        assert "-A PORTGUARD-IN -s 198.51.100.0/24 -p udp -m udp --dport 53" in live and "--match-set" not in live
        with kernel_writes(box) as events:
            second = lab.playbook(inventory).ok(box.name)
        assert second["changed"] is False and events == [], events[:5]
        assert foreign_tables(box) == box.foreign_before
    finally:
        box.remove()


# ------------------------------------------------------------------ host-side validation of a bad ruleset
# Shaped like the renderer's output, but the set it uses is missing: only `nft -c` can tell. Applied
# without validation, its first two lines alone would already have deleted the live table.
BAD_NFT = """table inet portguard
delete table inet portguard
table inet portguard {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tip saddr . tcp dport @in4_tcp accept
\t\tcounter name "denied_in" reject with icmpx admin-prohibited
\t}
}
"""
# Valid IPv4 chains that differ from the live ones, and IPv6 chains that ip6tables-restore refuses:
# nothing of either family may be applied.
BAD_IPTABLES = {
    "ipv4": "*filter\n:PORTGUARD-IN - [0:0]\n-A PORTGUARD-IN -i lo -j ACCEPT\n-A PORTGUARD-IN -j DROP\nCOMMIT\n",
    "ipv6": "*filter\n:PORTGUARD-IN - [0:0]\n-A PORTGUARD-IN -m conntrack --ctstate BOGUS -j ACCEPT\nCOMMIT\n",
    "jumps": [["INPUT", "PORTGUARD-IN"]],
}


def test_ruleset_refused_by_host_validation_changes_nothing(lab, core, tmp_path):
    """A ruleset that fails ``nft -c`` / ``iptables-restore --test`` on the host changes nothing.

    The firewall action only ever sends rulesets it rendered itself, so the test calls the real host
    module over the real connection through a test-only action (files/action_plugins/pgit_raw_firewall.py).
    """
    converge(lab, core)
    before = core.sh("nft list ruleset")
    bad = BAD_NFT if core.backend == "nftables" else BAD_IPTABLES
    extra = tmp_path / "bad.json"
    extra.write_text(json.dumps({"pgit_backend": core.backend, "pgit_ruleset": bad}))
    with kernel_writes(core) as events:
        run = lab.playbook(core.inventory, "raw_apply.yml", extra=[f"@{extra}"])
    result = run.result(core.name)
    assert run.rc != 0 and result.get("failed") and result["changed"] is False
    if core.backend == "nftables":
        assert "nft -c rejected the ruleset, nothing was changed" in result["msg"]
    else:
        assert "ip6tables-restore --test rejected the ipv6 rules, nothing was changed" in result["msg"]
    assert events == [], f"a refused ruleset wrote to the kernel: {events[:5]}"
    assert core.sh("nft list ruleset") == before
    assert core.state_files() == {"pending.json": False, "reverted.json": False}


# ------------------------------------------------------------------ persistence: the boot loader
def test_boot_loader_loads_persisted_ruleset_or_falls_back(lab, core, tmp_path):
    """The persisted files load in a fresh host; a corrupted ruleset falls back to management-only.

    No systemd runs in these containers, so ``portguard.service`` itself is not booted: its ExecStart
    command (the loader) runs in fresh containers holding only the files copied from a converged host.
    """
    assert f"ExecStart={contract.LOADER_PATH}" in UNIT
    converge(lab, core)
    good = core.ours(core.backend)
    lab.podman("cp", f"{core.name}:{contract.PERSIST_DIR}", str(tmp_path / "persist"))
    lab.podman("cp", f"{core.name}:{contract.LOADER_PATH}", str(tmp_path / "loader"))
    broken = "ruleset.nft" if core.backend == "nftables" else "ruleset.ipv6"  # IPv6: after IPv4 loaded fine

    def boot(corrupt):
        box = lab.container(f"pgit-boot-{core.backend}", foreign=False)
        try:
            lab.podman("cp", str(tmp_path / "persist"), f"{box.name}:{contract.PERSIST_DIR}")
            lab.podman("cp", str(tmp_path / "loader"), f"{box.name}:{contract.LOADER_PATH}")
            if corrupt:
                box.sh(
                    f"sed -i 's/^COMMIT$/-A PORTGUARD-IN --no-such-option\\nCOMMIT/; $a this is not a rule' "
                    f"{contract.PERSIST_DIR}/{broken}"
                )
            proc = box.sh(contract.LOADER_PATH, check=False)
            assert proc.returncode == 0, proc.stderr
            return box.ours(core.backend), proc.stderr
        finally:
            box.remove()

    loaded, stderr = boot(corrupt=False)
    assert loaded == good
    assert "fallback" not in stderr
    loaded, stderr = boot(corrupt=True)
    assert "loading the management-only fallback" in stderr
    if core.backend == "iptables":  # the fallback has no sets, and leaves none of the failed load behind
        assert "--match-set" not in loaded
        assert not [line for line in loaded.splitlines() if line.startswith(("create ", "add "))], loaded
    assert "198.51.100.0/24" not in loaded and "2001:db8:51::/64" not in loaded  # no flow survives
    if core.backend == "nftables":
        elements = re.search(r"set in4_tcp \{.*?elements = \{(.*?)\}", loaded, re.S).group(1)
        assert [e.split(" counter")[0].strip() for e in elements.split(",")] == ["192.0.2.0/24 . 22"]
        assert "reject with icmpx admin-prohibited" in loaded
    else:
        assert "-A PORTGUARD-IN -s 192.0.2.0/24 -p tcp -m tcp --dport 22" in loaded
        assert "-A PORTGUARD-IN -s 2001:db8:99::/64 -p tcp -m tcp --dport 22" in loaded
        assert loaded.count("-A INPUT -j PORTGUARD-IN") == 2  # both families
        assert "-j REJECT" in loaded


# ------------------------------------------------------------------ legacy iptables next to nftables
def test_legacy_iptables_conflict_is_refused(lab, tmp_path):
    """Legacy (x_tables) rules next to nf_tables: a clear error naming the conflict, nothing applied."""
    box = lab.container("pgit-legacy", network=True, foreign=False)
    try:
        box.sh("iptables-legacy -A INPUT -s 192.0.2.1 -j DROP")
        legacy = box.sh("iptables-legacy-save -t filter | grep '^-A'")
        for backend in BACKENDS:  # iptables here is iptables-nft: it writes nf_tables too
            inventory = write_inventory(tmp_path / backend / "hosts.yml", podman_host(lab, box, backend))
            run = lab.playbook(inventory)
            result = run.result(box.name)
            assert run.rc != 0 and result.get("failed"), f"{backend}: the conflict was not refused"
            assert "conflict: 1 legacy iptables rule(s)" in result["msg"]
            assert "alongside nftables" in result["msg"]
            assert box.ours(backend) == ""
            assert not box.exists(contract.PERSIST_DIR)
            assert box.sh("iptables-legacy-save -t filter | grep '^-A'") == legacy
        box.sh("iptables-legacy -D INPUT -s 192.0.2.1 -j DROP")
        assert lab.playbook(inventory).ok(box.name)["changed"] is True  # the refusal was the conflict alone
    finally:
        box.remove()


# ------------------------------------------------------------------ over ssh: lockout, killed controller, concurrency
@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory):
    need(shutil.which("ssh") and shutil.which("ssh-keygen"), "the OpenSSH client")
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def can_connect(address, port=22, timeout=3.0):
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module", params=BACKENDS)
def ssh_host(lab, request, ssh_key, tmp_path_factory):
    """A host with sshd, managed over ssh to its address: the path its firewall can cut."""
    backend = request.param
    box = lab.container(f"pgit-ssh-{backend}", network=True)
    box.backend = backend
    box.sh("ssh-keygen -A >/dev/null && mkdir -p /run/sshd /root/.ssh && chmod 700 /root/.ssh")
    box.sh(
        "cat > /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys",
        input=Path(f"{ssh_key}.pub").read_text(),
    )
    box.sh("/usr/sbin/sshd")
    deadline = time.monotonic() + 30
    while not can_connect(box.ip):
        assert time.monotonic() < deadline, "sshd did not come up"
        time.sleep(0.2)
    box.root = Path(lab.podman("mount", box.name).stdout.strip())  # /run/portguard, read without podman exec
    box.inventory = write_inventory(
        tmp_path_factory.mktemp(f"ssh-{backend}") / "hosts.yml",
        {
            box.name: {
                "ansible_host": box.ip,
                "ansible_user": "root",
                "ansible_connection": "ssh",
                "ansible_ssh_private_key_file": str(ssh_key),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                "ansible_python_interpreter": "/usr/bin/python3",
                "portguard_addresses": [box.ip],
                "portguard_backend": backend,
                "portguard_rollback_timeout": ROLLBACK,
            }
        },
    )
    yield box
    lab.podman("umount", box.name, check=False)
    box.remove()


def pending_record(box, deadline=60.0, proc=None):
    """Wait for an armed revert on ``box`` and return its record (read through the container's mount)."""
    path = box.root / "run" / "portguard" / "pending.json"
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc is None or proc.poll() is None, "the run ended before a revert was armed"
        time.sleep(0.01)
    raise AssertionError("no revert was armed")


def kill_tree(pid):
    """SIGKILL a process and all its descendants: ansible's workers leave its process group (setsid)."""

    def tree():
        children = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [pid]
        while todo:
            found.append(todo.pop())
            todo += children.get(found[-1], [])
        return found

    for sig in (signal.SIGSTOP, signal.SIGKILL):  # freeze first, so that nothing forks in between
        for member in tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, sig)


def finished(proc, log, timeout):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise
    return Run.parse(proc.returncode, Path(log).read_text(), "", 0.0)


def test_lockout_reverts_within_timeout_and_host_stays_reachable(lab, ssh_host, tmp_path):
    """A ruleset that passes the controller's check but shuts the controller out really reverts.

    The controller is told its address is 192.0.2.10 (inside the management floor, so the lockout check
    passes); its real address 172.30.91.1 is then refused by the live rules, the confirmation over a
    fresh ssh connection fails, and the host restores the previous ruleset by itself.
    """
    box, backend = ssh_host, ssh_host.backend
    converged = converge(lab, box, force=True)
    assert converged["controller_addresses"] == [GATEWAY]
    good = box.ours(backend)
    box.converged = False
    persisted = box.sh(f"cat {contract.PERSIST_DIR}/ruleset.*")
    proc = lab.playbook(
        box.inventory,
        background=tmp_path / "run.json",
        extra=[{"pgit_controller_addresses": ["192.0.2.10"], "portguard_rollback_timeout": REVERT}],
    )
    pending = pending_record(box, proc=proc)
    deadline = time.monotonic() + REVERT
    while box.ours(backend) == good and time.monotonic() < deadline:
        time.sleep(0.1)
    assert box.ours(backend) != good, "the lockout ruleset was never live"
    assert not can_connect(box.ip), "the lockout ruleset did not shut the controller out"
    run = finished(proc, tmp_path / "run.json", timeout=REVERT + 120)
    result = run.result(box.name)
    assert run.rc != 0 and result.get("failed")
    assert result["msg"].startswith("reverted: ") and "host reports: reverted" in result["msg"], result["msg"]
    reverted = box.read_json("/run/portguard/reverted.json")
    assert reverted["token"] == pending["token"] and reverted["errors"] == []
    assert 0 <= reverted["at"] - pending["deadline"] < 3, "the revert did not fire at the timeout"
    assert box.ours(backend) == good
    assert box.sh(f"cat {contract.PERSIST_DIR}/ruleset.*") == persisted, "an unconfirmed ruleset was persisted"
    assert foreign_tables(box) == box.foreign_before
    assert can_connect(box.ip)
    assert lab.playbook(box.inventory).ok(box.name)["changed"] is False  # reachable, and exactly as before
    box.converged = True


def test_killed_controller_mid_apply_reverts(lab, ssh_host, tmp_path):
    """SIGKILL of the whole controller (ansible-playbook and its workers) right after the host armed its
    revert: the change goes live, then the host reverts by itself at the timeout, and the next run is not
    blocked by a stale lock or pending record.

    The host starts without our rules (a first hardening), so the revert must remove them again: the
    lockout test covers the revert to a previous ruleset.
    """
    box, backend = ssh_host, ssh_host.backend
    box.converged = False
    lab.playbook(box.inventory, extra=[{"pgit_state": "absent"}]).ok(box.name)
    assert box.ours(backend) == ""
    proc = lab.playbook(box.inventory, background=tmp_path / "run.json", extra=[{"portguard_rollback_timeout": REVERT}])
    pending = pending_record(box, proc=proc)
    kill_tree(proc.pid)
    proc.wait(timeout=30)
    while not box.ours(backend) and time.time() < pending["deadline"]:
        time.sleep(0.1)
    assert "198.51.100.0/24" in box.ours(backend), "the change never went live: nothing to revert"
    end = time.monotonic() + REVERT + 10
    while not box.exists("/run/portguard/reverted.json") and time.monotonic() < end:
        time.sleep(0.2)
    reverted = box.read_json("/run/portguard/reverted.json")
    assert reverted["token"] == pending["token"] and reverted["errors"] == []
    assert 0 <= reverted["at"] - pending["deadline"] < 3
    assert box.state_files()["pending.json"] is False
    assert box.ours(backend) == ""
    assert not box.sh(f"ls -A {contract.PERSIST_DIR} 2>/dev/null || true"), "an unconfirmed ruleset was persisted"
    assert foreign_tables(box) == box.foreign_before
    result = lab.playbook(box.inventory).ok(box.name)
    assert result["changed"] is True and result["state"] == "confirmed"
    assert "198.51.100.0/24" in box.ours(backend)
    box.converged = True


@pytest.mark.parametrize("ssh_host", ["nftables"], indirect=True)
def test_dead_revert_guard_check_mode_writes_nothing_next_run_reverts(lab, ssh_host, tmp_path):
    """Controller and revert process both killed: the unconfirmed change stays live with a stale record.

    Check mode then reports the difference and writes nothing; the next real run reverts the stale
    change itself (reported as a change) before comparing, and the host ends as the catalog says.
    """
    box = ssh_host
    converge(lab, box)
    good = box.ours("nftables")
    box.converged = False
    proc = lab.playbook(
        box.inventory,
        background=tmp_path / "run.json",
        extra=[f"@{FILES / 'catalog_extra_flow.yml'}", {"portguard_rollback_timeout": 120}],
    )
    pending = pending_record(box, proc=proc)
    kill_tree(proc.pid)
    proc.wait(timeout=30)
    box.sh(f"kill -9 {pending['pid']}")
    end = time.monotonic() + 30
    while "203.0.113.0/24" not in box.ours("nftables"):
        assert time.monotonic() < end, "the unconfirmed change never went live"
        time.sleep(0.1)
    unconfirmed = box.ours("nftables")

    with kernel_writes(box) as events:
        check = lab.playbook(box.inventory, check=True).ok(box.name)
    assert events == [], f"check mode wrote to the kernel: {events[:5]}"
    assert check["changed"] is True and "203.0.113.0/24" in check["diff"]["before"]
    assert "a real run reverts it" in check["stale_change"]
    assert box.ours("nftables") == unconfirmed and box.state_files()["pending.json"] is True

    run = lab.playbook(box.inventory).ok(box.name)
    assert run["changed"] is True and run["stale_change"].endswith("reverted")
    assert box.ours("nftables") == good
    assert box.state_files() == {"pending.json": False, "reverted.json": False}
    assert foreign_tables(box) == box.foreign_before
    assert lab.playbook(box.inventory).ok(box.name)["changed"] is False
    box.converged = True


HOLD_SSH = f"""table inet pgit-hold {{
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        ip saddr {GATEWAY} tcp dport 22 ct state new reject with tcp reset
    }}
}}
"""


@pytest.mark.parametrize("ssh_host", ["nftables"], indirect=True)
def test_concurrent_runs_are_serialized(lab, ssh_host, tmp_path):
    """A second run that reaches the host while a first awaits confirmation waits for it.

    Run A (ssh) applies a change; its confirmation is held back by refusing new ssh connections for a
    while. Run B (podman connection, same host, another ruleset) starts meanwhile: its module is seen
    on the host while A's change is still pending, and A's pending record is not replaced. Once the
    hold is lifted, A confirms, then B applies and confirms: both changes were confirmed, one after
    the other, and nothing reverted.
    """
    box = ssh_host
    converge(lab, box)
    box.converged = False
    podman_inventory = write_inventory(tmp_path / "podman" / "hosts.yml", podman_host(lab, box, "nftables"))
    pid = box.pid
    pidns = os.readlink(f"/proc/{pid}/ns/pid")

    def nft_in_host(script):
        subprocess.run(["nsenter", "-t", pid, "-n", "nft", "-f", "-"], input=script, text=True, check=True)

    def waiting_modules():
        """Pipelined module processes (`/usr/bin/python3` reading the module from stdin) on the host."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if (
                    entry.name.isdigit()
                    and os.readlink(entry / "ns" / "pid") == pidns
                    and (entry / "cmdline").read_bytes() == b"/usr/bin/python3\0"
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    run_a = lab.playbook(box.inventory, background=tmp_path / "a.json", extra=[f"@{FILES / 'catalog_extra_flow.yml'}"])
    run_b = None
    try:
        pending_a = pending_record(box, proc=run_a)
        nft_in_host(HOLD_SSH)  # from now on, A cannot open the fresh connection it confirms over
        end = time.monotonic() + 30
        while waiting_modules():  # A's apply module finishing its work
            assert time.monotonic() < end, "run A's apply module did not return"
            time.sleep(0.05)
        run_b = lab.playbook(podman_inventory, background=tmp_path / "b.json")
        end = time.monotonic() + 60
        while not (waiting := waiting_modules()):
            assert time.monotonic() < end and run_b.poll() is None, "run B never reached the host"
            time.sleep(0.05)
        time.sleep(2)  # B polls the state lock meanwhile
        assert pending_record(box)["token"] == pending_a["token"], "run B replaced run A's pending change"
        assert set(waiting) & set(waiting_modules()), "run B's module did not wait for run A's confirmation"
        assert not box.exists("/run/portguard/reverted.json")
    except BaseException:
        for proc in (run_a, run_b):
            if proc and proc.poll() is None:
                kill_tree(proc.pid)
        raise
    finally:
        nft_in_host("delete table inet pgit-hold\n")
    result_a = finished(run_a, tmp_path / "a.json", timeout=120).ok(box.name)
    result_b = finished(run_b, tmp_path / "b.json", timeout=120).ok(box.name)
    assert result_a["token"] == pending_a["token"] and result_a["state"] == "confirmed"
    assert result_b["changed"] is True and result_b["state"] == "confirmed"
    assert result_b["token"] != result_a["token"]
    assert box.state_files() == {"pending.json": False, "reverted.json": False}
    assert "203.0.113.0/24" not in box.ours("nftables")  # B (the base catalog) applied last
    box.converged = True
