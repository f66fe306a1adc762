#!/usr/bin/env bash
# The README's first command: set this machine up, then run the main job on the
# example inventory (examples/inventory) and print the result.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
SITE="$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export ANSIBLE_COLLECTIONS_PATH="$ROOT/.build/collections:$SITE"
export ANSIBLE_CONFIG="$ROOT/examples/ansible.cfg"

printf '\n===== render the catalog of examples/inventory =====\n'
ansible-playbook -i examples/inventory portguard.hardening.render
printf '\nRulesets written to %s/portguard-reports/rulesets/\n' "$ROOT"
