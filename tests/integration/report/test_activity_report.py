"""The port activity report end to end: three podman containers, real traffic, real ansible-playbook runs.

Hosts (image ``localhost/portguard-lab:bookworm``, network ``pgr-net`` 172.30.110.0/24 of this test only):

- ``db1`` may read the kernel log (``--device /dev/kmsg``, CAP_SYSLOG), and the machine logs the network
  namespaces of containers while the test runs (``net.netfilter.nf_log_all_netns=1``, restored after): its report
  has denied attempts per source and port from the log lines;
- ``web1`` and ``app1`` cannot read the kernel log: their reports are counters only and must say so.

The catalog has a flow nobody uses (``app-cache``, owner ``data``) and an expired one (``legacy-ftp``).
Traffic, all new TCP connections with ``reject`` (one SYN per attempt, no retransmission):

- app1 -> db1:5432 three times (allowed, ``app-db/postgres``), app1 -> db1:6379 four times (denied),
  web1 -> db1:3306 twice (denied), app1 -> web1:443 twice (allowed), app1 -> web1:21 once (denied: the
  expired flow is no longer rendered).

Then: the report shows those exact counts; a converged re-run of the segmentation role (changed=0) resets
no counter; a second report shows only what is new; ``portguard_report_fail_on_expired`` fails the play.

Needs root, podman, the lab image, ansible-playbook and containers.podman/ansible.posix; skips locally when
one is missing, fails under CI=true.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
from support.ansible import ansible_env
from support.kernel_log import NF_LOG_ALL_NETNS, namespaces_log
from support.requirements import need

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
IMAGE = os.environ.get("PORTGUARD_LAB_IMAGE", "localhost/portguard-lab:bookworm")
NETWORK = "pgr-net"
SUBNET = "172.30.110.0/24"
PREFIX = "pgr-"
ADDRESSES = {"app1": "172.30.110.11", "db1": "172.30.110.12", "web1": "172.30.110.13"}

CATALOG = {
    "portguard_networks": {"admin": ["192.0.2.0/24"]},
    "portguard_services": {
        "ssh": {"port": 22, "proto": "tcp", "purpose": "Remote administration", "owner": "platform"},
        "postgres": {"port": 5432, "proto": "tcp", "purpose": "Orders database", "owner": "data"},
        "cache": {"port": 6380, "proto": "tcp", "purpose": "Session cache", "owner": "data"},
        "https": {"port": 443, "proto": "tcp", "purpose": "Web frontend", "owner": "web"},
        "ftp": {"port": 21, "proto": "tcp", "purpose": "Legacy uploads", "owner": "web"},
    },
    "portguard_flows": [
        {"name": "app-db", "from": "app", "to": "db", "services": ["postgres"]},
        {"name": "app-cache", "from": "app", "to": "db", "services": ["cache"]},
        {"name": "app-web", "from": "app", "to": "web", "services": ["https"]},
        {"name": "legacy-ftp", "from": "app", "to": "web", "services": ["ftp"], "expires": "2025-01-31"},
    ],
    "portguard_management": {"from": ["admin"], "services": ["ssh"]},
    # every attempt of the test is logged: the flood test is tests/kernel/test_log_flood.py
    "portguard_log_rate": 600,
    "portguard_log_burst": 50,
}

HARDEN = """
- name: Enforce the catalog
  hosts: all
  gather_facts: false
  roles:
    - role: portguard.hardening.segmentation
"""

# One TCP connection attempt per line of argv: "address port expected" (open or denied); prints a JSON tally.
CLIENT = r"""
import json, socket, sys
tally = {"open": 0, "denied": 0, "other": []}
for spec in sys.argv[1:]:
    address, port, count = spec.split(":")
    for _ in range(int(count)):
        sock = socket.socket()
        sock.settimeout(3)
        try:
            sock.connect((address, int(port)))
            tally["open"] += 1
        except (ConnectionRefusedError, OSError) as exc:
            if getattr(exc, "errno", None) in (111, 113):  # refused, host unreachable (admin-prohibited)
                tally["denied"] += 1
            else:
                tally["other"].append(f"{address}:{port} {exc}")
        finally:
            sock.close()
print(json.dumps(tally))
"""


class Lab:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.reports = workdir / "reports"
        self.env = ansible_env(
            workdir,
            CONTAINERS_CONF=str(ROOT / "scripts" / "lab" / "containers.conf"),
            ANSIBLE_CONNECTION_PLUGINS=str(ROOT / "scripts" / "lab" / "connection_plugins"),
            ANSIBLE_PIPELINING="1",
            ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        )
        self.inventory = workdir / "hosts.yml"
        self.created_network = False

    def podman(self, *args, check=True):
        proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=120,
                              check=False)
        if check and proc.returncode:
            raise AssertionError(f"podman {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def sh(self, host, script, check=True):
        proc = self.podman("exec", PREFIX + host, "sh", "-c", script, check=False)
        if check and proc.returncode:
            raise AssertionError(f"{host}: {script!r} failed: {proc.stderr.strip()} {proc.stdout.strip()}")
        return proc.stdout

    def up(self):
        for host in ADDRESSES:
            self.podman("rm", "-f", "-t", "0", PREFIX + host, check=False)  # leftovers of an interrupted run
        if self.podman("network", "exists", NETWORK, check=False).returncode:
            self.podman("network", "create", "--subnet", SUBNET, NETWORK)
            self.created_network = True
        for host, address in ADDRESSES.items():
            extra = ["--device", "/dev/kmsg", "--cap-add", "SYSLOG"] if host == "db1" else []
            self.podman("run", "-d", "--name", PREFIX + host, "--hostname", host, "--network", NETWORK,
                        "--ip", address, "--cap-add", "NET_ADMIN,NET_RAW", "--init", *extra, IMAGE)
        hosts = {host: {"ansible_host": PREFIX + host, "ansible_connection": "podman_pipelined",
                        "ansible_python_interpreter": "/usr/bin/python3", "portguard_addresses": [address]}
                 for host, address in ADDRESSES.items()}
        children = {group: {"hosts": {host: {}}} for group, host in (("app", "app1"), ("db", "db1"), ("web", "web1"))}
        variables = dict(CATALOG, portguard_report_dir=str(self.reports))
        self.inventory.write_text(json.dumps({"all": {"vars": variables, "hosts": hosts, "children": children}}))
        (self.workdir / "harden.yml").write_text(HARDEN)

    def down(self):
        for host in ADDRESSES:
            self.podman("rm", "-f", "-t", "0", PREFIX + host, check=False)
        if self.created_network:
            self.podman("network", "rm", NETWORK, check=False)

    def playbook(self, playbook, *extra):
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory), playbook]
        for item in extra:
            argv += ["-e", item]
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.workdir, timeout=600,
                              check=False)
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"no JSON from ansible-playbook (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}") from exc
        return proc.returncode, data

    def traffic(self, src, *specs):
        out = self.sh(src, f"python3 -c {shlex_quote(CLIENT)} {' '.join(specs)}")
        return json.loads(out)

    def report(self, host):
        return json.loads((self.reports / "report" / f"{host}.json").read_text())


def shlex_quote(text):
    import shlex

    return shlex.quote(text)


@pytest.fixture(scope="module")
def lab():
    need(os.geteuid() == 0, "root (containers with NET_ADMIN, nf_log_all_netns)")
    need(shutil.which("podman"), "podman")
    need((Path(sys.executable).parent / "ansible-playbook").exists(), "ansible-playbook next to the interpreter")
    need(NF_LOG_ALL_NETNS.exists(), str(NF_LOG_ALL_NETNS))
    site = Path(sysconfig.get_paths()["purelib"]) / "ansible_collections"
    need((site / "containers" / "podman").is_dir() and (site / "ansible" / "posix").is_dir(),
         "the containers.podman and ansible.posix collections (pip install ansible)")
    instance = Lab(Path(tempfile.mkdtemp(prefix="pgr-report-")))
    need(instance.podman("image", "exists", IMAGE, check=False).returncode == 0,
         f"image {IMAGE} (scripts/lab-image.sh builds it)")
    try:
        instance.up()
        with namespaces_log():
            yield instance
    finally:
        instance.down()
        shutil.rmtree(instance.workdir, ignore_errors=True)


def stats_ok(data):
    for host, stats in data["stats"].items():
        assert stats["failures"] == 0 and stats["unreachable"] == 0, f"{host}: {stats}"


def task_result(data, name, host):
    for play in data["plays"]:
        for task in play["tasks"]:
            # role tasks are named "<role> : <task>"
            if task["task"]["name"].split(" : ")[-1] == name and host in task["hosts"]:
                return task["hosts"][host]
    raise AssertionError(f"no task {name!r} on {host}")


def test_report_end_to_end(lab):
    rc, data = lab.playbook("harden.yml")
    assert rc == 0, json.dumps(data.get("stats"))
    stats_ok(data)
    for host in ADDRESSES:
        assert lab.sh(host, "test -s /run/portguard/applied.json && echo yes").strip() == "yes"
    lab.podman("exec", "-d", PREFIX + "db1", "socat", "TCP-LISTEN:5432,fork,reuseaddr", "SYSTEM:true")
    lab.podman("exec", "-d", PREFIX + "web1", "socat", "TCP-LISTEN:443,fork,reuseaddr", "SYSTEM:true")
    lab.sh("db1", "for i in $(seq 50); do ss -ltn | grep -q ':5432 ' && exit 0; sleep 0.1; done; exit 1")
    lab.sh("web1", "for i in $(seq 50); do ss -ltn | grep -q ':443 ' && exit 0; sleep 0.1; done; exit 1")

    # A baseline report: the cursor skips older lines of the machine's kernel log (earlier runs).
    rc, data = lab.playbook("portguard.hardening.report")
    assert rc == 0, json.dumps(data.get("stats"))
    baseline = {host: lab.report(host) for host in ADDRESSES}
    assert baseline["db1"]["log"]["source"] == "kmsg" and baseline["db1"]["log"]["readable"]
    assert baseline["web1"]["log_note"].startswith("counters only: no /dev/kmsg")

    db, web = ADDRESSES["db1"], ADDRESSES["web1"]
    NF_LOG_ALL_NETNS.write_text("1\n")
    assert lab.traffic("app1", f"{db}:5432:3") == {"open": 3, "denied": 0, "other": []}
    assert lab.traffic("app1", f"{db}:6379:4") == {"open": 0, "denied": 4, "other": []}
    assert lab.traffic("web1", f"{db}:3306:2") == {"open": 0, "denied": 2, "other": []}
    assert lab.traffic("app1", f"{web}:443:2", f"{web}:21:1") == {"open": 2, "denied": 1, "other": []}

    # The sysctl is the machine's: another job that set and restored it meanwhile would explain missing lines.
    assert NF_LOG_ALL_NETNS.read_text().strip() == "1", "net.netfilter.nf_log_all_netns was reset during the traffic"

    # A converged re-run changes nothing and resets no counter: every counter of the table is the same after it.
    before = {host: lab.sh(host, "nft -j list table inet portguard") for host in ADDRESSES}
    rc, data = lab.playbook("harden.yml")
    assert rc == 0 and all(s["changed"] == 0 for s in data["stats"].values()), json.dumps(data["stats"])
    after = {host: lab.sh(host, "nft -j list table inet portguard") for host in ADDRESSES}
    assert after == before
    assert '"packets": 3' in after["db1"] and '"packets": 6' in after["db1"]  # app-db hits, denied_in

    rc, data = lab.playbook("portguard.hardening.report", "portguard_report_unusual_threshold=4")
    assert rc == 0, json.dumps(data.get("stats"))
    db1 = lab.report("db1")
    assert db1["reset"] is None, db1["reset"]
    assert db1["deny_counters"]["denied_in"]["new"] == 6
    assert db1["deny_counters"]["logged_in"]["new"] == 6
    new = {(row["src"], row["port"], row["proto"]): row for row in db1["denied_new"]}
    assert {key: row["new"] for key, row in new.items()} == {
        (ADDRESSES["app1"], 6379, "tcp"): 4, (ADDRESSES["web1"], 3306, "tcp"): 2}, (db1["log"], db1["log_note"])
    app_row = new[(ADDRESSES["app1"], 6379, "tcp")]
    assert app_row["names"] == {"hosts": ["app1"], "segments": ["app"], "networks": []}
    assert app_row["first_seen"] <= app_row["last_seen"]
    assert [u["src"] for u in db1["unusual"]] == [ADDRESSES["app1"]]
    flows = {f["label"]: f for f in db1["flows"]}
    assert flows["app-db/postgres"]["new"] == 3 and flows["app-db/postgres"]["owner"] == "data"
    assert flows["app-cache/cache"]["hits"] == 0

    web1 = lab.report("web1")
    assert web1["log_note"].startswith("counters only") and web1["denied"] == []
    assert web1["deny_counters"]["denied_in"]["new"] == 1
    assert {f["label"]: f["new"] for f in web1["flows"]}["app-web/https"] == 2

    summary = json.loads((lab.reports / "report" / "report.json").read_text())
    assert summary["unused_by_owner"]["data"] == [
        {"flow": "app-cache", "service": "cache", "purpose": "Session cache", "hosts": ["db1"]}]
    assert [f["name"] for f in summary["expired"]] == ["legacy-ftp"]
    text = task_result(data, "Show the port activity report", "app1")["msg"].splitlines()
    print("\n".join(text))
    assert any("data: app-cache/cache on db1" in line for line in text)
    assert any("EXPIRED flow legacy-ftp" in line for line in text)
    assert "app-cache/cache" in (lab.reports / "report" / "report.html").read_text()

    # Nothing new: the next report shows no denied source and zero deltas, not the same flood again.
    (lab.reports / "verify").mkdir(exist_ok=True)
    (lab.reports / "verify" / "matrix.html").write_text("<html><body><h1>reachability</h1></body></html>\n")
    rc, data = lab.playbook("portguard.hardening.report")
    assert rc == 0
    quiet = lab.report("db1")
    assert quiet["denied_new"] == [] and quiet["deny_counters"]["denied_in"]["new"] == 0
    assert {(r["src"], r["port"]): r["count"] for r in quiet["denied"]}[(ADDRESSES["app1"], 6379)] >= 4
    page = (lab.reports / "verify" / "matrix.html").read_text()
    assert "<h1>reachability</h1>" in page and "portguard-activity" in page and "app-db/postgres" in page

    # An apply that changes the ruleset replaces the table (its counters restart): the report says when.
    rc, data = lab.playbook("harden.yml", "portguard_log_rate=599")
    assert rc == 0 and data["stats"]["db1"]["changed"] > 0, json.dumps(data["stats"])
    applied = json.loads(lab.sh("db1", "cat /run/portguard/applied.json"))
    rc, data = lab.playbook("portguard.hardening.report")
    assert rc == 0
    after_reset = lab.report("db1")
    assert after_reset["reset"]["event"] == "applied" and after_reset["reset"]["at"] == applied["at"]
    assert after_reset["deny_counters"]["denied_in"] == {"total": 0, "new": 0}
    assert {f["label"]: f["hits"] for f in after_reset["flows"]}["app-db/postgres"] == 3  # the window keeps them

    # CI gate: the expired flow fails the play.
    rc, data = lab.playbook("portguard.hardening.report", "portguard_report_fail_on_expired=true")
    assert rc != 0
    failed = task_result(data, "Fail on expired flows", "app1")
    assert failed.get("failed") and "legacy-ftp" in json.dumps(failed["msg"])
