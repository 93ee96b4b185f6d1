#!/usr/bin/env bash
# One prepared GPU check (issue 13, point 5), for one H200-class GPU with no network, in under 8 minutes:
#   install   deepspeed, datasets, rouge-score (and pytest if absent) from benchmarks/wheels, then this package
#   peak      a bf16 8192^3 matmul: the measured peak for MFU
#   no_sync   tests/test_terms_objective.py's (the loss path) and tests/test_step.py's (the whole step, its
#             token-count copy included) GPU tests under torch.cuda.set_sync_debug_mode("error")
#   fused     benchmarks/fused_head.py at V = 128k, 8192 tokens, hidden 4096, bf16, and a chunk-budget sweep
#   kd        KD step, bf16, BART-large-shaped 12-12 teacher -> 12-6 student, ZeRO-3, through launchers/run.py
#   generation  12-6 student vs 12-12 teacher, bf16
# Each part has its own timeout inside one overall budget; a failed part is recorded and the next one runs.
# Results: $OUT/gpu_check.json, $OUT/gpu_check.md (also printed), $OUT/fused_head.json, $OUT/fused_budget.json,
# $OUT/gpu_check.log.
#
#   bash benchmarks/build_gpu_wheels.sh        # first, on a machine with network
#   bash benchmarks/gpu_check.sh               # on the GPU machine; OUT defaults to benchmarks/gpu_results
#   bash benchmarks/gpu_check.sh --cpu-dry-run # the same parts at tiny sizes on the CPU (GPU_CHECK_DRY_RUN=1 too)
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY="${GPU_CHECK_DRY_RUN:-0}"
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
OUT="${OUT:-$ROOT/benchmarks/gpu_results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # models of several GB: never under $OUT
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_check.log"
: >"$LOG"
: >"$WORK/status.tsv"
rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.md" "$OUT/fused_head.json" "$OUT/fused_budget.json"
WHEELS="$ROOT/benchmarks/wheels"
START=$SECONDS
BUDGET="${GPU_CHECK_BUDGET_S:-450}"  # the parts' share of the 8 minutes; the summary needs a few seconds
# Anything DeepSpeed JIT-compiles lands here; the summary reports it (none is expected).
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # distill and benchmarks import even if the install fails
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# No network there: a hub lookup would wait for a connection that never comes.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ "$DRY" == 1 ]]; then
  MODE="cpu-dry-run"
  PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
  PIP_DRY=--dry-run  # prove the install commands without touching the shared venv
  NO_SKIP=
  DEVICE=cpu
  PEAK_ARGS=(--size 512 --warmup 1 --repeats 2)
  FUSED_SIZES=8192x512x256
  KD_ARGS=(--layers 2 --student-decoder-layers 1 --d-model 64 --heads 4 --ffn 128 --vocab 2048 --init-device cpu
           --examples 16 --join 2 --source-len 256 --target-len 64 --micro-batch 4 --steps 6 --log-every 2)
  GEN_ARGS=(--d-model 64 --heads 4 --ffn 128 --vocab 1024 --examples 4 --source-len 32 --new-tokens 8 --batch-size 2)
else
  MODE="gpu"
  PYTHON="${PYTHON:-python3}"
  export DS_ACCELERATOR=cuda
  PIP_DRY=
  NO_SKIP="-p no:skipping"
  DEVICE=cuda
  PEAK_ARGS=()
  FUSED_SIZES=131072x8192x4096
  KD_ARGS=()
  GEN_ARGS=()
fi

# part NAME TIMEOUT CMD...: run CMD with min(TIMEOUT, what is left of the budget), log it, record the outcome.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    printf '%s\tskipped\t0\tout of time budget\n' "$name" >>"$WORK/status.tsv"
    echo "[$name] skipped: out of time budget"
    return
  fi
  local t0=$SECONDS output="$WORK/$name.out"
  echo "===== $name (timeout ${limit}s): $*" >"$output"
  # bash -c: a part may be a function below. -k: SIGKILL for the launcher's ranks if SIGTERM leaves them hanging.
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >>"$output" 2>&1
  local rc=$? status=ok note=""
  cat "$output" >>"$LOG"
  if ((rc == 124 || rc == 137)); then
    status="timed out"; note="after ${limit}s"
  elif ((rc != 0)); then
    # the part's last error line says more than its last line (often a launcher's exit notice)
    note=$(grep -E 'Error|error:|Exception|FAILED' "$output" | tail -n 1)
    [[ -n "$note" ]] || note=$(grep -v '^\s*$' "$output" | tail -n 1)
    status="failed"; note="exit $rc: $(echo "$note" | cut -c1-200 | tr '\t' ' ')"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$note" >>"$WORK/status.tsv"
  echo "[$name] $status in $((SECONDS - t0))s ${note}"
}

install() {
  "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  # shellcheck disable=SC2206
  local pip=("$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" $PIP_DRY)
  # Resolve against what the image has; if one of its versions is outside a pin (datasets pins fsspec
  # and pyarrow), install the shipped wheels alone and let the import check below decide.
  if ! "${pip[@]}" deepspeed datasets rouge-score; then
    echo "install: resolution failed; installing the shipped wheels with --no-deps"
    local names
    names=$(ls "$WHEELS" | sed 's/-.*//' | sort -u | grep -vE '^(pytest|pytest_timeout|pluggy|iniconfig)$')
    # shellcheck disable=SC2086
    "${pip[@]}" --no-deps $names || return 1
  fi
  "$PYTHON" -c 'import pytest' 2>/dev/null || "${pip[@]}" pytest pytest-timeout || return 1
  # --no-build-isolation: the isolated build would fetch setuptools, and there is no network.
  local editable=0
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation $PIP_DRY -e . ||
    { editable=1; echo "install: pip install -e . failed; the parts import distill through PYTHONPATH"; }
  "$PYTHON" -m pip check || true  # a report only: the image's own packages may disagree among themselves
  "$PYTHON" -c 'import deepspeed, datasets, rouge_score, distill; print("deepspeed", deepspeed.__version__, "datasets", datasets.__version__)' &&
    return $editable
}

fused() {
  "$PYTHON" benchmarks/fused_head.py --device "$DEVICE" --dtype bfloat16 --sizes "$FUSED_SIZES" \
    --methods fused,chunked,naive --no-append --json "$OUT/fused_head.json" || return 1
  # the fused pass at several loss.logit_chunk_mib budgets: the evidence for its GPU default
  "$PYTHON" benchmarks/fused_head.py --device "$DEVICE" --dtype bfloat16 --sizes "$FUSED_SIZES" \
    --budget-sweep 256,1024,2048,4096 --no-append --json "$OUT/fused_budget.json"
}

no_sync() {
  # On the CPU the test skips itself ("needs a GPU"); on the GPU machine a skip would hide a missing GPU,
  # so the skipping plugin is off there. The summary reports the outcome from the XML.
  # shellcheck disable=SC2086
  "$PYTHON" -m pytest -q -rs -p no:cacheprovider $NO_SKIP --junitxml="$WORK/no_sync.xml" \
    tests/test_terms_objective.py::test_the_loss_path_never_syncs_on_a_gpu tests/test_step.py::test_a_step_never_syncs_on_a_gpu
}

export -f install fused no_sync
export PYTHON WHEELS PIP_DRY NO_SKIP DEVICE FUSED_SIZES OUT WORK

echo "gpu_check: $MODE, python $PYTHON, results in $OUT, budget ${BUDGET}s"
part install 120 install
part peak 60 "$PYTHON" benchmarks/gpu_check.py peak --device "$DEVICE" "${PEAK_ARGS[@]}" --json "$WORK/peak.json"
part no_sync 90 no_sync
part fused 150 fused
part kd 220 "$PYTHON" benchmarks/gpu_check.py kd --work "$WORK/kd" --peak "$WORK/peak.json" "${KD_ARGS[@]}" \
  --json "$WORK/kd.json"
rm -rf "$WORK/kd"  # several GB of models and checkpoints
part generation 150 "$PYTHON" benchmarks/gpu_check.py generation --device "$DEVICE" "${GEN_ARGS[@]}" \
  --json "$WORK/generation.json"

jit=$(ls "$TORCH_EXTENSIONS_DIR" 2>/dev/null | paste -sd, -)
echo
"$PYTHON" benchmarks/gpu_check.py summary --work "$WORK" --out "$OUT" --mode "$MODE" \
  --total-s "$((SECONDS - START))" --jit-builds "$jit" 2>>"$LOG" || {
  echo "gpu_check: the summary failed; the raw status:"; cat "$WORK/status.tsv"; tail -n 40 "$LOG"
}
