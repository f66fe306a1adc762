#!/usr/bin/env bash
# Run every benchmark of this folder and keep their outputs in $BENCH_OUT (default: a new
# portguard-bench-<UTC time> folder under $TMPDIR or /tmp).
# The render benchmark needs no root; the kernel and packet benchmarks need root (they
# create throwaway network namespaces) and are skipped with a message without it.
# PYTHON defaults to <repo>/.venv/bin/python (scripts/setup.sh), which has aerleon.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${BENCH_OUT:-${TMPDIR:-/tmp}/portguard-bench-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"

run() {
  local name="$1"; shift
  printf '\n== %s: %s\n' "$name" "$*"
  "$@" 2>&1 | tee "$OUT/$name.txt"
}

run render "$PYTHON" "$ROOT/bench/bench_render.py" --repeats 5 --json "$OUT/render.json"
if [ "$(id -u)" -eq 0 ]; then
  run kernel "$PYTHON" "$ROOT/bench/bench_kernel.py" --repeats 5 --json "$OUT/kernel.json"
  run packets "$PYTHON" "$ROOT/bench/bench_packets.py" --rounds 5 --json "$OUT/packets.json"
  run packets-legacy "$PYTHON" "$ROOT/bench/bench_packets.py" --rounds 5 --iptables legacy \
    --scenarios none iptables linear linear+est ipset --json "$OUT/packets-legacy.json"
else
  printf '\nkernel and packet benchmarks skipped: they need root\n'
fi
printf '\nresults in %s\n' "$OUT"
