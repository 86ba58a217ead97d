#!/usr/bin/env bash
# Installs what the Docker runtime's integration tests need on a fresh Debian/Ubuntu
# machine: dockerd (docker.io) and a static busybox to build the test image from;
# and a Compose (Debian's docker-compose) for tests/integration/test_deployment.py,
# unless `docker compose` already answers.
# Idempotent and quiet: does nothing when all are already there.
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
if ! have docker-compose && ! docker compose version >/dev/null 2>&1; then
  packages+=(docker-compose)
fi
[ "${#packages[@]}" -eq 0 ] && exit 0

echo "==> installing ${packages[*]}"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
