#!/usr/bin/env bash
# One GPU check in one command (about 8 minutes on an H100): the CUDA tests, the training step
# of Swin-T and Swin-B against timm (eager and compiled bf16, largest batch, MFU), the data
# loader on all cores; OUT_DIR/REPORT.md (tables, goals PASS/FAIL) + OUT_DIR/report.json +
# OUT_DIR/raw.tar.gz (every log and JSON). The report is rewritten after every stage.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke OUT_DIR    # anywhere: tiny sizes on the CPU (GPU_CHECK_SMOKE=1 too)
#   bash benchmarks/gpu_check.sh --fetch-wheels     # here, once: the wheels the GPU machine lacks into .whl/
#
# Through the device tool, from this machine (the GPU machine has torch 2.11 and timm but no
# yacs, termcolor or simplejpeg, and no network):
#   1. here: bash benchmarks/gpu_check.sh --fetch-wheels     (.whl/ is git-ignored, so it must be carried)
#   2. run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"], timeout_s=540)
#   REPORT.md, report.json and raw.tar.gz come back under the reply's files_at.
#
# Stages, in this order (each with its own time limit, taken from a budget of
# GPU_CHECK_BUDGET_S=465 s so that every later stage keeps its minimum; a stage that fails or
# times out is recorded with its output's tail and the next one runs):
#   install             pip-installs from .whl/ each of yacs, termcolor, simplejpeg that does not import
#   env                 GPU name -> dense bf16 peak for MFU (H100 SXM / H200: 989.4; unknown: no MFU)
#   train_tiny_eager    bench_train Swin-T eager_bf16, ours vs timm, largest batch (searched)
#   train_base_eager    the same for Swin-B
#   data                bench_data, all cores as loader workers
#   tests               python -m pytest -q -m cuda tests/cuda (junit XML into the report)
#   train_tiny_compile  bench_train Swin-T compile_bf16 at the eager run's largest batch (no search:
#   train_base_compile  every try would compile again)
# Knobs: GPU_CHECK_BUDGET_S, GPU_CHECK_CAP_<STAGE> (seconds, e.g. GPU_CHECK_CAP_TESTS=240),
# GPU_CHECK_SKIP="tests data" (stage names), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

export PY=${PYTHON:-python3} WHEELS=.whl PYTHONUNBUFFERED=1  # unbuffered: a killed stage's log keeps its last lines
MODULES="yacs termcolor simplejpeg"  # module name = distribution name; versions pinned in requirements.txt
DEVICE_PYTHON=${GPU_CHECK_PYTHON_VERSION:-3.12}  # the GPU machine's Python, for simplejpeg's binary wheel

pin() { grep -i "^$1==" requirements.txt | cut -d= -f3; }

fetch_wheels() {  # here, with network: pure-Python wheels, and simplejpeg built for the GPU machine's Python
  "$PY" -m pip download -q --no-deps -d "$WHEELS" "yacs==$(pin yacs)" "termcolor==$(pin termcolor)" || return
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "simplejpeg==$(pin simplejpeg)" || return
  ls -l "$WHEELS"
}

install_wheels() {  # install_wheels TARGET MODULE...: each module that does not import, from .whl/ only
  local target=$1 m wheel
  shift
  for m in "$@"; do
    if "$PY" -c "import $m" 2>/dev/null; then echo "$m: already importable"; continue; fi
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --find-links "$WHEELS" --target "$target" "$m"; then echo "$m: installed from $WHEELS"; continue; fi
    wheel=$(ls "$WHEELS"/"$m"-*-py3-none-any.whl 2>/dev/null | head -1)  # pip failed: a pure wheel is a zip
    if [[ -n $wheel ]] && "$PY" -m zipfile -e "$wheel" "$target"; then echo "$m: unpacked $wheel"; continue; fi
    echo "$m: MISSING, no wheel for this Python in $WHEELS (here: bash benchmarks/gpu_check.sh --fetch-wheels;" \
      "carry .whl)"
  done
}
export -f install_wheels

case ${1:-} in
  --fetch-wheels) fetch_wheels; exit ;;
  --smoke) export GPU_CHECK_SMOKE=1; shift ;;
esac
OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh [--smoke] OUT_DIR | --fetch-wheels}
SMOKE=${GPU_CHECK_SMOKE:-0}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SITE=$WORK/site
BUDGET=${GPU_CHECK_BUDGET_S:-465}
GRACE=10       # after SIGINT at its limit (pytest still writes its junit file), a stage gets this long before KILL
MIN_STAGE=20   # a stage that would get less is skipped
NPROC=$(nproc)
SKIP=${GPU_CHECK_SKIP-}
if [[ $SMOKE == 1 && -z ${GPU_CHECK_SKIP+x} ]]; then
  SKIP="train_tiny_compile train_base_compile"  # compiling Swin on a CPU takes many minutes
fi
REPORT_ARGS=(--work "$WORK" --out "$OUT_DIR")
[[ $SMOKE == 1 ]] && REPORT_ARGS+=(--smoke)

report() {  # rewrites the report (and the raw archive) so that a killed check still leaves one
  "$PY" benchmarks/gpu_report.py report "${REPORT_ARGS[@]}" "$@"
  tar -czf "$OUT_DIR/raw.tar.gz" -C "$WORK" --exclude=images --exclude=site . 2>/dev/null
}

cap() { local var="GPU_CHECK_CAP_${1^^}"; echo "${!var:-$2}"; }

record() {  # record NAME JSON-FIELDS
  printf '{"stage": "%s", %s}\n' "$1" "$2" >>"$WORK/stages.jsonl"
}

stage() {  # stage NAME CAP HOLD CMD...: CMD with a limit of CAP s, or less so that HOLD s stay for later stages
  local name=$1 limit left rc t0 t1 s0
  limit=$(cap "$name" "$2"); left=$((BUDGET - SECONDS - $3 - GRACE)); shift 3
  (( left < limit )) && limit=$left
  if [[ " $SKIP " == *" $name "* ]]; then
    record "$name" '"skipped": "GPU_CHECK_SKIP"'; echo "== $name: skipped (GPU_CHECK_SKIP)"; return
  fi
  if (( limit < MIN_STAGE )); then
    record "$name" "\"skipped\": \"only ${limit} s left of the ${BUDGET} s budget\""
    echo "== $name: skipped (no time left)"; return
  fi
  echo "== $name (limit ${limit} s) ..."
  t0=$(date +%s.%N) s0=$SECONDS
  timeout -s INT -k "$GRACE" "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  record "$name" "\"rc\": $rc, \"start\": $t0, \"end\": $t1, \"limit_s\": $limit"
  echo "   $name: exit $rc after $((SECONDS - s0)) s"
  report --quiet
}

echo "gpu_check: work folder $WORK, report in $OUT_DIR, budget ${BUDGET} s, smoke=$SMOKE"
: >"$WORK/stages.jsonl"

# shellcheck disable=SC2086  # one word per module
stage install 60 300 bash -c 'install_wheels "$@"' _ "$SITE" $MODULES
[[ -d $SITE ]] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

stage env 60 300 "$PY" benchmarks/gpu_report.py env --out "$WORK/env.json"
PEAK=$("$PY" benchmarks/gpu_report.py peak --env "$WORK/env.json" 2>/dev/null || echo 0)

if [[ $SMOKE == 1 ]]; then
  TRAIN=(--device cpu --img-size 64 --window 4 --batch-size 2 --rounds 1 --steps 1 --warmup 1 --peak-tflops 0)
  BATCH_T=(); BATCH_B=()
  DATA=(--batch-size 4 --batches 2 --warmup-batches 2 --train-images 16 --val-images 16 --classes 2 --rounds 1
        --per-core-images 4)
else
  TRAIN=(--device cuda --max-only --rounds 3 --steps 5 --warmup 3 --peak-tflops "$PEAK")
  BATCH_T=(--batch-size 256); BATCH_B=(--batch-size 128)  # where the largest-batch search starts doubling
  # one epoch = warm-up (one batch per worker: the first wave) + 32 timed batches, so no epoch restarts mid-run
  IMAGES=$(( (NPROC + 32) * 64 ))
  DATA=(--batch-size 64 --batches 32 --warmup-batches "$NPROC" --train-images "$IMAGES" --val-images "$IMAGES"
        --classes 16 --rounds 2 --per-core-images 50)
fi
BENCH=("$PY" benchmarks/bench_train.py)

compile_stage() {  # compile_stage NAME ARCH EAGER_STAGE BATCH...: compile_bf16 at the eager run's largest batch
  local from=(--no-max-batch)  # no eager result: the start batch (a search would compile at every try)
  [[ -f $WORK/$3.json ]] && from=(--max-batch-from "$WORK/$3.json")
  stage "$1" 170 0 "${BENCH[@]}" --arch "$2" --modes compile_bf16 "${@:4}" "${TRAIN[@]}" "${from[@]}" \
    --json "$WORK/$1.json"
}

stage train_tiny_eager 100 240 "${BENCH[@]}" --arch tiny --modes eager_bf16 "${BATCH_T[@]}" "${TRAIN[@]}" \
  --json "$WORK/train_tiny_eager.json"
stage train_base_eager 100 170 "${BENCH[@]}" --arch base --modes eager_bf16 "${BATCH_B[@]}" "${TRAIN[@]}" \
  --json "$WORK/train_base_eager.json"
stage data 75 120 "$PY" benchmarks/bench_data.py --workers "$NPROC" "${DATA[@]}" --images "$WORK/images" \
  --json "$WORK/data.json"
stage tests 150 60 "$PY" -m pytest -q -m cuda tests/cuda -p no:cacheprovider --junitxml "$WORK/tests.xml"
compile_stage train_tiny_compile tiny train_tiny_eager "${BATCH_T[@]}"
compile_stage train_base_compile base train_base_eager "${BATCH_B[@]}"

report
echo "gpu_check: $OUT_DIR/REPORT.md, $OUT_DIR/report.json, $OUT_DIR/raw.tar.gz; work folder $WORK"
