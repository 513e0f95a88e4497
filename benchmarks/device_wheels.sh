#!/usr/bin/env bash
# Here (no GPU needed): small wheels for the lent GPU machine, into .wheels/ (git-ignored), for a
# device.sh call to carry (`carry: [".wheels"]`); device.sh installs them before its benchmarks.
#
#   xformers 0.0.35               py39-none wheel, torch >= 2.10 (the device has 2.11), ~3 MiB
#   nvidia-cuda-runtime-cu12      libcudart.so.12, which xformers' extension links and the CUDA 13
#                                 image lacks (device.sh puts it on LD_LIBRARY_PATH), ~3.5 MiB
#
# Whether xformers then runs there is device.sh's xformers-check stage (fastmae.attention.xformers_runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
rm -rf .wheels
mkdir -p .wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .wheels "xformers==${XFORMERS_VERSION:-0.0.35}" "nvidia-cuda-runtime-cu12"
ls -l .wheels
echo "carry .wheels with: FASTMAE_DEVICE_PROFILE=ablations bash benchmarks/device.sh"
