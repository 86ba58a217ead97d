#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a GPU machine that reaches no package index
# (the device machines: Python 3.12, x86_64): modelbus's runtime dependencies, for
# CPython 3.12 on manylinux, into .gpu-wheels/ (git-ignored), carried with the checkout and
# unpacked there with pip install --no-deps --target (bench/gpu_check.py says how): nothing
# is built, and the machine's own packages stay as they are.
# Prints their total size: the working tree and what is carried must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
requirements=$(python3 - <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
)
printf '%s\n' "$requirements" > .gpu-wheels/requirements.txt
python3 -m pip download -q --disable-pip-version-check --dest .gpu-wheels \
  --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -r .gpu-wheels/requirements.txt
du -sh .gpu-wheels | cut -f1 | sed 's/^/.gpu-wheels: /'
