"""portguard.hardening.firewall, controller side of issue 9 (trust boundary), over real ansible-playbook runs.

- item 3: the compile cache key covers the host variables: with ``serial: 1`` and addresses from each
  batch's gathered facts, the second batch's egress host gets its egress whitelist;
- item 4: the action's arguments are typed and bounded (``-e portguard_persist=false`` does not persist;
  bad values are refused before any host is touched);
- item 10: the lockout check and the controller's rule use the connection's effective port (``remote_port``
  of ansible.cfg, ``Port`` of an ssh config) and the address the host really sees, found under ``become``
  (sudo strips SSH_CONNECTION) in the module's ancestors;
- item 13 (controller part): ``state: absent`` needs no valid catalog.

Uses the lab of test_firewall.py (same network, image and helpers). Needs what test_firewall.py needs.
"""

import json
import time
from pathlib import Path

import pytest
import yaml
from test_firewall import (  # noqa: F401 pylint: disable=unused-import
    FILES,
    GATEWAY,
    ROLLBACK,
    can_connect,
    contract,
    foreign_tables,
    lab,
    podman_host,
    ssh_key,
    write_inventory,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SSH_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"


def task_result(run, host, task_name):
    """The result of the task named ``task_name`` on ``host``, in any play or ``serial`` batch."""
    for play in run.data["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].split(" : ")[-1] == task_name and host in task["hosts"]:
                return task["hosts"][host]
    raise AssertionError(f"no result of {task_name!r} on {host}: rc {run.rc}\n{run.stdout[-2000:]}{run.stderr[-2000:]}")


def applied(run, host, task_name="Apply the firewall"):
    result = task_result(run, host, task_name)
    assert run.rc == 0 and not result.get("failed"), f"run failed: {result.get('msg')}\n{run.stderr[-2000:]}"
    return result


def untouched(box):
    """Nothing of ours on the host: no table or chains, no persisted file, no armed revert."""
    assert box.ours("nftables") == "" and box.ours("iptables") == ""
    assert not box.exists(contract.PERSIST_DIR) and not box.exists(contract.LOADER_PATH)
    assert box.state_files() == {"pending.json": False, "reverted.json": False}
    assert foreign_tables(box) == box.foreign_before


@pytest.fixture(scope="module")
def podman_box(lab):  # noqa: F811 - the imported fixture
    box = lab.container("pgit-trust", network=True)
    yield box
    box.remove()


@pytest.fixture
def fresh(lab, podman_box, tmp_path):  # noqa: F811
    """The module's podman host with nothing of ours on it, and its inventory (nftables)."""
    lab.playbook(write_inventory(tmp_path / "clean.yml", podman_host(lab, podman_box, "nftables")),
                 "trust_args.yml", extra=[{"pgit_state": "absent"}])
    podman_box.inventory = write_inventory(tmp_path / "hosts.yml", podman_host(lab, podman_box, "nftables"))
    untouched(podman_box)
    return podman_box


# ------------------------------------------------------------------ item 4: typed, bounded arguments
def test_string_false_from_extra_vars_does_not_persist(lab, fresh):  # noqa: F811
    """`-e portguard_persist=false` reaches the action as the string "false": it must not persist."""
    run = lab.playbook(fresh.inventory, "trust_role.yml",
                       extra=["portguard_persist=false", "portguard_install_packages=false"])
    result = applied(run, fresh.name, "Apply the catalog (validate, diff, apply, confirm or revert, persist)")
    assert result["changed"] is True and result["state"] == "confirmed"
    assert not result.get("persistence"), result.get("persistence")
    assert fresh.ours("nftables")
    assert not fresh.exists(contract.PERSIST_DIR) and not fresh.exists(contract.LOADER_PATH)


BAD_ARGUMENTS = [
    ({"pgit_rollback_timeout": -5}, "rollback_timeout -5 is out of range 5-3600"),
    ({"pgit_rollback_timeout": 86400}, "rollback_timeout 86400 is out of range 5-3600"),
    ({"pgit_rollback_timeout": "abc"}, "rollback_timeout"),
    ({"pgit_persist": "maybe"}, "persist"),
    ({"pgit_confirm": "perhaps"}, "confirm"),
    ({"pgit_backend": "pf"}, "backend"),
    ({"pgit_state": "gone"}, "state"),
    ({"pgit_controller_addresses": "10.0.0.5"}, "controller_addresses must be a list"),
    ({"pgit_controller_addresses": ["10.0.0.5", "db.example"]}, "controller_addresses[1]: 'db.example' is not an IP"),
]


def test_bad_arguments_are_refused_and_change_nothing(lab, fresh):  # noqa: F811
    """Each bad value fails the task with a message naming the argument, never a traceback, and the host
    stays exactly as it was."""
    for extra, expected in BAD_ARGUMENTS:
        run = lab.playbook(fresh.inventory, "trust_args.yml", extra=[extra])
        result = task_result(run, fresh.name, "Apply the firewall")
        assert run.rc != 0 and result.get("failed"), f"{extra} was accepted"
        assert expected in result["msg"], f"{extra}: {result['msg']}"
        assert "most recent call last" not in json.dumps(result), f"{extra}: {result}"
        untouched(fresh)


# ------------------------------------------------------------------ item 13: removal needs no valid catalog
def test_absent_removes_with_a_broken_catalog(lab, fresh):  # noqa: F811
    """A catalog that no longer compiles must not keep the firewall on the host: state=absent removes it."""
    applied(lab.playbook(fresh.inventory, "trust_args.yml"), fresh.name)
    assert fresh.ours("nftables") and fresh.exists(contract.PERSIST_DIR)
    broken = {"pgit_state": "absent", "portguard_flows": "not a list", "portguard_networks": {"x": ["300.1.1.1"]}}
    result = applied(lab.playbook(fresh.inventory, "trust_args.yml", extra=[broken]), fresh.name)
    assert result["changed"] is True
    untouched(fresh)


# ------------------------------------------------------------------ item 11: persistence errors are what they are
def test_a_persistence_error_after_confirm_is_reported_as_such(lab, fresh):  # noqa: F811
    """The ruleset is live and confirmed but cannot be written for boot (here: the persist directory's
    path is taken by a file): the task fails saying exactly that, never "confirmation refused"."""
    fresh.sh(f"printf 'an admin file\\n' > {contract.PERSIST_DIR}")
    try:
        run = lab.playbook(fresh.inventory, "trust_args.yml")
        result = task_result(run, fresh.name, "Apply the firewall")
        assert run.rc != 0 and result.get("failed"), result
        assert result.get("state") == "confirmed" and result.get("changed") is True, result
        assert result.get("persistence_error"), result
        assert "persisting it for boot failed" in result["msg"], result["msg"]
        assert "confirmation refused" not in result["msg"], result["msg"]
        assert fresh.ours("nftables"), "the confirmed ruleset must stay live"
        assert fresh.state_files() == {"pending.json": False, "reverted.json": False}
        assert fresh.sh(f"cat {contract.PERSIST_DIR}") == "an admin file\n"
    finally:
        fresh.sh(f"rm -f {contract.PERSIST_DIR}")


# ------------------------------------------------------------------ item 3: the cache key covers host variables
def test_serial_batches_compile_with_each_batchs_facts(lab, tmp_path):  # noqa: F811
    """serial: 1, addresses from gathered facts only: the egress host of the second batch gets its egress
    whitelist (the first batch's compile did not know its address, and must not be reused)."""
    first, second = lab.container("pgit-serial-a", network=True), lab.container("pgit-serial-b", network=True)
    try:
        hosts = {}
        for box in (first, second):
            variables = podman_host(lab, box, "nftables")[box.name]
            del variables["portguard_addresses"]  # the default IPv4 address of the gathered facts stands for it
            hosts[box.name] = variables
        hosts[second.name]["portguard_egress"] = True
        inventory = write_inventory(tmp_path / "hosts.yml", hosts)
        data = yaml.safe_load(inventory.read_text())
        data["all"]["vars"]["portguard_flows"].append(
            {"name": "b-to-a", "from": second.name, "to": first.name, "services": ["https"]})
        inventory.write_text(json.dumps(data))

        run = lab.playbook(inventory, "trust_serial.yml")
        applied(run, first.name)
        egress = applied(run, second.name)["diff"]["after"]
        assert f"{first.ip} . 443" in egress, "the second batch's egress host got no egress whitelist"
        assert f"{first.ip} . 443" in second.sh("nft list set inet portguard out4_tcp")
    finally:
        first.remove()
        second.remove()


# ------------------------------------------------------------------ item 10: the real port and address
def ssh_box(lab, name, key, *, port=22, user="root"):  # noqa: F811
    """A container with sshd on ``port`` only, reachable as ``user`` (with passwordless sudo unless root)."""
    box = lab.container(name, network=True)
    home = "/root" if user == "root" else f"/home/{user}"
    if user != "root":
        box.sh(f"useradd -m -s /bin/sh -p '*' {user} && echo '{user} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{user}"
               f" && chmod 440 /etc/sudoers.d/{user}")
    box.sh(f"ssh-keygen -A >/dev/null && mkdir -p /run/sshd {home}/.ssh && chmod 700 {home}/.ssh")
    box.sh(f"cat > {home}/.ssh/authorized_keys && chmod 600 {home}/.ssh/authorized_keys && chown -R {user} {home}/.ssh",
           input=Path(f"{key}.pub").read_text())
    box.sh(f"/usr/sbin/sshd -p {port}")
    deadline = time.monotonic() + 30
    while not can_connect(box.ip, port):
        assert time.monotonic() < deadline, "sshd did not come up"
        time.sleep(0.2)
    return box


def ssh_inventory(path, box, key, **variables):
    host = {
        "ansible_host": box.ip,
        "ansible_connection": "ssh",
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": SSH_OPTIONS,
        "ansible_python_interpreter": "/usr/bin/python3",
        "portguard_addresses": [box.ip],
        "portguard_backend": "nftables",
        "portguard_rollback_timeout": ROLLBACK,
        "ansible_user": "root",
    }
    host.update(variables)
    return write_inventory(path, {box.name: host})


@pytest.mark.parametrize("given_by", ["ansible.cfg remote_port", "ssh config Port"])
def test_lockout_check_uses_the_connections_real_port(lab, ssh_key, tmp_path, given_by):  # noqa: F811
    """sshd listens on 2222 only, and the inventory has no ansible_port: the port comes from ansible.cfg or
    the ssh client's configuration. The controller's rule must open that port (not 22), so the change is
    confirmed over a fresh connection instead of locking the controller out and reverting."""
    box = ssh_box(lab, "pgit-port", ssh_key, port=2222)
    config = tmp_path / ("ansible.cfg" if given_by == "ansible.cfg remote_port" else "ssh_config")
    try:
        if given_by == "ansible.cfg remote_port":
            config.write_text("[defaults]\nremote_port = 2222\n")
            inventory = ssh_inventory(tmp_path / "hosts.yml", box, ssh_key)
            lab.env["ANSIBLE_CONFIG"] = str(config)
        else:
            config.write_text(f"Host {box.ip}\n  Port 2222\n")
            inventory = ssh_inventory(tmp_path / "hosts.yml", box, ssh_key,
                                      ansible_ssh_common_args=f"-F {config} {SSH_OPTIONS}")
        run = lab.playbook(inventory, "trust_args.yml")
        result = applied(run, box.name)
        assert result["state"] == "confirmed" and result["controller_port"] == 2222
        assert f"{GATEWAY} . 2222" in box.ours("nftables")
        assert can_connect(box.ip, 2222)
    finally:
        lab.env.pop("ANSIBLE_CONFIG", None)
        box.remove()


def test_become_still_finds_the_address_the_host_sees(lab, ssh_key, tmp_path):  # noqa: F811
    """The controller reaches the host through a jump host (ProxyCommand ssh -W), as an unprivileged user with
    sudo: the host sees the jump host's address, the controller's route says the gateway's, and sudo strips
    SSH_CONNECTION from the module's environment. The host must still report the address it sees (from
    the login shell above sudo) and the ruleset must let it in; confirm: false without controller_addresses
    is refused over such a connection."""
    jump = ssh_box(lab, "pgit-jump", ssh_key)
    box = ssh_box(lab, "pgit-become", ssh_key, user="pgit")
    try:
        proxy = f"-o ProxyCommand='ssh -i {ssh_key} {SSH_OPTIONS} -W %h:%p root@{jump.ip}'"
        inventory = ssh_inventory(tmp_path / "hosts.yml", box, ssh_key, ansible_user="pgit",
                                  ansible_ssh_common_args=f"{proxy} {SSH_OPTIONS}")
        unconfirmed = lab.playbook(inventory, "trust_become.yml", extra=[{"pgit_confirm": False}])
        refused = task_result(unconfirmed, box.name, "Apply the firewall")
        assert refused.get("failed") and "confirm: false needs controller_addresses" in refused["msg"], refused
        untouched(box)

        result = applied(lab.playbook(inventory, "trust_become.yml"), box.name)
        assert result["controller_address_seen_by_host"] == jump.ip
        assert jump.ip in result["controller_addresses"]
        assert result["state"] == "confirmed"
        assert f"{jump.ip} . 22" in box.ours("nftables")
    finally:
        box.remove()
        jump.remove()
