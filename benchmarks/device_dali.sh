#!/usr/bin/env bash
# On the lent GPU: DALI brought over in parts, installed, checked against its CPU pipeline, measured.
#
# A lease of its own (the main device.sh profile fills one): about 5 calls of ~30 s to carry the
# parts, then one of ~8 minutes. The machine goes back after ~30 s idle, so the calls follow each
# other at once; a gap means starting over (a fresh machine has an empty /tmp).
#
#   here, once:   bash benchmarks/dali_parts.sh           # .dali/part-00 .. part-04 + MANIFEST
#   call k (k = 00 .. last-1), carry [".dali/part-k", ".dali/MANIFEST"]:
#                 bash benchmarks/device_dali.sh stash      # checks the part against MANIFEST at once
#   last call, carry [".dali/part-LAST", ".dali/MANIFEST"], timeout_s ~540:
#                 FASTMAE_COMMIT=<sha> FASTMAE_CALL_LIMIT=540 bash benchmarks/device_dali.sh run
#
# `run` joins the parts (checked against MANIFEST's sha256), installs DALI from them with
# --no-index (pip takes from the stash only what the image lacks), installs the checkout, then:
# DALI's tests on CUDA (the mixed-decode pipeline against the CPU one: same crops, nvJPEG vs
# libjpeg-turbo tolerance), and bench_data with DALI mixed, the reference loader and torchvision's
# CUDA decoder (DALI's fancy and plain chroma upsampling), then the ViT-B trainer on synthetic
# batches and on DALI over the same JPEGs (#5's end-to-end goal). Each step's timeout is cut to
# what is left of the call (FASTMAE_CALL_LIMIT, its timeout_s), so the trainers' metrics are copied
# out before the call ends. Files under $OUT (named apart from device.sh's, so both ingest):
#     run_dali.log dali_env.json data_dali.json train_synthetic.jsonl train_dali.jsonl
set -uo pipefail
cd "$(dirname "$0")/.."

STASH="${FASTMAE_DALI_STASH:-/tmp/fastmae_dali}"
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$STASH" "$OUT"
CALL_LIMIT="${FASTMAE_CALL_LIMIT:-540}"
T0=$SECONDS

# left BUDGET_S [RESERVE_S]: the budget, cut to what is left of the call less RESERVE_S (default 15)
left() {
  local rest=$((CALL_LIMIT - (SECONDS - T0) - ${2:-15}))
  echo $(($1 < rest ? $1 : (rest > 1 ? rest : 1)))
}

stash() {
  local found=0 f
  [ -f .dali/MANIFEST ] && cp .dali/MANIFEST "$STASH/"
  for f in .dali/part-*; do
    [ -f "$f" ] || continue
    # a part damaged on the way is named now, not after the last call's join
    if [ -f .dali/MANIFEST ] && ! (cd .dali && grep " $(basename "$f")\$" MANIFEST | sha256sum -c --quiet -); then
      echo "$f does not match MANIFEST: carry it again" >&2
      return 2
    fi
    cp "$f" "$STASH/" && found=$((found + 1))
  done
  echo "stashed $found part(s); $STASH now holds:"
  ls -l "$STASH"
  [ "$found" -gt 0 ]
}

run() {
  stash
  case $? in 1) echo "(no part in this call's tree)" ;; 2) return 2 ;; esac
  local t0=$SECONDS
  if [ ! -f "$STASH/MANIFEST" ]; then
    echo "no MANIFEST in $STASH: carry .dali/MANIFEST in the last call" >&2
    return 2
  fi
  local want have
  want=$(awk '/^parts /{print $2}' "$STASH/MANIFEST")
  have=$(find "$STASH" -maxdepth 1 -name 'part-*' | wc -l)
  if [ "$want" != "$have" ]; then
    echo "have $have of $want parts (the machine was given back between calls?): $(ls "$STASH")" >&2
    return 2
  fi
  cat "$STASH"/part-* >"$STASH/wheels.tar"
  (cd "$STASH" && grep ' wheels.tar$' MANIFEST | sha256sum -c -) || return 2
  tar -C "$STASH" -xf "$STASH/wheels.tar"
  echo "=== install DALI ($((SECONDS - t0)) s)"
  # Resolved against what is installed, with the stash as the only index: only what is missing is
  # installed (nothing the image has is replaced), and a need the stash lacks is named.
  "$PY" -m pip install -q --no-index --no-cache-dir --find-links "$STASH/wheels" \
    nvidia-dali-cuda130 "nvidia-nvimgcodec-cu13[all]" || return 2
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 2
  "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)" || return 2

  echo "=== env ($((SECONDS - t0)) s)"
  timeout "$(left 20)" "$PY" -m benchmarks.common --env-out "$OUT/dali_env.json" "profile=dali"
  # the CUDA tests only: the CPU ones run in CI, and all of tests/data outran 90 s here (2026-11-28)
  echo "=== DALI tests on CUDA ($((SECONDS - t0)) s)"
  timeout "$(left 60 250)" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/data --tb=short --durations=5
  echo "=== data benchmark ($((SECONDS - t0)) s)"
  # windows of 24 batches on 12-batch epochs: each crosses epoch ends, as a small set's training does
  timeout "$(left 150 130)" "$PY" benchmarks/bench_data.py --backends dali,torch,tv_cuda,synthetic --dali-decoders fancy,plain --n-images 1536 \
    --steps 24 --repeats 2 --warmup 3 --workers 16 --out "$OUT/data_dali.json"
  # (#5's end-to-end goal) the trainer fed by DALI on the benchmark's JPEGs against the same trainer
  # on synthetic batches, same call, same shapes: >= 0.9x is the goal. The set is small (6 steps
  # an epoch), so epoch boundaries weigh more than on ImageNet.
  local jpegs="${TMPDIR:-/tmp}/fastmae_bench_jpegs" name
  for name in synthetic dali; do
    [ "$name" = dali ] && [ ! -d "$jpegs" ] && { echo "no JPEG set at $jpegs: no DALI trainer run"; break; }
    echo "=== trainer, $name data ($((SECONDS - t0)) s)"
    rm -rf "/tmp/fastmae_e2e_$name"
    # the synthetic run keeps the DALI run's time; each ends 15 s before the call does
    timeout "$(left 110 "$([ "$name" = synthetic ] && echo 125 || echo 20)")" "$PY" -m fastmae.train --preset mae_vit_base_patch16 --data-backend "$name" \
      --data-path "$jpegs" --num-workers 12 --batch-size 256 --effective-batch 256 --max-steps 48 \
      --log-every 8 --no-progress --vis-every-epochs 0 --run-dir "/tmp/fastmae_e2e_$name"
    # the resolved config first (model, batch, versions, commit: a line without img/s), as device.sh does
    if [ -f "/tmp/fastmae_e2e_$name/metrics.jsonl" ]; then
      "$PY" -c 'import json, sys; print(json.dumps({"config": json.load(open(sys.argv[1]))}))' \
        "/tmp/fastmae_e2e_$name/config.json" >"$OUT/train_$name.jsonl" 2>/dev/null || true
      cat "/tmp/fastmae_e2e_$name/metrics.jsonl" >>"$OUT/train_$name.jsonl"
    fi
  done
  timeout "$(left 10 0)" "$PY" benchmarks/report.py "$OUT"/data_dali.json "$OUT"/train_*.jsonl
  echo "=== done in $((SECONDS - t0)) s"
}

case "${1:-}" in
  stash) stash ;;
  run) run 2>&1 | tee "$OUT/run_dali.log" ;;
  *)
    echo "usage: $0 stash | run" >&2
    exit 2
    ;;
esac
