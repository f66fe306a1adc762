"""containers.podman.podman with pipelining: one ``podman exec -i`` per module.

containers.podman's connection sets ``has_pipelining = False`` because it
runs ``podman exec`` without ``-i``, so stdin never reaches the container.
Passing ``-i`` when there is input makes pipelining work, which cuts a
module call from four ``podman exec`` (mkdir, chmod, python, rm) to one.
Lab use only: put this directory on ANSIBLE_CONNECTION_PLUGINS.
"""

import shlex

from ansible.plugins.connection import ConnectionBase
from ansible_collections.containers.podman.plugins.connection import podman

DOCUMENTATION = podman.DOCUMENTATION.replace("name: podman", "name: podman_pipelined", 1).replace(
    "    options:\n",
    "    extends_documentation_fragment:\n      - connection_pipelining\n    options:\n",
    1,
)


class Connection(podman.Connection):
    transport = "podman_pipelined"
    has_pipelining = True

    def exec_command(self, cmd, in_data=None, sudoable=False):
        ConnectionBase.exec_command(self, cmd, in_data=in_data, sudoable=sudoable)
        args = ["exec", "-i"] if in_data is not None else ["exec"]
        if self.user:
            args += ["--user", self.user]
        return self._podman(args, shlex.split(cmd), in_data)
