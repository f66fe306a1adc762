"""Action plugins as Ansible runs them for one task, without a host."""

from unittest import mock


def make_action(action_class, args, replies=()):
    """The action of a task with ``args``; its ``_execute_module`` answers ``replies`` in order (a mock)."""
    task = mock.MagicMock(args=args, async_val=0, _uuid="task-1")
    action = action_class(task, mock.MagicMock(), mock.MagicMock(check_mode=False), mock.MagicMock(),
                          mock.MagicMock(), mock.MagicMock())
    action._execute_module = mock.MagicMock(side_effect=list(replies))
    return action


def task_vars(inventory, host, **extra):
    """What Ansible hands an action for ``host`` of ``inventory`` (``(variables, groups, hostvars)``)."""
    _variables, groups, hostvars = inventory
    return dict(hostvars[host], inventory_hostname=host, hostvars=hostvars, groups=groups, **extra)
