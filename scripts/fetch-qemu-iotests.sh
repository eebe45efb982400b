#!/usr/bin/env bash
# QEMU's own block-layer tests (tests/qemu-iotests) from the Debian source package of the
# installed qemu-utils, with Debian's patches applied, so the expected outputs are those of
# the qemu-img on this machine. Fetched once into a cache; prints the iotests directory.
#   usage: fetch-qemu-iotests.sh [CACHE_DIR]   (default ${XDG_CACHE_HOME:-~/.cache}/pyhv)
set -euo pipefail
cache=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/pyhv}
version=$(dpkg-query -W -f='${source:Version}' qemu-utils)
dest="$cache/qemu-iotests/${version//[:+~]/_}"
if [ -x "$dest/tests/qemu-iotests/check" ]; then echo "$dest/tests/qemu-iotests"; exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# apt-get source needs deb-src entries: the same archives as the deb entries
src=/etc/apt/sources.list.d/pyhv-deb-src.sources
if ! apt-get source --print-uris -qq "qemu=$version" >/dev/null 2>&1; then
    sed -n '/^Types:/s/.*/Types: deb-src/;p' /etc/apt/sources.list.d/debian.sources \
        | $SUDO tee "$src" >/dev/null
    $SUDO apt-get update -qq >&2
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get source -qq --download-only "qemu=$version" >&2 \
    && dpkg-source -x ./*.dsc tree >/dev/null 2>&1)   # (apt checked the hashes)
mkdir -p "$dest.new/tests"
mv "$work/tree/tests/qemu-iotests" "$dest.new/tests/"
mv "$work/tree/python" "$dest.new/"
rm -rf "$dest"; mv "$dest.new" "$dest"
echo "$dest/tests/qemu-iotests"
