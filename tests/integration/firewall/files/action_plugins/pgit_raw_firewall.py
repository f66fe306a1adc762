"""Test-only action: run the real ``portguard.hardening.firewall`` module with a raw ruleset.

The collection's action plugin always renders the ruleset itself, so a
ruleset that passes rendering but fails ``nft -c`` / ``iptables-restore
--test`` on the host can only reach the host module this way. The module,
its transfer (AnsiballZ over the real connection) and the host code are the
real ones; only the caller differs.
"""

from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        result.update(
            self._execute_module(
                module_name="portguard.hardening.firewall",
                module_args={"phase": "apply", "state": "present", "rollback_timeout": 10, "persist": False, **args},
                task_vars=task_vars,
            )
        )
        return result
