"""Controller side of portguard.hardening.firewall.

Validates its arguments, compiles the catalog once per task for all its hosts (plugin_utils.compile_cache:
the key is every compile input, the task and check mode), renders this host's ruleset, and drives the
host module: apply, then confirm over a fresh connection, or report the revert. ``state: absent``
compiles nothing: a broken catalog must not block the removal of the firewall.
"""

import ipaddress
import shlex
import socket
import subprocess
import time

from ansible.errors import AnsibleActionFail, AnsibleConnectionFailure
from ansible.plugins.action import ActionBase

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.inventory import (
    NETWORK_CONNECTIONS,
    ROLLBACK_TIMEOUT_RANGE,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import LockoutError, PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import parse_choice, parse_int
from ansible_collections.portguard.hardening.plugins.plugin_utils.compile_cache import compiled_policy

BACKEND_CHOICES = ("auto", "nftables", "iptables")
# The same options as the DOCUMENTATION of plugins/modules/firewall.py (the action's arguments).
ARGUMENT_SPEC = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "persist": {"type": "bool", "default": True},
    "rollback_timeout": {"type": "int"},
    "backend": {"type": "str", "choices": list(BACKEND_CHOICES)},
    "confirm": {"type": "bool", "default": True},
    "controller_addresses": {"type": "list", "elements": "str"},
}
SSH_TRANSPORTS = ("ssh", "ansible.builtin.ssh")


def _refuse(message):
    raise AnsibleActionFail(f"portguard.hardening.firewall: {message}; no host was changed")


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def _module(self, task_vars, **args):
        return self._execute_module(module_name="portguard.hardening.firewall", module_args=args,
                                    task_vars=task_vars)

    def _arguments(self, network):
        """The task's arguments, typed and within bounds, or a refusal that names the argument."""
        raw = self._task.args.get("controller_addresses")
        if raw is not None and not isinstance(raw, list):
            # validate_argument_spec would split a string on commas: "10.0.0.5" must be a list
            _refuse(f"controller_addresses must be a list of IP addresses, got {type(raw).__name__} {raw!r}")
        args = self.validate_argument_spec(ARGUMENT_SPEC)[1]
        timeout = args["rollback_timeout"]
        low, high = ROLLBACK_TIMEOUT_RANGE
        if timeout is not None and not low <= timeout <= high:
            _refuse(f"rollback_timeout {timeout} is out of range {low}-{high} (seconds)")
        addresses = args["controller_addresses"]
        for index, address in enumerate(addresses or ()):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                _refuse(f"controller_addresses[{index}]: {address!r} is not an IP address")
        if network and addresses == []:
            _refuse("controller_addresses: [] would turn the lockout check off on a network connection; "
                    "give the addresses the host sees the controller connect from")
        if network and not args["confirm"] and addresses is None:
            _refuse("confirm: false needs controller_addresses: without a confirmation nothing reverts a lockout, "
                    "so the addresses the lockout check protects must be given, not guessed")
        return args

    def _connection_port(self):
        """The port this connection really uses: its options (ansible_port, ansible_ssh_port, remote_port, ...),
        else, for ssh, what the ssh client resolves from its configuration (``Port`` in ~/.ssh/config)."""
        connection = self._connection
        port = connection.get_option("port") if connection.has_option("port") else None
        if port is None and connection.transport in SSH_TRANSPORTS:
            port = self._ssh_config_port()
        return int(port or 22)

    def _ssh_config_port(self):
        connection = self._connection
        argv = [connection.get_option("ssh_executable") or "ssh", "-G"]
        for name in ("ssh_args", "ssh_common_args", "ssh_extra_args"):
            argv += shlex.split(connection.get_option(name) or "")
        if connection.get_option("remote_user"):
            argv += ["-l", connection.get_option("remote_user")]
        argv += ["--", connection.get_option("host") or self._play_context.remote_addr]
        try:
            resolved = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in resolved.splitlines():
            name, _sep, value = line.partition(" ")
            if name == "port" and value.isdigit():
                return int(value)
        return None

    def _controller_addresses(self, configured, network, inspected, port):
        if configured is not None:
            return list(configured)
        if not network:
            return []
        found = set()
        if inspected and inspected.get("controller_address"):
            found.add(inspected["controller_address"])
        remote = self._connection.get_option("host") if self._connection.has_option("host") else None
        try:
            for family, _type, _proto, _name, sockaddr in socket.getaddrinfo(remote, port, proto=socket.IPPROTO_UDP):
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.connect(sockaddr)  # no packet is sent: this only asks the routing table
                    found.add(probe.getsockname()[0])
        except (OSError, TypeError):
            pass
        return sorted(str(ipaddress.ip_address(a.split("%")[0])) for a in found)

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        host = task_vars["inventory_hostname"]
        network = task_vars.get("ansible_connection", "ssh") in NETWORK_CONNECTIONS
        args = self._arguments(network)
        state, persist = args["state"], args["persist"]
        if state == "absent":
            return self._remove(result, task_vars, args)
        try:
            policy = compiled_policy(task_vars, [self._task._uuid, self._play_context.check_mode])
            # The host's settings pick the backend and timeout; its whitelist is built once, below, when
            # the controller's addresses are known. An unknown host raises here, as the build would.
            settings = policy.hosts[host] if host in policy.hosts else policy.host(host).settings
        except PortguardError as exc:
            raise AnsibleActionFail(f"portguard catalog refused, no host was changed: {exc}") from exc
        backend = args["backend"] or settings.backend
        timeout = args["rollback_timeout"] or settings.rollback_timeout
        inspected = None
        # iptables needs the facts too: whether the host can hold ipsets.
        if backend in ("auto", "iptables") or network:
            inspected = self._inspect(task_vars)
            if inspected.get("failed"):
                return inspected
            if backend == "auto":
                backend = "nftables" if inspected["nft_usable"] else "iptables"
        port = self._connection_port() if network else None
        controller = self._controller_addresses(args["controller_addresses"], network, inspected, port)
        if network and args["controller_addresses"] is None and not inspected.get("controller_address"):
            result.setdefault("warnings", []).append(
                "the host found no SSH_CONNECTION in the module's process or its ancestors: the controller "
                "addresses come only from the controller's route to the host, which NAT would hide; give "
                "controller_addresses where the host sees the controller under another address")
        try:
            host_policy = policy.host(host, controller_addresses=controller, controller_port=port)
        except PortguardError as exc:
            raise AnsibleActionFail(f"portguard catalog refused, no host was changed: {exc}") from exc
        for address in controller:
            if not host_policy.allowed_in(address, port, "tcp"):
                raise AnsibleActionFail(str(LockoutError(
                    "controller_addresses", f"the ruleset would block the controller {address} on port {port}")))
        result["controller_port"] = port
        if network:
            result["controller_address_seen_by_host"] = inspected.get("controller_address")
        if backend == "nftables":
            ruleset, fallback = render_nftables(host_policy), render_nftables(host_policy.management_only())
        else:
            # The whitelist in ipsets where the host has them, else one rule per source. The boot fallback
            # never needs ipset, so that it loads even where the sets failed.
            use_ipset = bool(inspected and inspected.get("ipset"))
            ruleset = render_iptables(host_policy, ipset=use_ipset).as_dict()
            fallback = render_iptables(host_policy.management_only()).as_dict()
            if not use_ipset:
                result.setdefault("warnings", []).append(
                    "no usable ipset on this host (the ipset tool or the kernel's ip_set is missing): the iptables "
                    "whitelist falls back to one rule per source, whose per-packet cost grows with the catalog")
        result["controller_addresses"] = controller
        result["findings"] = [f.as_dict() for f in policy.findings]
        result["expired_flows"] = policy.expired
        return self._apply(result, task_vars, backend, ruleset, fallback, state, persist, timeout, args["confirm"],
                           inspected)

    def _remove(self, result, task_vars, args):
        """``state: absent`` from the host's own settings only: removing the firewall needs no valid catalog."""
        host = task_vars["inventory_hostname"]
        variables = task_vars["hostvars"][host]
        try:
            backend = args["backend"] or parse_choice(variables.get("portguard_backend", "auto"),
                                                      f"hostvars.{host}.portguard_backend", BACKEND_CHOICES)
            timeout = args["rollback_timeout"] or parse_int(variables.get("portguard_rollback_timeout", 30),
                                                            f"hostvars.{host}.portguard_rollback_timeout",
                                                            *ROLLBACK_TIMEOUT_RANGE)
        except PortguardError as exc:
            raise AnsibleActionFail(f"portguard setting refused, no host was changed: {exc}") from exc
        inspected = None
        if backend == "auto":
            inspected = self._inspect(task_vars)
            if inspected.get("failed"):
                return inspected
            backend = "nftables" if inspected["nft_usable"] else "iptables"
        return self._apply(result, task_vars, backend, None, None, "absent", args["persist"], timeout,
                           args["confirm"], inspected)

    def _inspect(self, task_vars):
        """The host's facts (phase inspect), or the failed module result."""
        inspect = self._module(task_vars, phase="inspect")
        return inspect if inspect.get("failed") else inspect["host_facts"]

    def _apply(self, result, task_vars, backend, ruleset, fallback, state, persist, timeout, confirm, inspected):
        # Facts already inspected are handed on: the host is detected once per task.
        facts = {"host_facts": inspected} if inspected else {}
        applied = self._module(task_vars, phase="apply", backend=backend, ruleset=ruleset, fallback=fallback,
                               state=state, rollback_timeout=timeout, persist=persist, arm_rollback=confirm, **facts)
        warnings = result.get("warnings", [])
        result.update(applied)
        if warnings:
            result["warnings"] = warnings + list(applied.get("warnings") or [])
        result["backend"] = backend
        if backend == "iptables" and ruleset is not None:
            result["iptables_whitelist"] = "ipset" if ruleset.get("ipset") else "rules"
        if applied.get("failed") or not applied.get("token"):
            return result
        confirmed = self._confirm(task_vars, applied["token"], backend, persist, timeout)
        result.update(confirmed)
        return result

    def _fresh_connection(self, task_vars):
        # podman exec, local and the like never cross the network: every call is already fresh.
        if task_vars.get("ansible_connection", "ssh") in NETWORK_CONNECTIONS:
            self._connection.reset()

    def _confirm(self, task_vars, token, backend, persist, timeout):
        """Confirm over a new connection; a reused one would ride on an established flow.

        The host persists what it applied under this token: the ruleset is not sent again."""
        deadline = time.time() + timeout
        error = None
        while time.time() < deadline - 1:
            try:
                self._fresh_connection(task_vars)
                reply = self._module(task_vars, phase="confirm", token=token, backend=backend, persist=persist)
            except AnsibleConnectionFailure as exc:
                error = str(exc)
                time.sleep(1)
                continue
            if reply.get("unreachable"):
                error = reply.get("msg")
                time.sleep(1)
                continue
            if reply.get("persistence_error"):
                # Live and confirmed, only the boot copy failed: say exactly that, not "refused".
                return {"failed": True, "changed": True, "state": "confirmed", "msg": reply.get("msg"),
                        "persistence_error": reply["persistence_error"]}
            if reply.get("failed"):
                return {"failed": True, "changed": False, "msg": f"confirmation refused by the host: {reply.get('msg')}"}
            return {"changed": True, "state": "confirmed", "persistence": reply.get("persistence")}
        time.sleep(max(0.0, deadline - time.time()) + 2)
        status = "unknown"
        try:
            self._fresh_connection(task_vars)
            status = self._module(task_vars, phase="status", token=token).get("state", "unknown")
        except AnsibleConnectionFailure as exc:
            status = f"unreachable ({exc})"
        return {
            "failed": True,
            "changed": False,
            "state": status,
            "msg": f"reverted: the change was not confirmed over a fresh connection within {timeout} s "
                   f"({error}); the host restored its previous ruleset by itself (host reports: {status})",
        }
