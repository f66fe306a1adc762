#!/usr/bin/env bash
# Run the Molecule scenarios of extensions/molecule against podman containers.
#
# Usage: scripts/molecule.sh [SCENARIO...]      (default: every scenario)
#        scripts/molecule.sh --list
# Each scenario runs `molecule test` (destroy, dependency = dual-stack network,
# create, prepare, converge, idempotence, verify, destroy); the time of each is
# printed, and the exit code is nonzero if any scenario failed. docs/molecule.md
# says what each scenario proves.
#
# Needs root, podman (scripts/setup.sh installs it) and the .venv made by
# scripts/setup.sh. The lab image is built (or found cached) first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -x "$ROOT/.venv/bin/molecule" ]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/scripts/lab/containers.conf}"
export ANSIBLE_COLLECTIONS_PATH="$ROOT/.build/collections"
export ANSIBLE_FORCE_COLOR="${ANSIBLE_FORCE_COLOR:-0}" NO_COLOR="${NO_COLOR:-1}"

all=()
for file in extensions/molecule/*/molecule.yml; do
  all+=("$(basename "$(dirname "$file")")")
done
if [ "${1:-}" = --list ]; then
  printf '%s\n' "${all[@]}"
  exit 0
fi
scenarios=("$@")
[ "${#scenarios[@]}" -gt 0 ] || scenarios=("${all[@]}")

for tool in molecule podman; do
  command -v "$tool" >/dev/null || { echo "[molecule] $tool not found (run scripts/setup.sh)" >&2; exit 1; }
done
link="$ROOT/.build/collections/ansible_collections/portguard/hardening"
if [ ! -e "$link" ]; then
  mkdir -p "$(dirname "$link")"
  ln -sfn ../../../.. "$link"
fi

# Scenario containers and networks have fixed names and subnets: two runs on
# one machine (two checkouts, two CI jobs) take turns.
lock="${TMPDIR:-/tmp}/portguard-molecule.lock"
exec 9>"$lock"
if ! flock -n 9; then
  echo "[molecule] another run holds $lock; waiting"
  flock 9
fi

start=$SECONDS
bash scripts/lab-image.sh
echo "[molecule] lab image ready in $((SECONDS - start))s"

results=()
failed=0
for scenario in "${scenarios[@]}"; do
  printf '\n===== molecule test -s %s =====\n' "$scenario"
  start=$SECONDS
  if molecule test -s "$scenario"; then
    status=ok
  else
    status=FAILED
    failed=$((failed + 1))
  fi
  results+=("$(printf '%-12s %-7s %4ss' "$scenario" "$status" "$((SECONDS - start))")")
  echo "[molecule] $scenario: $status in $((SECONDS - start))s"
done

printf '\n===== molecule summary =====\n'
printf '%s\n' "${results[@]}"
[ "$failed" -eq 0 ]
