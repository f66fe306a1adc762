#!/usr/bin/env bash
# ansible-test sanity over the collection. ansible-test wants the collection at
# .../ansible_collections/<namespace>/<name>, so this runs in a temporary copy of
# the files git tracks or would track (ignored files such as .venv stay out).
# Extra arguments go to ansible-test, e.g. `bash scripts/sanity.sh --test pep8`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
[ -x "$VENV/bin/ansible-test" ] || bash "$ROOT/scripts/setup.sh"
export PATH="$VENV/bin:$PATH"

say() { printf '[sanity] %s\n' "$*"; }

# ansible-test bootstraps pip in each test venv with a script it downloads from a
# host this lab cannot reach, unless the script is already in its cache. The
# stand-in below does the same job with ensurepip and the machine's pip config.
# The cache file name follows the pip version that ansible-test pins.
install_pip_bootstrap() {
  local pip_version cache marker="portguard stand-in for the pip bootstrap script"
  pip_version="$("$VENV/bin/python" - <<'EOF'
import pathlib
import re

import ansible_test

source = pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
print(re.search(r"pip='([0-9.]+)'", source.read_text()).group(1))
EOF
)"
  cache="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
  if [ -f "$cache" ] && ! grep -q "$marker" "$cache"; then
    say "pip bootstrap: using the real script in $cache"
    return
  fi
  mkdir -p "$(dirname "$cache")"
  cat >"$cache" <<EOF
"""$marker (written by scripts/sanity.sh)."""

import subprocess
import sys

UNSUPPORTED = {"--no-setuptools", "--no-wheel", "--disable-pip-version-check"}

subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade"], check=True, stdout=subprocess.DEVNULL)
args = [arg for arg in sys.argv[1:] if arg not in UNSUPPORTED]
sys.exit(subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]).returncode)
EOF
  say "pip bootstrap: stand-in for pip $pip_version at $cache"
}

copy_collection() {
  local namespace name
  namespace="$(sed -n 's/^namespace: *//p' "$ROOT/galaxy.yml")"
  name="$(sed -n 's/^name: *//p' "$ROOT/galaxy.yml")"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  COLLECTION="$WORK/ansible_collections/$namespace/$name"
  mkdir -p "$COLLECTION"
  # Files deleted but not yet committed are still listed by git; skip them.
  (cd "$ROOT" && git ls-files -z -co --exclude-standard |
    while IFS= read -r -d '' file; do
      if [ -e "$file" ]; then printf '%s\0' "$file"; fi
    done |
    tar --null -T - -cf -) | tar -C "$COLLECTION" -xf -
  say "copied $(find "$COLLECTION" -type f | wc -l) files to $COLLECTION"
}

start=$SECONDS
install_pip_bootstrap
copy_collection
cd "$COLLECTION"
say "ansible-test sanity --python 3.11 --venv $*"
ansible-test sanity --python 3.11 --venv --color no "$@"
say "passed in $((SECONDS - start))s"
