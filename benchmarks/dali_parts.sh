#!/usr/bin/env bash
# Here (no GPU needed): DALI's wheels for the lent GPU machine, cut into parts one `run` call can carry.
#
# The device image has no DALI, no index is reachable from it, and DALI's CUDA 13 wheel (~190 MiB)
# with its needs (~260 MiB in all) exceeds what one call carries (64 MiB, the tree included). So:
# download them here for the device's Python 3.12 / x86-64, tar them, split the tar into parts of
# PART_MIB, and carry one part per call into a warm machine (benchmarks/device_dali.sh says how).
#
#     bash benchmarks/dali_parts.sh            # -> .dali/part-00 .. part-NN, .dali/MANIFEST
#
# .dali/ is git-ignored: wheels are build inputs we did not make, never committed.
set -euo pipefail
cd "$(dirname "$0")/.."

PART_MIB="${PART_MIB:-55}"
# PY_VERSION: the device's Python (3.12); another only to try the parts and the install here
PY="${PYTHON:-python3}"
DALI="${DALI_VERSION:-2.4.0}"
# DALI with its needs, as pip resolves them for the device's Python (DALI pins some exactly, e.g.
# nvidia-libnvcomp-cu13). Only numpy (17 MiB, under torch on the image) is dropped: the small ones
# stay, since device_dali.sh lets pip resolve against what is installed and take from the stash only
# what is missing (six, for one, is not on the image).
ON_IMAGE=(numpy)

rm -rf .dali
mkdir -p .dali/wheels
"$PY" -m pip download -q --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .dali/wheels "nvidia-dali-cuda130==$DALI" "nvidia-nvimgcodec-cu13[all]"
for name in "${ON_IMAGE[@]}"; do rm -f .dali/wheels/"$name"-*.whl; done

tar -C .dali -cf .dali/wheels.tar wheels
split -b "${PART_MIB}M" -d .dali/wheels.tar .dali/part-
{
  echo "# fastmae DALI wheels for the device, $(date -u +%FT%TZ)"
  echo "parts $(find .dali -maxdepth 1 -name 'part-*' | wc -l)"
  (cd .dali && sha256sum wheels.tar part-*)
  (cd .dali/wheels && ls -l ./*.whl)
} >.dali/MANIFEST
rm -rf .dali/wheels .dali/wheels.tar
cat .dali/MANIFEST
echo
echo "carry one .dali/part-NN per run call (the last call also carries .dali/MANIFEST): benchmarks/device_dali.sh"
