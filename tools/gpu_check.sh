#!/usr/bin/env bash
# The ONE script to run every GPU test and benchmark of inrfmt on a CUDA machine, in a single call.
#
#   tools/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
#
# The GPU image it expects: Python 3.12, torch 2.11 built for CUDA 13, triton 3.6, pytest-xdist, and none of
# zstandard, constriction, numba and llvmlite, which the reader and format 2 need: carry their wheels in
# .whl/ (they are installed into /tmp/site first):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       zstandard constriction numba llvmlite
# and name .whl in the device call's carry. env.txt's lines go to the log; a version that differs is logged
# as a warning (the static figures of BENCHMARKS.md were made with that triton).
#
# Writes under $OUT (the device tool's folder, at most 8 files come back) or ./gpu_out:
#   gpu_check.log        everything, stage by stage: versions, exit codes, times, kernel compiles per stage
#   pytest_gpu.xml       JUnit report of `pytest -m gpu` (the CUDA tests of every test file), rewritten after
#                        every test, so a stage stopped at its limit keeps the results so far
#   bench_decode.json    tools/bench_decode.py: img/s per net/size/backend/config, error vs torch, load GB/s
#   bench_encode.jsonl   tools/bench_encode.py --gpu
#   bench_all/           tools/bench_all.py --gpu --only train: train.jsonl, train.png, bench_all.json
#
# Stages: GPU_CHECK_STAGES="pytest decode encode train" (default all), each under its own limit:
#   pytest 180 s, decode 120 s, encode 60 s, train 170 s = 530 s, plus up to 10 s each to kill a stage: the
#   whole run fits one 10-minute device call (timeout_s=600). Each stage is sized, by estimate (no GPU has
#   run this script yet), to finish within half its limit on a cold machine, where every kernel
#   configuration compiles on the CPU first (2-3 s for a 10-layer net, 0.7 s for a 3-layer one on a 2-core
#   box; BENCHMARKS.md): the pytest stage compiles about 25 configurations in parallel workers (`-n auto`
#   when pytest-xdist is present), the decode stage about 13 more besides its timings (the sweep covers two
#   nets), the train stage runs 6 of bench_all's 12 runs. The stages share one fresh triton cache, and the
#   log gives each stage's time and kernel compiles: check them against the limits after the first run.
#   The benchmarks write their JSON as they go, so a stage stopped at its limit keeps what it measured.
# Python: $PYTHON or python3.
# GPU_CHECK_QUICK=1: tiny sizes for the decode and encode stages: a smoke run of this whole script. On a
# machine without CUDA (tests/test_tools.py runs it so) the GPU tests skip, the decode stage runs the
# kernel in triton's interpreter and every other part (stages, limits, logging, compile counting, the
# JUnit report, exit status) runs as on the GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
STAGES="${GPU_CHECK_STAGES:-pytest decode encode train}"
QUICK="${GPU_CHECK_QUICK:-0}"
LOG="$OUT_DIR/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# A fresh triton cache: every kernel a stage needs compiles there once, and its count is the stage's compiles.
export TRITON_CACHE_DIR="${GPU_CHECK_TRITON_CACHE:-$(mktemp -d /tmp/inrfmt-triton-cache.XXXXXX)}"
status=0

log() { echo "$*" | tee -a "$LOG"; }
compiled_kernels() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import platform, torch
expected = {"python": "3.12", "torch": "2.11", "cuda": "13", "triton": "3.6"}
found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
print("python", found["python"], "torch", found["torch"], "cuda", found["cuda"])
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
try:
    import triton; print("triton", triton.__version__); found["triton"] = triton.__version__
except ImportError as e:
    print("triton missing:", e)
for mod in ("zstandard", "numpy", "click", "PIL", "torchvision", "xdist"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except ImportError as e:
        print(mod, "MISSING:", e)
for name, want in expected.items():
    if not found.get(name, "").startswith(want):
        print(f"warning: expected {name} {want}.x (the GPU image), found {found.get(name)}")
EOF
} > "$OUT_DIR/env.txt"
tee -a "$LOG" < "$OUT_DIR/env.txt"
rm -f "$OUT_DIR/env.txt"  # in the log: at most 8 files come back from $OUT
log "triton cache (fresh, shared by the stages): $TRITON_CACHE_DIR"

if ! "$PY" -c "import inrfmt.reader, inrfmt.decode" >>"$LOG" 2>&1; then
    log "inrfmt does not import with $PY (see above). zstandard is not in the GPU image: carry its wheel in"
    log ".whl/ (pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64"
    log " -d .whl zstandard) and name .whl in the device call's carry."
    exit 2
fi

# run NAME SECONDS CMD...: one stage, its output appended to the log, never aborting the others.
run() {
    local name=$1 limit=$2; shift 2
    log "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    local start=$SECONDS before
    before=$(compiled_kernels)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    log "== $name: exit $rc after $((SECONDS - start)) s, $(( $(compiled_kernels) - before )) kernel compiles" \
        "($(compiled_kernels) in all)"
    [ "$rc" -ne 0 ] && status=1
    return 0
}

for stage in $STAGES; do
    case "$stage" in
    pytest)
        # Every test marked `gpu` (the kernel against torch on poisoned banks, NaN parity, graph capture,
        # int64 offsets, bank upload, decode memory, loader memory over epochs, ...), in parallel workers
        # when pytest-xdist is installed (the GPU image has it).
        parallel=()
        if "$PY" -c "import xdist" >/dev/null 2>&1; then parallel=(-n auto); fi
        run pytest_gpu 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rs "${parallel[@]}" \
            --junit-incremental="$OUT_DIR/pytest_gpu.xml" tests
        ;;
    decode)
        if [ "$QUICK" = 1 ]; then  # on a CPU, --quick runs the triton backend in triton's interpreter
            run bench_decode 120 "$PY" tools/bench_decode.py --quick --out "$OUT_DIR/bench_decode.json"
        else
            run bench_decode 120 "$PY" tools/bench_decode.py --seconds 0.3 --load-images 10000 \
                --out "$OUT_DIR/bench_decode.json"
        fi
        ;;
    encode)
        if [ -f tools/bench_encode.py ]; then
            if [ "$QUICK" = 1 ]; then
                run bench_encode 60 bash -c "\"$PY\" tools/bench_encode.py --config 3x15@8:4:3 > \"$OUT_DIR/bench_encode.jsonl\""
            else
                run bench_encode 60 bash -c "\"$PY\" tools/bench_encode.py --device cuda --gpu > \"$OUT_DIR/bench_encode.jsonl\""
            fi
        else
            log "== bench_encode: tools/bench_encode.py not present, skipped"
        fi
        ;;
    train)
        # The pipelines the training-speed targets compare (gpu-raw, inr, torch with 1 worker) at 32^2 and
        # 224^2, same model/precision/augmentation; `tools/bench_all.py --gpu --only train` runs all six.
        # Back on the dev machine:
        #   python tools/bench_all.py --render <fetched>/bench_all/bench_all.json --results bench_results/gpu
        run bench_all_train 170 "$PY" tools/bench_all.py --gpu --only train --pipelines gpu-raw,inr,torch:1 \
            --results "$OUT_DIR/bench_all" --no-md --timeout 40
        ;;
    *)
        log "unknown stage $stage"; status=1 ;;
    esac
done
log "gpu_check finished with status $status; outputs in $OUT_DIR"
exit $status
