#!/usr/bin/env bash
# Installs what the Docker runtime's integration tests need on a fresh Debian/Ubuntu
# machine: dockerd (docker.io) and a static busybox to build the test image from.
# Idempotent and quiet: does nothing when both are already there.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
# The tests copy /bin/busybox into an empty image, so it must be the static build
# (Debian's plain 'busybox' package is dynamically linked).
static_busybox() {
  [ -x /bin/busybox ] && ! (ldd /bin/busybox 2>/dev/null | grep -q "=>")
}

packages=()
have dockerd || packages+=(docker.io)
static_busybox || packages+=(busybox-static)
[ "${#packages[@]}" -eq 0 ] && exit 0

echo "==> installing ${packages[*]}"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
