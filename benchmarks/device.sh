#!/usr/bin/env bash
# One lease, one command: environment, install, GPU tests, kernel / step / data benchmarks, a table last.
#
# Run from the repository root on the lent GPU machine (device tool `run`, timeout_s 600):
#
#     FASTMAE_COMMIT=<sha of `git rev-parse HEAD` here> FASTMAE_DIRTY=<0|1> bash benchmarks/device.sh
#
# The device copy of the tree may have no .git, or an older one than the tree: the commit and dirty
# flag come from those two variables (every JSON records them, and what git saw there as git_seen). Everything is written under $OUT as each stage finishes,
# so a timeout still returns what finished. At most 8 files come back from $OUT; this writes exactly:
#     run.log env.json kernels.json attention.json step_vit_base.json train_metrics.jsonl data.json
# (another profile names its log and environment run_<profile>.log and <profile>_env.json, so that a
# second call of the same day ingests beside the first without a clash)
# (the markdown table is printed last; report.py makes it and the chart from the JSON afterwards).
# As soon as the call returns: `python benchmarks/ingest.py <files_at>` copies them into
# benchmarks/results/<date>_<gpu>_<name> with the report beside them; commit before anything else.
#
# Budget, profile "main" (seconds; each stage has its own `timeout`, cut to what is left of the
# call: FASTMAE_CALL_LIMIT, default 480 (issue #6: one command, <= 8 minutes), the run's timeout_s
# or less; the table's 15 s are always kept):
#     env 20 | install 20 | device-fixture tests on CUDA 90 | gpu-marked tests 60 | kernels 60
#     | attention 70 | step ViT-B: up to 280, what is left less data's 40 | data 40
#     | trainer ViT-B 70, only if it still fits | report 10
# On the H200 run of 2026-11-27 env, install, kernels and data ended far below their budgets and the
# device tests at theirs; at those times the step stage gets ~250 s (4-5 compiles) of a 540 s call.
# The step stage holds the compiles (~35-60 s each on the H200: fm_fast, hf_compile, then the
# candidates of the performance push), three eager variants, 5 timed rounds and the profile; the
# trainer compiles once more (its metrics come back even if its stage times out after the compile);
# stages end early, so it usually fits.
# On the first H100 run (2026-11-26) the tests ran out of their 45 + 40 s (Triton compiling every
# specialisation on a fresh machine), ViT-L's two compiles did not fit beside ViT-B's, and the
# fused compile failed (fixed since): ViT-L now has its own profile, "large".
# The step stages end themselves 15 s before their timeout (--time-budget). Variants are set up in
# priority order (hf_eager, fm_fast, hf_compile, fm_ref, fm_fused_eager, then fm_fast_sdpa (fm_fast
# without the Triton decoder attention auto picks on Hopper), fm_fast_tattn, fm_fast_bf16res, fm_fast_tattn_bf16res,
# fm_fast_no_ac and fm_fast_mix128);
# the first compile is always tried, a
# later one is skipped (and recorded so in the JSON) when the longest compile measured so far
# would run into the 25 s kept for timing (on the H200, 2026-11-27, three compiles fit in 225 s:
# 43, 58 and 33 s); rounds stop when the next would not fit.
# torch.compile of a ViT training step takes on the order of a minute (ViT-L more); the main
# variants need 2 compiles per model (fm_fast, hf_compile); eager variants cost seconds. A step at
# batch 256 is ~0.05-0.1 s (ViT-B, 58 GFLOP/img) and ~0.1-0.2 s (ViT-L, 123 GFLOP/img) at 30-50% MFU,
# so 5 variants x (3 + 50) steps fit in the reserve. After the timing, fm_fast's and hf_compile's
# steps are profiled (--profile: device time by kernel category, how busy the GPU was).
#
# Profile "large" (FASTMAE_DEVICE_PROFILE=large; sum 560, cut to the call): env 20 | install 20 | step ViT-L 380
#     | step ViT-L largest batch 130 | report 10  (files: run_large.log large_env.json step_vit_large.json
#     step_vit_large_max.json)
#
# Profile "ablations" (FASTMAE_DEVICE_PROFILE=ablations, for a later lease; sum 555, + 45 with .wheels; cut to the call):
#     env 20 | install 20 | step ViT-B ablations 290 | step ViT-B largest batch 140 | kernel launch
#     configurations 75 | report 10  (files: run_ablations.log ablations_env.json step_ablations.json step_max_batch.json
#     sweep.json)
#     FASTMAE_STEP_VARIANTS="hf_eager fm_fast fm_fast_cudnn ..." picks the ablation variants instead
#     (the full group holds far more ~45 s compiles than 290 s: pick 4-5, e.g. after the main
#     profile's bench_attention: "hf_eager fm_fast fm_fast_sdpa fm_fast_tattn fm_fast_autotune",
#     the per-part variants of the backends attention.json found fastest).
#
# Profile "kernels" (FASTMAE_DEVICE_PROFILE=kernels; sum 290, ~5 minutes; FASTMAE_CALL_LIMIT=the
#     call's timeout_s, e.g. 290): env 20 | install 20 | the trainer's compiled bf16 run + exact
#     resume on CUDA, fused (two compiles; main leaves it out for time) 100
#     | kernel launch configurations 140 | report 10  (files: run_kernels.log kernels_env.json sweep.json)
#     The follow-up call for a lease with ~3 minutes left after "main": call it at once (the machine
#     is given back after ~30 s idle, and a fresh start costs minutes); bench_kernels' rows of the
#     rule's configuration came with "main", this says which configuration the rules should pick.
#
# Carried wheels: a call that carries .wheels/ (made here by benchmarks/device_wheels.sh: xformers
# 0.0.35 and nvidia-cuda-runtime-cu12, ~7 MiB) installs them first (+15 s, + a 30 s check that
# xformers runs); `auto` attention then uses xformers where it runs. Carry it with the ablations
# profile (fm_fast_xformers against fm_fast_sdpa), not with main (no spare time, and fm_fast's
# backend would change under the main comparison).
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
RUN_LOG=run.log ENV_JSON=env.json
[ "$PROFILE" != main ] && RUN_LOG="run_$PROFILE.log" ENV_JSON="${PROFILE}_env.json"
export PYTHONUNBUFFERED=1

T0=$SECONDS
SUMMARY=()
# The run's timeout_s (../shared/device.md: near 540; the main profile fits 480). Every stage's budget is cut to what is left
# of it, less REPORT_S for the table that comes last, so a long stage shortens the later ones
# instead of the call being killed with them (and the table) unrun.
CALL_LIMIT="${FASTMAE_CALL_LIMIT:-480}"
REPORT_S=15

# fit BUDGET_S RESERVE_S: the budget, cut so that RESERVE_S seconds (the stages after it, the
# table's included) and a 5 s margin stay within the call
fit() {
  local left=$((CALL_LIMIT - (SECONDS - T0) - $2 - 5))
  echo $(($1 < left ? $1 : left))
}

# stage NAME BUDGET_S CMD...: run CMD under `timeout` (the budget cut by `fit` to keep the table's
# time); a failure is recorded, the next stage runs; under 10 s left the stage is skipped.
stage() {
  local name=$1 budget=$2
  shift 2
  [ "$name" != report ] && budget=$(fit "$budget" "$REPORT_S")
  if [ "$budget" -lt 10 ]; then
    skip "$name" "$((SECONDS - T0)) s of the ${CALL_LIMIT} s call gone"
    return
  fi
  local t=$SECONDS
  echo
  echo "=== [$name] budget ${budget} s, at ${SECONDS}s since start: $*"
  timeout --kill-after=5 "$budget" "$@"
  local rc=$?
  local note=""
  [ "$rc" = 124 ] && note=" TIMEOUT"
  [ "$rc" = 137 ] && note=" KILLED (ignored the timeout's SIGTERM)"
  echo "=== [$name] rc=$rc$note in $((SECONDS - t)) s"
  SUMMARY+=("$(printf '%-22s rc=%-3s %4d s / %4d s%s' "$name" "$rc" $((SECONDS - t)) "$budget" "$note")")
}

skip() {
  echo "=== [$1] skipped: $2"
  SUMMARY+=("$(printf '%-22s skipped: %s' "$1" "$2")")
}

step() {  # step NAME BUDGET_S RESERVE_S OUT_JSON BENCH_STEP_ARGS...: the budget cut to keep RESERVE_S
  local name=$1 budget out=$4
  budget=$(fit "$2" "$3")
  shift 4
  if [ "$budget" -lt 30 ]; then
    skip "$name" "$((SECONDS - T0)) s of the ${CALL_LIMIT} s call gone"
    return
  fi
  stage "$name" "$budget" "$PY" -m benchmarks.bench_step "$@" --time-budget $((budget - 15)) --out "$out"
}

main_profile() {
  # (3) GPU tests, correctness first: the tests that take the `device` fixture run on CUDA there
  # (kernels vs their refs, fast path vs reference path, attention backends), then the gpu-marked
  # compile tests (the trainer's CUDA tests are left to the train stage below: each compiles twice).
  local device_tests=(tests/kernels tests/test_fast_path.py tests/test_attention.py)
  if [ "$DRY" = 1 ]; then
    stage tests-device 60 "$PY" -m pytest -q -p no:cacheprovider --co "${device_tests[@]}"
    stage tests-gpu 45 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow" -k "not test_cuda_compiled" tests/
  else
    # Workers where pytest-xdist is there (it is on the image): most of this stage is Triton
    # compiling each specialisation, one process each. A per-test limit where pytest-timeout is
    # there, so one hang costs one test, not the stage.
    local par=() par_gpu=() limit=()
    "$PY" -c "import xdist" 2>/dev/null && par=(-n 12) && par_gpu=(-n 4)
    "$PY" -c "import pytest_timeout" 2>/dev/null && limit=(--timeout 40)
    # test_launch_configs.py (33 Triton compiles of the swept tilings) is left to the CPU suite; the
    # ablations profile's sweep checks each tiling against eager on the GPU itself.
    # -v: each result is printed as it lands, so a stage that runs out of time still shows what
    # passed (the H200 run of 2026-11-27 ran out at 60 s with -q and showed nothing).
    stage tests-device 90 "$PY" -m pytest -v -p no:cacheprovider -m "not slow and not gpu" "${device_tests[@]}" \
      --ignore=tests/kernels/test_launch_configs.py "${par[@]}" "${limit[@]}" --maxfail=5 --tb=short --durations=15
    stage tests-gpu 60 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow" \
      -k "not test_cuda_compiled_bf16_run_and_resume" tests/ "${par_gpu[@]}" --maxfail=5 --tb=short --durations=10
  fi

  # (4) kernel benchmark
  local kargs=(--out "$OUT/kernels.json")
  [ "$DRY" = 1 ] && kargs+=(--smoke --no-compile)
  stage kernels 60 "$PY" benchmarks/bench_kernels.py "${kargs[@]}"

  # (4b) the step's two attention calls alone, every backend (which one the model should use);
  # ViT-B's: ViT-L's decoder call is the same one, its encoder's differs only in heads (16 for 12)
  local aargs=(--out "$OUT/attention.json")
  if [ "$DRY" = 1 ]; then aargs+=(--smoke); else aargs+=(--models vit_base_patch16 --time-budget 60); fi
  stage attention 70 "$PY" benchmarks/bench_attention.py "${aargs[@]}"

  # (5) step benchmark, ViT-B
  if [ "$DRY" = 1 ]; then
    step step-vit-base 240 55 "$OUT/step_vit_base.json" --tiny --variants main --profile fm_ref
  else
    # what the stages before left, less the data stage's 40 s and the table's
    step step-vit-base 280 55 "$OUT/step_vit_base.json" --models vit_base_patch16 --batch 256 \
      --variants main --warmup 3 --steps 10 --rounds 5 --timing-reserve 25 --profile fm_fast hf_compile
  fi

  # (6) data benchmark: the reference loader and torchvision's CUDA decoder (DALI is not on the image)
  local dargs=(--out "$OUT/data.json")
  if [ "$DRY" = 1 ]; then
    dargs+=(--smoke)
  else
    # three windows of 16 batches (~3 s each for the reference loader): the median is a steady one
    # (a first window also counts batches the 16 workers began before it: 1327 vs 644 img/s once)
    dargs+=(--n-images 768 --steps 16 --repeats 3 --warmup 2 --workers 16)
  fi
  # shellcheck disable=SC2206  # word splitting wanted: extra flags
  dargs+=(${FASTMAE_DATA_ARGS:-})
  # (the reference loader's 16 workers x 2 prefetched batches are drained before timing)
  stage data 40 "$PY" benchmarks/bench_data.py "${dargs[@]}"

  # (7) the trainer itself on the step's shapes (its img/s against the harness's fm_fast: the
  # loop's overhead; 0.98x on the H200, 2026-11-27), in the time the stages before left over
  local train_dir="${TMPDIR:-/tmp}/fastmae_device_train_$$"
  if [ "$DRY" = 1 ]; then
    stage train-vit-base 100 "$PY" -m fastmae.train --preset demo --data-backend synthetic --max-steps 12 \
      --log-every 4 --no-progress --run-dir "$train_dir" --vis-every-epochs 0
  elif (( SECONDS - T0 + 70 + REPORT_S + 5 <= CALL_LIMIT )); then
    stage train-vit-base 70 "$PY" -m fastmae.train --preset mae_vit_base_patch16 --data-backend synthetic \
      --batch-size 256 --effective-batch 256 --max-steps 60 --log-every 10 --no-progress \
      --run-dir "$train_dir" --vis-every-epochs 0
  else
    skip train-vit-base "$((SECONDS - T0)) s gone: 70 s more would not fit the ${CALL_LIMIT} s call"
  fi
  # the resolved config first (a line without img/s), so the report compares like with like
  if [ -f "$train_dir/metrics.jsonl" ]; then
    "$PY" -c 'import json, sys; print(json.dumps({"config": json.load(open(sys.argv[1]))}))' \
      "$train_dir/config.json" >"$OUT/train_metrics.jsonl" 2>/dev/null || true
    cat "$train_dir/metrics.jsonl" >>"$OUT/train_metrics.jsonl"
  fi
  rm -rf "$train_dir"
  REPORTS=("$OUT/kernels.json" "$OUT/attention.json" "$OUT/data.json" "$OUT/step_vit_base.json" "$OUT/train_metrics.jsonl")
}

large_profile() {
  if [ "$DRY" = 1 ]; then
    step step-vit-large 380 145 "$OUT/step_vit_large.json" --tiny --variants hf_eager fm_ref
    step step-vit-large-max 130 15 "$OUT/step_vit_large_max.json" --tiny --batch 4 max --variants hf_eager fm_ref
  else
    step step-vit-large 380 145 "$OUT/step_vit_large.json" --models vit_large_patch16 --batch 256 \
      --variants main --warmup 3 --steps 8 --rounds 4 --timing-reserve 30 --profile fm_fast hf_compile
    step step-vit-large-max 130 15 "$OUT/step_vit_large_max.json" --models vit_large_patch16 --batch 256 max \
      --variants hf_eager fm_fast --warmup 2 --steps 5 --rounds 2 --max-batch-seconds 45
  fi
  REPORTS=("$OUT/step_vit_large.json" "$OUT/step_vit_large_max.json")
}

ablations_profile() {
  if [ "$DRY" = 1 ]; then
    step step-ablations 290 230 "$OUT/step_ablations.json" --tiny --variants ablations
    step step-max-batch 140 90 "$OUT/step_max_batch.json" --tiny --batch 4 max --variants hf_eager fm_ref
  else
    # shellcheck disable=SC2086  # word splitting wanted: a list of variant names
    step step-ablations 290 230 "$OUT/step_ablations.json" --models vit_base_patch16 --batch 256 \
      --variants ${FASTMAE_STEP_VARIANTS:-ablations} --warmup 3 --steps 8 --rounds 4 --timing-reserve 25
    # the largest batch: 256 first (its memory per image predicts where the search starts), then max
    step step-max-batch 140 90 "$OUT/step_max_batch.json" --models vit_base_patch16 --batch 256 max \
      --variants hf_eager fm_fast --warmup 2 --steps 5 --rounds 2 --max-batch-seconds 45
  fi
  sweep 75
  REPORTS=("$OUT/step_ablations.json" "$OUT/step_max_batch.json" "$OUT/sweep.json")
}

sweep() {  # sweep BUDGET_S: each kernel's launch configurations (rows per program x warps, the
  # loss's tile order, the unshuffle backward's stages), GPU time at ViT-B shapes of fwd+bwd and of
  # each pass alone; the JSON is rewritten after each op, the ops furthest from their goal first
  # (~2-4 s a configuration with fwd+bwd alone; the passes add two short timings each)
  local sargs=(--out "$OUT/sweep.json")
  if [ "$DRY" = 1 ]; then
    sargs+=(--smoke --ops patch_gather masked_mse)
  else
    sargs+=(--ops masked_mse unshuffle encoder_input patch_gather)
  fi
  stage sweep "$1" "$PY" benchmarks/sweep_kernels.py "${sargs[@]}"
}

kernels_profile() {
  if [ "$DRY" = 1 ]; then
    stage tests-train-gpu 100 "$PY" -m pytest -q -p no:cacheprovider --co -k "test_cuda_compiled_bf16_run_and_resume and True" tests/test_train.py
  else
    stage tests-train-gpu 100 "$PY" -m pytest -q -p no:cacheprovider -k "test_cuda_compiled_bf16_run_and_resume and True" \
      tests/test_train.py --tb=short
  fi
  sweep 140
  REPORTS=("$OUT/sweep.json")
}

main() {
  echo "fastmae device run: profile $PROFILE, dry run $DRY, OUT=$OUT, $(date -u +%FT%TZ)"

  # (1) environment report
  stage env 20 "$PY" -m benchmarks.common --env-out "$OUT/$ENV_JSON" "profile=$PROFILE" "dryrun=$DRY"

  # (2) install the checkout (no index is reachable there: no deps, no build isolation)
  if [ "$DRY" = 1 ]; then
    skip install "dry run (the local venv has it)"
  else
    stage install 20 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  fi

  # (2b) wheels carried in .wheels/ (benchmarks/device_wheels.sh: xformers and the CUDA 12 runtime
  # its extension links), then whether xformers runs: `auto` attention takes it only if it does.
  if [ "$DRY" != 1 ] && compgen -G ".wheels/*.whl" >/dev/null; then
    stage wheels 15 "$PY" -m pip install -q --no-index --no-deps .wheels/*.whl
    local cudart12
    cudart12=$("$PY" -c "import glob, site; print(':'.join(d for p in site.getsitepackages() for d in glob.glob(p + '/nvidia/cuda_runtime/lib')))")
    [ -n "$cudart12" ] && export LD_LIBRARY_PATH="$cudart12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    stage xformers-check 30 "$PY" -c "import xformers; from fastmae.attention import xformers_runs; \
print('xformers', xformers.__version__, xformers_runs('cuda') or 'runs on cuda')"
  fi

  REPORTS=()
  case "$PROFILE" in
    main) main_profile ;;
    large) large_profile ;;
    ablations) ablations_profile ;;
    kernels) kernels_profile ;;
    *) echo "unknown FASTMAE_DEVICE_PROFILE=$PROFILE (main | large | ablations | kernels)" ;;
  esac

  # (7) the short table, last (the run tool returns the end of the output)
  local existing=() f
  for f in "${REPORTS[@]}"; do [ -f "$f" ] && existing+=("$f"); done
  # the activation memory counted on CPU (memory_probe.py, committed): measured peaks against it
  f=$(find benchmarks/results -name '*_cpu_activation_memory.json' 2>/dev/null | sort | tail -1)
  [ "${#existing[@]}" -gt 0 ] && [ -n "$f" ] && existing+=("$f")
  if [ "${#existing[@]}" -gt 0 ]; then
    stage report 10 "$PY" benchmarks/report.py "${existing[@]}"
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
main 2>&1 | tee "$OUT/$RUN_LOG"
exit 0
