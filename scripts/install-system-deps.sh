#!/usr/bin/env bash
# Installs the Debian packages pyhv builds and tests with. Idempotent: apt skips what is present.
set -euo pipefail
pkgs=(gcc make python3-dev python3-venv qemu-system-x86 qemu-utils busybox-static cpio lz4 zstd
      xz-utils bzip2 iproute2 kmod acpica-tools util-linux
      fuse3 bindfs fio iperf3 git slirp4netns passt dnsmasq-base curl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
