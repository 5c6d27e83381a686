#!/usr/bin/env bash
# The GPU check of the throughput issue, for a CUDA machine, in at most ~8 minutes:
#   1. the card (nvidia-smi) and the `gpu` extra (FAISS-GPU) installed into the project's venv;
#   2. `pytest -m gpu tests/infra` (FAISS GPU vs CPU search, evaluate with GPU actors vs CPU);
#   3. the pipeline benchmark on cuda: bare forward vs in-memory method.score vs `evaluate` with one actor
#      per GPU, batch 32 (the target: evaluate keeps >= 85% of the bare GPU forward);
#   4. the matching benchmark's exact table with FAISS-GPU flat and the blocked torch search on cuda.
# Each step has its own time limit; a failing step is reported and the next one still runs. Output:
# one log per step and `summary.txt` under $OUT (default ./gpu_check_out), the summary also printed.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, after `make venv`
#
# The machine needs the wheels of the `gpu` extra (faiss-gpu-cu12) from a package index or a local
# wheel directory (PIP_FIND_LINKS); without network the install step says so and the FAISS-GPU parts
# are skipped by their own checks.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, one summary line
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local status="ok"
    [ "$rc" -eq 124 ] && status="TIMED OUT after ${limit}s"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAILED (exit $rc)"
    say "== $name: $status, $(( $(date +%s) - start )) s (log: $OUT/$name.log)"
}

say "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if ! command -v nvidia-smi > /dev/null; then
    say "no nvidia-smi: not a CUDA machine"
    exit 1
fi
say "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"

step install 150 "$PY" -m pip install -q -e '.[gpu]'
step cuda_visible 60 "$PY" -c "import torch, faiss; print('torch cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); \
print('faiss gpus', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 'no GPU build')"
cat "$OUT/cuda_visible.log" | tee -a "$SUMMARY"

step pytest_gpu 180 "$PY" -m pytest -q -m gpu tests/infra -p no:cacheprovider
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$SUMMARY"

step pipeline 150 "$PY" benchmarks/pipeline.py --device cuda --images 512 --batch-size 32 \
    --image-size 224 --shard-size 128 --actors 1
grep -E "bare|method.score|evaluate pipeline" "$OUT/pipeline.log" | tee -a "$SUMMARY"

step matching 90 "$PY" benchmarks/matching.py --tables exact --exact-sizes 10000 100000 --dims 24 1024 \
    --ks 1 --repeats 2 --threads 0 --gpu
grep -E "^\[d=" "$OUT/matching.log" | tee -a "$SUMMARY"

say "done: $(date -u +%FT%TZ)"
