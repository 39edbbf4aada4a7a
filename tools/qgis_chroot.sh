#!/usr/bin/env bash
# Runs a make target of this checkout on QGIS 3.44 LTR (Debian trixie-backports: Python 3.13, numpy 2,
# GDAL 3.10, rasterio 1.4) inside a Debian trixie chroot that it builds on first use (about 10 minutes,
# as root; debootstrap from Debian's mirror). The chroot is cached (RS_DEEP_CHROOT, default
# /var/cache/rs_deep/trixie-qgis344); the checkout is copied in (tracked and untracked files, not .venv
# or build/) and its own .venv lives inside the chroot.
#   usage: tools/qgis_chroot.sh [make target ...]          (default: test)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CHROOT=${RS_DEEP_CHROOT:-/var/cache/rs_deep/trixie-qgis344}
SUITE=trixie
MIRROR=${RS_DEEP_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS="qgis python3-qgis qgis-providers python3-rasterio python3-venv python3-gdal python3-pip python3-dev gdal-bin
      libgeos-dev build-essential xvfb xauth make git ca-certificates python3-pyqt6"
TARGETS=("${@:-test}")
[ "$(id -u)" = 0 ] || { echo "tools/qgis_chroot.sh builds and enters a chroot: run it as root" >&2; exit 1; }

MOUNTS=()
cleanup() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_into() {  # bind-mount $1 at $CHROOT$1
  mkdir -p "$CHROOT$1"
  mountpoint -q "$CHROOT$1" || { mount --bind "$1" "$CHROOT$1"; MOUNTS+=("$CHROOT$1"); }
}
in_chroot() {
  env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CI="${CI:-}" chroot "$CHROOT" "$@"
}

if [ ! -f "$CHROOT/.rs_deep-ready" ]; then  # holds the installed package list once the chroot is complete
  echo "Building the QGIS 3.44 chroot in $CHROOT (Debian $SUITE + backports; about 10 minutes, once)"
  command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  if [ ! -x "$CHROOT/usr/bin/apt-get" ]; then
    rm -rf "$CHROOT"
    mkdir -p "$(dirname "$CHROOT")"
    debootstrap --variant=minbase "$SUITE" "$CHROOT.partial" "$MIRROR" >/dev/null
    mv "$CHROOT.partial" "$CHROOT"
  fi
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-backports main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" > "$CHROOT/etc/apt/sources.list"
fi
cp /etc/ssl/certs/ca-certificates.crt "$CHROOT/etc/ssl/certs/host-ca.crt" 2>/dev/null || {
  mkdir -p "$CHROOT/etc/ssl/certs"; cp /etc/ssl/certs/ca-certificates.crt "$CHROOT/etc/ssl/certs/host-ca.crt"; }
cp /etc/resolv.conf "$CHROOT/etc/resolv.conf" 2>/dev/null || true
for m in /proc /sys /dev /dev/pts; do mount_into "$m"; done

WANT=$(echo $PKGS)
if [ "$(cat "$CHROOT/.rs_deep-ready" 2>/dev/null)" != "$WANT" ]; then  # first build, or the package list changed
  in_chroot apt-get update -qq
  in_chroot apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends -t "$SUITE-backports" $PKGS >/dev/null
  in_chroot apt-get clean  # the downloaded .debs (about 600 MB) are not needed once installed
  echo "$WANT" > "$CHROOT/.rs_deep-ready"
fi

# a fresh copy of this checkout (keeps the chroot's own .venv and build/ between runs)
DEST=/root/rs_deep
mkdir -p "$CHROOT$DEST"
find "$CHROOT$DEST" -mindepth 1 -maxdepth 1 ! -name .venv ! -name build -exec rm -rf {} +
rm -rf "$CHROOT$DEST/build/qgis-profile"
# the working tree as git sees it (tracked and untracked, not ignored) and .git itself (make package lists files
# with git)
(cd "$ROOT" && { git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"; done; printf '.git\0'; } | tar -cf - --null -T -) \
  | tar -xf - -C "$CHROOT$DEST"
in_chroot bash -c "cd $DEST && python3 -c 'from qgis.core import Qgis; print(\"QGIS\", Qgis.QGIS_VERSION)' && make ${TARGETS[*]}"
