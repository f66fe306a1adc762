#!/usr/bin/env bash
# Build the lab image (default localhost/portguard-lab:bookworm) from Debian
# packages with debootstrap, without any container registry.
#
# Usage: scripts/lab-image.sh [--force] [--image NAME]
#   --force        rebuild even when the cached image matches its inputs
#                  (same as PORTGUARD_LAB_REBUILD=1)
#   --image NAME   image name (default: $PORTGUARD_LAB_IMAGE or
#                  localhost/portguard-lab:bookworm)
#
# The Debian mirror is read from this machine's apt sources at run time
# (scripts/lab/apt_source.py); PORTGUARD_LAB_MIRROR overrides it.
# The image carries a label with the hash of its build inputs (this script,
# the package list, the helper files it copies); a re-run with an image whose
# label matches does nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/lab/containers.conf}"

image="${PORTGUARD_LAB_IMAGE:-localhost/portguard-lab:bookworm}"
suite=bookworm
force="${PORTGUARD_LAB_REBUILD:-0}"
label=org.portguard.lab.inputs

while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        --image) image="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "lab-image.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

# What the tests need inside a host: python3 for Ansible modules, both firewall
# front ends and ipset, tools to listen/probe/inspect (socat, netcat, ping,
# ss/ip, conntrack, ps), and sshd for tests whose management path must be
# cuttable by the firewall (podman exec never crosses the network).
# catatonit is the image's entrypoint: a PID 1 that forwards SIGTERM and reaps
# orphans even when the container is started without --init (podman 4.3
# ignores init=true in containers.conf), so a stop takes 0.2 s, not 10 s.
packages=(
    python3
    nftables
    iptables
    ipset
    iproute2
    conntrack
    socat
    procps
    openssh-server
    sudo
    ca-certificates
    netcat-openbsd
    iputils-ping
    catatonit
)

inputs_hash=$(
    {
        cat "$0"
        printf '%s\n' "$suite" "${packages[@]}"
        cat "$here/lab/sshd_config"
    } | sha256sum | cut -c1-16
)

up_to_date() {
    local current
    podman image exists "$image" || return 1
    current=$(podman image inspect --format "{{ index .Labels \"$label\" }}" "$image" 2>/dev/null || true)
    if [ "$current" = "$inputs_hash" ]; then
        echo "lab-image.sh: $image is up to date (inputs $inputs_hash)"
        return 0
    fi
    echo "lab-image.sh: $image has inputs '${current:-none}', want $inputs_hash: rebuilding"
    return 1
}

if [ "$force" != 1 ] && up_to_date; then
    exit 0
fi

# One build at a time on this machine (two checkouts or test runs may start
# one together); whoever waited finds the image built and stops here.
lock="${TMPDIR:-/tmp}/portguard-lab-image.lock"
exec 9>"$lock"
if ! flock -n 9; then
    echo "lab-image.sh: another build is running, waiting for it"
    flock 9
    if [ "$force" != 1 ] && up_to_date >/dev/null; then
        echo "lab-image.sh: $image was built meanwhile (inputs $inputs_hash)"
        exit 0
    fi
fi

for tool in debootstrap podman tar sha256sum python3; do
    command -v "$tool" >/dev/null || { echo "lab-image.sh: missing $tool (apt-get install debootstrap podman runc)" >&2; exit 1; }
done
if [ "$(id -u)" != 0 ]; then
    echo "lab-image.sh: debootstrap needs root" >&2
    exit 1
fi

if [ -n "${PORTGUARD_LAB_MIRROR:-}" ]; then
    mirror="$PORTGUARD_LAB_MIRROR"
    keyring=""
else
    read -r mirror keyring < <(python3 "$here/lab/apt_source.py" --suite "$suite") || {
        echo "lab-image.sh: set PORTGUARD_LAB_MIRROR to a Debian mirror URL" >&2
        exit 1
    }
fi

work=$(mktemp -d "${TMPDIR:-/var/tmp}/portguard-lab-image.XXXXXX")
rootfs="$work/rootfs"
cleanup() {
    # debootstrap may leave pseudo file systems mounted when it fails.
    for mnt in proc sys dev/pts dev; do
        if mountpoint -q "$rootfs/$mnt" 2>/dev/null; then
            umount -l "$rootfs/$mnt" || true
        fi
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

start=$(date +%s)
echo "lab-image.sh: debootstrap $suite from $mirror"
debootstrap_args=(--variant=minbase "--include=$(IFS=,; echo "${packages[*]}")")
if [ -n "$keyring" ]; then
    debootstrap_args+=("--keyring=$keyring")
fi
if ! debootstrap "${debootstrap_args[@]}" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
    echo "lab-image.sh: debootstrap failed" >&2
    exit 1
fi

# sshd: key-only root login; tests inject authorized_keys at run time.
install -m 0644 "$here/lab/sshd_config" "$rootfs/etc/ssh/sshd_config.d/portguard-lab.conf"
# Host keys are made per container at first sshd start (lab.sh ssh-setup),
# so no private key is shared by every container built from this image.
rm -f "$rootfs"/etc/ssh/ssh_host_*
# Keep the image small: package caches and lists are not needed at run time.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
: > "$rootfs/etc/hostname"

# The tag moves to the new image; the old one is removed only when no container
# uses it (podman image rm --force would remove those containers too).
old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
tar --numeric-owner -C "$rootfs" -c . | podman import --quiet \
    --change 'ENTRYPOINT ["/usr/bin/catatonit", "--"]' \
    --change 'CMD ["sleep", "infinity"]' \
    --change "LABEL $label=$inputs_hash" \
    --change "LABEL org.portguard.lab.suite=$suite" \
    - "$image" >/dev/null
if [ -n "$old_id" ]; then
    podman image rm "$old_id" >/dev/null 2>&1 || true
fi
echo "lab-image.sh: built $image (inputs $inputs_hash) in $(( $(date +%s) - start )) s"
