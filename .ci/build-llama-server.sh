#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the source that the llama-cpp-python sdist ships
# (PyPI is reachable here; GitHub is not), once: the binary is cached outside the clone,
# in $MODELBUS_CACHE (default ~/.cache/modelbus), so later runs skip the ~8 minute build.
# Prints the binary's path. The tests that drive a real llama-server find it there.
set -euo pipefail

VERSION=0.3.36 # llama-cpp-python; its vendor/llama.cpp is the server's source
CACHE=${MODELBUS_CACHE:-$HOME/.cache/modelbus}
PREFIX="$CACHE/llama-server-$VERSION"
BINARY="$PREFIX/bin/llama-server"

if [ -x "$BINARY" ] && "$BINARY" --version >/dev/null 2>&1; then
  echo "$BINARY"
  exit 0
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  echo "==> installing cmake and g++" >&2
  as_root apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "==> building llama-server from llama-cpp-python $VERSION (once; cached in $PREFIX)" >&2
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  "llama-cpp-python==$VERSION" -d "$work" >&2
tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
source="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$source" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >"$work/configure.log" 2>&1 ||
  { tail -30 "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 ||
  { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$PREFIX/bin"
cp "$work/build/bin/llama-server" "$BINARY.tmp"
mv "$BINARY.tmp" "$BINARY"
"$BINARY" --version >&2 || true
echo "$BINARY"
