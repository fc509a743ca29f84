#!/usr/bin/env bash
# bench/gpu.sh: everything that needs a GPU, in one run of under 8 minutes, and one table of it.
#
# Run from the repository root on a machine with CUDA, the environment installed
# (pip install -c constraints.txt -e ".[test,bench]"):
#
#     bash bench/gpu.sh                  # logs and the table in bench/gpu_out/
#     OUT=/tmp/gpu bash bench/gpu.sh     # elsewhere
#
# Steps, each under its own time limit (timeout(1); limits in seconds, expected times on one H100 in
# brackets, a guess until a first run replaces them):
#   cuda tests   60 [~20]  the tests that need CUDA: pytest -k cuda (tests/test_safety.py's data/model on
#                          two devices); failed if pytest ran 0 tests or skipped any
#   speed.py    140 [~90]  python bench/speed.py --device cuda --quick (depths 8 and 16)
#   zoo          90 [~40]  python bench/zoo.py --device cuda on $ZOO_MODELS, exact mode only
#   distributed  90 [~45]  two processes: nccl with a GPU per rank, else (one GPU) gloo on cuda:0;
#                          python bench/gpu_table.py distributed
#   gram route   60 [~35]  rescale_ on resnet18 and vgg11 with the per-sample gradients formed (the
#                          library's route off the CPU) and through the Gram matrix (its CPU-only route);
#                          python bench/gpu_table.py gram
# A step that would pass the overall deadline ($DEADLINE_S, 465 s from the start) gets what is left, or is
# not run. A failed step does not stop the others. At the end one markdown table (step, status, wall
# seconds, key figures) is printed and written to $OUT/gpu_table.md, under a "## bench/gpu.sh" heading,
# ready to paste into bench/RESULTS.md (python bench/gpu_table.py table "$OUT" --results bench/RESULTS.md
# does it). Exit status: 0 if every step passed, 1 if one did not, 2 if there is no GPU.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/gpu_out}
PYTHON=${PYTHON:-python}
DEADLINE_S=${DEADLINE_S:-465}
ZOO_MODELS=${ZOO_MODELS:-resnet18 vgg11 mobilenet_v3_small convnext_tiny}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: >"$STEPS"
START=$(date +%s)

# --- the machine: versions, the GPU, and a clear failure without CUDA -----------------------------------
if ! "$PYTHON" - >"$OUT/machine.txt" 2>"$OUT/machine.err" <<'EOF'; then
import platform, subprocess, sys
import torch
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
import magicinit  # noqa: F401  (the package must import)
nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "not built in"
names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}, Python {platform.python_version()}")
print(f"{torch.cuda.device_count()} GPU(s): {names}")
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    commit = "unknown"
print(f"library at commit {commit}")
EOF
    echo "bench/gpu.sh: no usable GPU: $(tail -n 1 "$OUT/machine.err")" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader |
        sed 's/^/nvidia-smi: /' >>"$OUT/machine.txt" || true
fi
cat "$OUT/machine.txt"

# --- the steps -----------------------------------------------------------------------------------------
# run_step NAME LIMIT_S LOG COMMAND...: COMMAND under timeout, its output in $OUT/LOG, a line in steps.tsv.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((DEADLINE_S - ($(date +%s) - START) - 10))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 15)); then
        printf '%s\t-\t0\t0\t%s\n' "$name" "$log" >>"$STEPS"
        echo "[gpu.sh] $name: not run (no time left)"
        return 0
    fi
    echo "[gpu.sh] $name (limit ${limit} s): $*"
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$log" 2>&1 || rc=$?
    t1=$(date +%s.%N)
    local seconds
    seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" "$log" >>"$STEPS"
    echo "[gpu.sh] $name: exit $rc, ${seconds} s"
    if ((rc != 0)); then tail -n 5 "$OUT/$log" | sed 's/^/    /'; fi
}

rm -f "$OUT/cuda_tests.xml" "$OUT/zoo.json" "$OUT/distributed.json" "$OUT/gram.json"
run_step "cuda tests" 60 cuda_tests.log \
    "$PYTHON" -m pytest tests -q -k cuda -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml"
run_step "speed.py" 140 speed.log \
    "$PYTHON" bench/speed.py --device cuda --quick
# shellcheck disable=SC2086  # ZOO_MODELS is a list of names
run_step "zoo" 90 zoo.log \
    "$PYTHON" bench/zoo.py --device cuda --models $ZOO_MODELS --no-approximate --threads 4 \
    --results "$OUT/zoo_section.md" --json "$OUT/zoo.json"
run_step "distributed" 90 distributed.log \
    "$PYTHON" bench/gpu_table.py distributed --json "$OUT/distributed.json" --deadline-s 80
run_step "gram route" 60 gram.log \
    "$PYTHON" bench/gpu_table.py gram --json "$OUT/gram.json" --models resnet18 vgg11 --budget-s 30

# --- the table -----------------------------------------------------------------------------------------
echo
echo "[gpu.sh] $(($(date +%s) - START)) s in all; the table (also in $OUT/gpu_table.md):"
echo
"$PYTHON" bench/gpu_table.py table "$OUT"
