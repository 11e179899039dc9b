#!/usr/bin/env bash
# The ONE script to run every GPU test and benchmark of inrfmt on a CUDA machine, in a single call.
#
#   tools/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
#
# Writes under $OUT (the device tool's folder) or ./gpu_out:
#   gpu_check.log        everything, stage by stage, with exit codes and times
#   env.txt              nvidia-smi, python/torch/triton versions
#   pytest_gpu.xml       junit report of `pytest -m gpu` (the CUDA tests of every test file)
#   bench_decode.json    tools/bench_decode.py: img/s per net/size/backend/config, error vs torch, load GB/s
#   bench_encode.jsonl   tools/bench_encode.py --gpu (when the script exists)
#   bench_all/           tools/bench_all.py --gpu --only train: train.jsonl, train.png, bench_all.json
# Stages: GPU_CHECK_STAGES="pytest decode encode train" (default all); each stage has its own timeout (150 +
# 130 + 70 + 190 = 540 s at most, plus up to 10 s each to kill a stage) so the whole run fits one 10-minute
# device call (timeout_s=600); the benchmarks write their JSON as they go, so a stage stopped at its limit
# keeps what it measured. Python: $PYTHON or python3. Wheels of missing packages (e.g.
# zstandard, which the reader needs) may be carried in .whl/ and are installed into /tmp/site first.
# GPU_CHECK_QUICK=1: tiny sizes for the decode and encode stages (a smoke run of this script; on a machine
# without CUDA it runs them on the CPU - tests/test_tools.py does that with the pytest and decode stages).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
STAGES="${GPU_CHECK_STAGES:-pytest decode encode train}"
QUICK="${GPU_CHECK_QUICK:-0}"
LOG="$OUT_DIR/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
status=0

log() { echo "$*" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
for mod in ("zstandard", "numpy", "click", "PIL", "torchvision"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except ImportError as e:
        print(mod, "MISSING:", e)
EOF
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt" | tee -a "$LOG"

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
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    log "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -ne 0 ] && status=1
    return 0
}

for stage in $STAGES; do
    case "$stage" in
    pytest)
        # Every test marked `gpu` (CUDA kernel vs torch incl. sin.approx, the width-64 padding case, int64
        # offsets, bank upload, decode memory, loader memory over epochs, ...).
        run pytest_gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" -rs \
            --junitxml="$OUT_DIR/pytest_gpu.xml" tests
        ;;
    decode)
        if [ "$QUICK" = 1 ]; then
            run bench_decode 130 "$PY" tools/bench_decode.py --quick --out "$OUT_DIR/bench_decode.json"
        else
            run bench_decode 130 "$PY" tools/bench_decode.py --seconds 0.3 --load-images 10000 \
                --out "$OUT_DIR/bench_decode.json"
        fi
        ;;
    encode)
        if [ -f tools/bench_encode.py ]; then
            if [ "$QUICK" = 1 ]; then
                run bench_encode 70 bash -c "\"$PY\" tools/bench_encode.py --config 3x15@8:4:3 > \"$OUT_DIR/bench_encode.jsonl\""
            else
                run bench_encode 70 bash -c "\"$PY\" tools/bench_encode.py --device cuda --gpu > \"$OUT_DIR/bench_encode.jsonl\""
            fi
        else
            log "== bench_encode: tools/bench_encode.py not present, skipped"
        fi
        ;;
    train)
        # Every pipeline (inr, gpu-raw, torch with 1 and 8 workers, nvjpeg, dali where installed) at 32^2 and
        # 224^2, same model/precision/augmentation: the ratio targets of issue 5. Back on the dev machine:
        #   python tools/bench_all.py --render <fetched>/bench_all/bench_all.json --results bench_results/gpu
        run bench_all_train 190 "$PY" tools/bench_all.py --gpu --only train --results "$OUT_DIR/bench_all" \
            --no-md --timeout 45
        ;;
    *)
        log "unknown stage $stage"; status=1 ;;
    esac
done
log "gpu_check finished with status $status; outputs in $OUT_DIR"
exit $status
