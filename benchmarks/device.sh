#!/usr/bin/env bash
# One lease, one command: environment, install, GPU tests, kernel / step / data benchmarks, a table last.
#
# Run from the repository root on the lent GPU machine (device tool `run`, timeout_s ~540):
#
#     FASTMAE_COMMIT=<sha of `git rev-parse HEAD` here> FASTMAE_DIRTY=<0|1> bash benchmarks/device.sh
#
# The device copy of the tree may have no .git: the commit and dirty flag then come from those two
# variables (every JSON records which). Everything is written under $OUT as each stage finishes,
# so a timeout still returns what finished. At most 8 files come back from $OUT; this writes exactly:
#     run.log env.json kernels.json step_vit_base.json step_vit_large.json data.json report.md step.png
#
# Budget, profile "main" (seconds; each stage has its own `timeout`; sum 480 = 8 min):
#     env 10 | install 25 | gpu tests 90 (gpu-marked 50 + device-fixture tests on CUDA 40)
#     | kernels 50 | step ViT-B 145 | step ViT-L 130 | data 20 | report 10
# The step stages end themselves 15 s before their timeout (--time-budget). Variants are set up in
# priority order (hf_eager, fm_fast, hf_compile, fm_ref, fm_fused_eager); the first compile is
# always tried, a later one is skipped (and recorded so in the JSON) when the longest compile
# measured so far would run into the 20 s kept for timing; rounds stop when the next would not fit.
# torch.compile of a ViT training step takes on the order of a minute (ViT-L more); the main
# variants need 2 compiles per model (fm_fast, hf_compile); eager variants cost seconds. A step at
# batch 256 is ~0.05-0.1 s (ViT-B, 58 GFLOP/img) and ~0.1-0.2 s (ViT-L, 123 GFLOP/img) at 30-50% MFU,
# so 5 variants x (3 + 50) steps fit in the reserve.
#
# Profile "ablations" (FASTMAE_DEVICE_PROFILE=ablations, for a later lease; sum 475):
#     env 10 | install 25 | step ViT-B ablations 290 | step ViT-B largest batch 140 | report 10
#     (files: run.log env.json step_ablations.json step_max_batch.json report.md step.png)
#     FASTMAE_STEP_VARIANTS="hf_eager fm_fast fm_fast_cudnn ..." picks the ablation variants instead.
#
# FASTMAE_DEVICE_DRYRUN=1 runs the same plumbing on a CPU machine: --tiny / --smoke everywhere, no
# install, the GPU tests only collected. OUT defaults to a fresh temporary directory.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
DRY="${FASTMAE_DEVICE_DRYRUN:-0}"
PROFILE="${FASTMAE_DEVICE_PROFILE:-main}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

T0=$SECONDS
SUMMARY=()

# stage NAME BUDGET_S CMD...: run CMD under `timeout`; a failure is recorded, the next stage runs.
stage() {
  local name=$1 budget=$2
  shift 2
  local t=$SECONDS
  echo
  echo "=== [$name] budget ${budget} s, at ${SECONDS}s since start: $*"
  timeout --kill-after=5 "$budget" "$@"
  local rc=$?
  local note=""
  [ "$rc" = 124 ] && note=" TIMEOUT"
  echo "=== [$name] rc=$rc$note in $((SECONDS - t)) s"
  SUMMARY+=("$(printf '%-22s rc=%-3s %4d s / %4d s%s' "$name" "$rc" $((SECONDS - t)) "$budget" "$note")")
}

skip() {
  echo "=== [$1] skipped: $2"
  SUMMARY+=("$(printf '%-22s skipped: %s' "$1" "$2")")
}

step() {  # step NAME BUDGET_S OUT_JSON BENCH_STEP_ARGS...
  local name=$1 budget=$2 out=$3
  shift 3
  stage "$name" "$budget" "$PY" -m benchmarks.bench_step "$@" --time-budget $((budget - 15)) --out "$out"
}

main_profile() {
  # (3) GPU tests: the gpu-marked tests (slow ones left out), then the tests that take the `device`
  # fixture, which run on CUDA there (kernels, fast path vs reference path, attention backends).
  local device_tests=(tests/kernels tests/test_fast_path.py tests/test_attention.py)
  if [ "$DRY" = 1 ]; then
    stage tests-gpu 50 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/
    stage tests-device 40 "$PY" -m pytest -q -p no:cacheprovider --co "${device_tests[@]}"
  else
    stage tests-gpu 50 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/ --durations=5
    stage tests-device 40 "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not gpu" "${device_tests[@]}" \
      --durations=5
  fi

  # (4) kernel benchmark (the kernels engineer's; its own flags)
  if [ -f benchmarks/bench_kernels.py ]; then
    local kargs=(--out "$OUT/kernels.json")
    [ "$DRY" = 1 ] && kargs+=(--smoke --no-compile)
    stage kernels 50 "$PY" benchmarks/bench_kernels.py "${kargs[@]}"
  else
    skip kernels "benchmarks/bench_kernels.py not in this tree"
  fi

  # (5) step benchmark, ViT-B first
  if [ "$DRY" = 1 ]; then
    step step-vit-base 145 "$OUT/step_vit_base.json" --tiny --variants main
    step step-vit-large 130 "$OUT/step_vit_large.json" --tiny --variants hf_eager fm_ref
  else
    step step-vit-base 145 "$OUT/step_vit_base.json" --models vit_base_patch16 --batch 256 \
      --variants main --warmup 3 --steps 10 --rounds 5 --timing-reserve 20
    step step-vit-large 130 "$OUT/step_vit_large.json" --models vit_large_patch16 --batch 256 \
      --variants main --warmup 3 --steps 8 --rounds 4 --timing-reserve 20
  fi

  # (6) data benchmark (the data engineer's; --out if it takes one, extra flags from FASTMAE_DATA_ARGS)
  if [ -f benchmarks/bench_data.py ]; then
    local help dargs=()
    help="$("$PY" benchmarks/bench_data.py --help 2>&1 || true)"
    grep -q -- "--out" <<<"$help" && dargs+=(--out "$OUT/data.json")
    [ "$DRY" = 1 ] && grep -q -- "--smoke" <<<"$help" && dargs+=(--smoke)
    # shellcheck disable=SC2206  # word splitting wanted: extra flags
    dargs+=(${FASTMAE_DATA_ARGS:-})
    stage data 20 "$PY" benchmarks/bench_data.py "${dargs[@]}"
  else
    skip data "benchmarks/bench_data.py not in this tree"
  fi
  REPORTS=("$OUT/kernels.json" "$OUT/data.json" "$OUT/step_vit_base.json" "$OUT/step_vit_large.json")
}

ablations_profile() {
  if [ "$DRY" = 1 ]; then
    step step-ablations 290 "$OUT/step_ablations.json" --tiny --variants ablations
    step step-max-batch 140 "$OUT/step_max_batch.json" --tiny --batch 4 max --variants hf_eager fm_ref
  else
    # shellcheck disable=SC2086  # word splitting wanted: a list of variant names
    step step-ablations 290 "$OUT/step_ablations.json" --models vit_base_patch16 --batch 256 \
      --variants ${FASTMAE_STEP_VARIANTS:-ablations} --warmup 3 --steps 8 --rounds 4 --timing-reserve 25
    # the largest batch: 256 first (its memory per image predicts where the search starts), then max
    step step-max-batch 140 "$OUT/step_max_batch.json" --models vit_base_patch16 --batch 256 max \
      --variants hf_eager fm_fast --warmup 2 --steps 5 --rounds 2 --max-batch-seconds 45
  fi
  REPORTS=("$OUT/step_ablations.json" "$OUT/step_max_batch.json")
}

main() {
  echo "fastmae device run: profile $PROFILE, dry run $DRY, OUT=$OUT, $(date -u +%FT%TZ)"

  # (1) environment report
  stage env 10 "$PY" -m benchmarks.common --env-out "$OUT/env.json" "profile=$PROFILE" "dryrun=$DRY"

  # (2) install the checkout (no index is reachable there: no deps, no build isolation)
  if [ "$DRY" = 1 ]; then
    skip install "dry run (the local venv has it)"
  else
    stage install 25 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  fi

  REPORTS=()
  case "$PROFILE" in
    main) main_profile ;;
    ablations) ablations_profile ;;
    *) echo "unknown FASTMAE_DEVICE_PROFILE=$PROFILE (main | ablations)" ;;
  esac

  # (7) the short table, last (the run tool returns the end of the output)
  local existing=() f
  for f in "${REPORTS[@]}"; do [ -f "$f" ] && existing+=("$f"); done
  if [ "${#existing[@]}" -gt 0 ]; then
    stage report 10 "$PY" benchmarks/report.py "${existing[@]}" --md "$OUT/report.md" --png "$OUT/step.png"
  else
    skip report "no results JSON"
  fi

  rm -f "$OUT"/*.tmp
  local n_files
  n_files=$(find "$OUT" -type f | wc -l)
  echo
  echo "=== stages (total $((SECONDS - T0)) s; $n_files files in \$OUT, at most 8 come back)"
  printf '%s\n' "${SUMMARY[@]}"
  if [ "$n_files" -gt 8 ]; then echo "WARNING: more than 8 files under \$OUT: $(ls "$OUT")"; fi
}

# tee, not exec-redirection: the pipeline ends only when tee has written the last line (the table)
main 2>&1 | tee "$OUT/run.log"
exit 0
