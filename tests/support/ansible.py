"""Running Ansible from a test: where its commands are and the environment of a run."""

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from support.paths import COLLECTIONS


def tool(name: str) -> str | None:
    """An Ansible command: the one installed next to this interpreter, else the one on PATH."""
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else shutil.which(name)


def ansible_env(workdir: Path | None = None, **settings: str) -> dict[str, str]:
    """The environment of an ansible run: this repository and the installed collections, no user config.

    ``workdir`` keeps Ansible's local temporary files under it; ``settings`` add or override variables.
    """
    env = dict(os.environ)
    env.pop("ANSIBLE_CONFIG", None)
    env.update({
        # purelib: where the ansible package put its collections (ansible.posix, containers.podman)
        "ANSIBLE_COLLECTIONS_PATH": os.pathsep.join([str(COLLECTIONS), sysconfig.get_paths()["purelib"]]),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
    })
    if workdir is not None:
        env["ANSIBLE_LOCAL_TEMP"] = str(Path(workdir) / "ansible-tmp")
    env.update(settings)
    return env
