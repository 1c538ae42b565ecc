#!/usr/bin/env bash
# Download DeepSpeed and the packages it needs that the GPU machine lacks into .whl/ (git-ignored), so
# a device run can carry them (the GPU machine has no network). See /work/.library/device/README.md.
#   benchmarks/fetch_deepspeed.sh            then run on the device with carry=[".whl"]:
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
#       .whl/*.whl .whl/deepspeed-*.tar.gz && export PYTHONPATH=/tmp/site:$PYTHONPATH
#   (DeepSpeed's CPU Adam is compiled there on first use, with ninja and the machine's compiler.)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
VERSION="${DEEPSPEED_VERSION:-0.19.8}"
python3 -m pip download --no-deps --no-binary=deepspeed -d .whl "deepspeed==${VERSION}"
for pkg in hjson pydantic pydantic-core annotated-types typing-inspection; do  # ninja, py-cpuinfo, msgpack, einops are in the GPU image
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pkg"
done
ls -la .whl
