#!/usr/bin/env bash
# Prepare this machine and the repository for development and CI: system packages
# (Debian 12, as root), the Python tools in <repo>/.venv, and the
# ansible_collections/portguard/hardening link under .build/.
# Idempotent: a second run only checks and takes a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/requirements-dev.txt"

# Everything the tests run on the host: firewall tools and packet helpers for the
# kernel tests, podman and its runtime pieces for the lab hosts (crun does not work
# here, runc does), debootstrap to build the lab image, ssh for the lockout tests;
# ansible-test sanity runs shellcheck when it is installed.
APT_PACKAGES=(
  nftables iptables ipset iproute2 conntrack socat nmap
  podman runc netavark aardvark-dns catatonit conmon debootstrap
  openssh-client git shellcheck
)

say() { printf '[setup] %s\n' "$*"; }

install_system_packages() {
  local missing=() pkg
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    APT_PACKAGES+=(python3-venv)
  fi
  for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    say "system packages: all ${#APT_PACKAGES[@]} present"
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "system packages missing (${missing[*]}); run this script as root to install them" >&2
    return 1
  fi
  say "system packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

create_venv() {
  local stamp="$VENV/.requirements.sha256" want
  want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
  # Entry points carry the venv's absolute path: a venv copied or moved with the
  # clone runs nothing, so it is made anew.
  if [ -x "$VENV/bin/python" ]; then
    case "$(head -n1 "$VENV/bin/pip" 2>/dev/null)" in
      "#!$VENV/bin/python"*) ;;
      *)
        say "venv: $VENV was made for another location; recreating it"
        rm -rf "$VENV"
        ;;
    esac
  fi
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    say "venv: $VENV up to date"
    return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "venv: creating $VENV with $(python3 --version)"
    python3 -m venv "$VENV"
  fi
  say "venv: installing requirements-dev.txt"
  # -qq: errors only; the machine's pip configuration may warn once per package.
  "$VENV/bin/python" -m pip install -qq --disable-pip-version-check -r "$REQUIREMENTS"
  printf '%s\n' "$want" >"$stamp"
  say "venv: ready (ansible-core $("$VENV/bin/python" -c 'import ansible.release; print(ansible.release.__version__)'))"
}

link_collection() {
  # A relative link keeps working when the clone moves.
  local link="$ROOT/.build/collections/ansible_collections/portguard/hardening"
  if [ "$(readlink "$link" 2>/dev/null)" = "../../../.." ]; then
    say "collection link: present"
    return
  fi
  mkdir -p "$(dirname "$link")"
  ln -sfn ../../../.. "$link"
  say "collection link: $link -> repository root"
}

start=$SECONDS
install_system_packages
create_venv
link_collection
say "done in $((SECONDS - start))s"
