#!/usr/bin/env bash
# Static checks: ruff, ansible-lint (production profile, offline) and ansible-test
# sanity. Runs them all, then fails if any failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
[ -x "$VENV/bin/ruff" ] || bash "$ROOT/scripts/setup.sh"
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

failed=()
check() {
  local name=$1 start=$SECONDS
  shift
  printf '[lint] %s: %s\n' "$name" "$*"
  if "$@"; then
    printf '[lint] %s: ok (%ss)\n' "$name" "$((SECONDS - start))"
  else
    printf '[lint] %s: FAILED (%ss)\n' "$name" "$((SECONDS - start))"
    failed+=("$name")
  fi
}

check ruff ruff check --output-format concise .
# The roles and playbooks call this collection by FQCN: let ansible-lint resolve it from the checkout.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ANSIBLE_COLLECTIONS_PATH="$ROOT/.build/collections:$SITE" \
  check ansible-lint ansible-lint --offline --profile production --nocolor
check sanity bash scripts/sanity.sh

if [ "${#failed[@]}" -gt 0 ]; then
  printf '[lint] failed: %s\n' "${failed[*]}"
  exit 1
fi
printf '[lint] all checks passed\n'
