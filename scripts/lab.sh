#!/usr/bin/env bash
# Local multi-host lab: one podman container per inventory host, on a
# dual-stack podman network, each with exactly its portguard_addresses.
#
# Usage: scripts/lab.sh up|down|status|check|network|ssh-setup [HOST...|all] [options]
#   --inventory PATH   inventory (default examples/inventory)
#   --prefix STR       container name = STR + inventory host (default portguard-)
#   --network NAME     podman network (default portguard-lab)
#   --subnet4 CIDR     default 172.30.89.0/24
#   --subnet6 CIDR     default fd89:7067::/64
#   --state-dir DIR    where connection.yml and ssh keys go (default .build/lab)
# Run 'scripts/lab.sh --help' for all options; docs/lab.md explains the lab.
#
# The image comes from scripts/lab-image.sh. Podman settings come from
# scripts/lab/containers.conf via CONTAINERS_CONF (exported here unless set).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/lab/containers.conf}"
python=python3
if [ -x "$here/../.venv/bin/python" ]; then
    python="$here/../.venv/bin/python"
fi
exec "$python" "$here/lab/lab.py" "$@"
