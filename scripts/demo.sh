#!/usr/bin/env bash
# The README's first command: set this machine up, start the example inventory's
# hosts as podman containers (the lab), then audit, harden and verify them, and
# show the reachability matrix. The lab stays up for exploring; tear it down
# with `bash scripts/lab.sh down`. A second run is fast and changes nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
step() { printf '\n\033[1m===== %s =====\033[0m\n' "$*"; }

step "1/6 set up this machine (apt packages, .venv)"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
SITE="$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export ANSIBLE_COLLECTIONS_PATH="$ROOT/.build/collections:$SITE"
export ANSIBLE_CONFIG="$ROOT/examples/ansible.cfg"
export CONTAINERS_CONF="$ROOT/scripts/lab/containers.conf"
export ANSIBLE_CONNECTION_PLUGINS="$ROOT/scripts/lab/connection_plugins"
export ANSIBLE_PIPELINING=true
REPORTS="$ROOT/portguard-reports"

step "2/6 render the catalog of examples/inventory (no host touched)"
ansible-playbook -i examples/inventory portguard.hardening.render

step "3/6 start the lab: one container per inventory host (image built once, then cached)"
bash scripts/lab.sh up --pipelined
bash scripts/lab.sh status

step "4/6 audit, harden and verify the lab (ansible-playbook portguard.hardening.harden)"
ansible-playbook -i examples/inventory -i .build/lab/connection.yml portguard.hardening.harden \
  -e "portguard_report_dir=$REPORTS"

step "5/6 reachability matrix (source segment x destination x service)"
cat "$REPORTS/verify/matrix.txt"

step "6/6 port activity: what the firewall let in and denied, unused and expired entries"
ansible-playbook -i examples/inventory -i .build/lab/connection.yml portguard.hardening.report \
  -e "portguard_report_dir=$REPORTS"
printf '\n\nReports: %s/verify/matrix.html (with the activity section; also .json, JUnit .xml),\n' "$REPORTS"
printf '         %s/report/report.html, %s/audit/\n' "$REPORTS" "$REPORTS"
printf 'The lab is still running: bash scripts/lab.sh status | down\n'
