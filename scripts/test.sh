#!/usr/bin/env bash
# Everything CI checks, in order: `bash scripts/test.sh` (all stages) or
# `bash scripts/test.sh lint pytest` (some). Arguments after `--` go to pytest.
# Every stage runs even when an earlier one failed (except setup, which the
# others need); the exit code is nonzero if any stage failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The stages, in order. A new stage is a stage_<name> function plus its name here.
STAGES=(setup lint pytest molecule)

PYTEST_ARGS=()

stage_setup() {
  bash scripts/setup.sh
}

stage_lint() {
  bash scripts/lint.sh
}

stage_pytest() {
  local rc=0
  python -m pytest "${PYTEST_ARGS[@]}" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: that is a failure, not a pass"
  fi
  return "$rc"
}

# Every Molecule scenario against podman containers (scripts/molecule.sh),
# the lab image built or taken from its cache first; prints each scenario's time.
stage_molecule() {
  bash scripts/molecule.sh
}

selected=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --) shift; PYTEST_ARGS=("$@"); break ;;
    *)
      if ! declare -F "stage_$1" >/dev/null; then
        echo "[test] unknown stage '$1'; stages: ${STAGES[*]}" >&2
        exit 2
      fi
      selected+=("$1"); shift ;;
  esac
done
[ "${#selected[@]}" -gt 0 ] || selected=("${STAGES[@]}")

export VIRTUAL_ENV="$ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1

results=()
passed=0
failed=0
total_start=$SECONDS
for stage in "${selected[@]}"; do
  printf '\n===== %s =====\n' "$stage"
  start=$SECONDS
  if "stage_$stage"; then
    status=ok
    passed=$((passed + 1))
  else
    status=FAILED
    failed=$((failed + 1))
  fi
  results+=("$(printf '%-10s %-7s %4ss' "$stage" "$status" "$((SECONDS - start))")")
  if [ "$stage" = setup ] && [ "$status" = FAILED ]; then
    echo "[test] setup failed; the other stages cannot run"
    break
  fi
done

printf '\n===== summary (%ss) =====\n' "$((SECONDS - total_start))"
printf '%s\n' "${results[@]}"
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
