#!/usr/bin/env bash
# The GPU check: one command for a machine with one CUDA GPU and no network (Python 3.12,
# torch with transformers, accelerate and timm preinstalled), within 5 minutes.
#
#   experiments/gpu_check.sh [OUT_DIR]     # default: $OUT if set, else ./gpu-check-out
#
# It installs placer without network (its missing dependencies from the wheels that
# ../shared/device/prepare-wheels.sh puts in .whl/, or in $WHEELS), then runs, each
# under its own time limit: the `gpu`-marked tests; a cuda:0,cpu plan of a zoo model
# (equal to the unplaced model? measured); the same plan pipelined in micro-batches
# (placer.apply, GPipe); the same plan on torch.distributed.pipelining
# (two ranks, 1F1B); and under bf16 autocast (equal within bf16 tolerance? measured).
# Everything it sees goes to OUT_DIR/gpu_check.txt, a summary line per part last.
# Without CUDA it says so and skips the GPU parts (exit 0); GPU_CHECK_STAND_IN=1
# runs them with the virtual CPU device cpu:1 standing in for cuda:0 (a dry run here).
# Exit status: 0 when no part failed, 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-$ROOT/gpu-check-out}}
WHEELS=${WHEELS:-$ROOT/.whl}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/placer-site}
BUDGET_S=${GPU_CHECK_BUDGET_S:-290}
mkdir -p "$OUT_DIR" || { echo "cannot create $OUT_DIR" >&2; exit 1; }
LOG=$OUT_DIR/gpu_check.txt
: > "$LOG"
START=$(date +%s)
declare -a SUMMARY=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# run NAME LIMIT_S COMMAND...: the command under a time limit (never past the budget),
# its output into the log, its verdict into the summary.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if ((left < 10)); then
    SUMMARY+=("$name SKIP: the ${BUDGET_S} s budget is spent")
    return
  fi
  ((limit > left)) && limit=$left
  say ""
  say "== $name (limit ${limit} s): $*"
  local begin status took
  begin=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  took=$(($(date +%s) - begin))
  case $status in
    0) SUMMARY+=("$name PASS (${took} s)") ;;
    3) SUMMARY+=("$name SKIP: $(grep "^RESULT $name SKIP" "$LOG" | tail -1 | cut -d' ' -f4-)") ;;
    124 | 137) SUMMARY+=("$name FAIL: ran past its ${limit} s limit"); FAILED=1 ;;
    *) SUMMARY+=("$name FAIL (exit $status, ${took} s)"); FAILED=1 ;;
  esac
}

cd "$ROOT" || exit 1
say "placer GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# -- install without network --------------------------------------------------------------
missing=$("$PY" - <<'EOF'
import importlib.util
names = ["numpy", "networkx", "gymnasium", "pymetis", "scipy", "click", "rich", "matplotlib", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [[ -n $missing ]]; then
  say "missing: $missing"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing the wheels in $WHEELS into $SITE (no index, no dependencies)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      2>&1 | tee -a "$LOG"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    say "no wheels in $WHEELS: run ../shared/device/prepare-wheels.sh here first and carry .whl"
  fi
fi
# placer itself from this checkout: as it is if Python already finds it here, else installed
# editable (no index, no build isolation: nothing to fetch; gives the `placer` command), else
# on the path.
here=$(cd / && "$PY" -c 'import os, placer; print(os.path.dirname(os.path.dirname(placer.__file__)))' 2>/dev/null)
if [[ $here == "$ROOT" ]]; then
  say "placer is importable from $ROOT"
elif "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" >>"$LOG" 2>&1; then
  say "placer installed (editable) from $ROOT"
else
  say "pip could not install placer (see above); using PYTHONPATH=$ROOT"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PLACER_CACHE=${PLACER_CACHE:-$OUT_DIR/cache}

STAND_IN=()
[[ ${GPU_CHECK_STAND_IN:-0} == 1 ]] && STAND_IN=(--stand-in)
CHECK=("$PY" "$ROOT/experiments/gpu_check.py" --iters "${GPU_CHECK_ITERS:-10}")

# -- the checks -----------------------------------------------------------------------------
run env 60 "${CHECK[@]}" env
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  run gpu-tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider "$ROOT/tests"
else
  SUMMARY+=("gpu-tests SKIP: no CUDA device here")
  say "no CUDA device: the gpu-marked tests are skipped${STAND_IN:+; the other parts run on cpu:1 instead of cuda:0}"
fi
for part in plan microbatch pipelining bf16; do
  run "$part" 90 "${CHECK[@]}" "$part" "${STAND_IN[@]}"
done

say ""
say "== summary ($(($(date +%s) - START)) s)"
for line in "${SUMMARY[@]}"; do say "$line"; done
exit $FAILED
