#!/usr/bin/env bash
# The GPU check of the throughput issue, for a CUDA machine, in at most ~8 minutes:
#   1. the card (nvidia-smi) and the `gpu` extra (FAISS-GPU) installed into the project's venv;
#   2. `pytest -m gpu` over the test files that hold GPU tests (FAISS GPU vs CPU search, the blocked exact
#      search, uint8 normalisation and metric accumulation on cuda, every built-in method's scores on cuda
#      vs CPU, evaluate and scan with GPU actors vs CPU);
#   3. the pipeline benchmark on cuda: bare forward vs in-memory method.score vs one actor's work in
#      process vs `evaluate` with one and with two actors per GPU, each running two shard calls at once,
#      shards of 512, batch 32, 8,192 images (PIPELINE_IMAGES; PIPELINE_ARGS replaces the shard, calls,
#      actors and profile arguments) (the target: evaluate keeps >= 85% of the bare GPU forward). At 4,096
#      images two actors' steady state spans a few shards: it read 530 images/s there, 2,293 at 8,192 with
#      the same scoring code on another H100 (RESULTS.md, fourteenth pass); each run prints its shard timeline;
#   4. the matching benchmark's exact table with the blocked torch search on cuda and FAISS-GPU flat;
#   5. in-memory method.score on cuda for the baseline, Res2CLIP and ResAD++ at k = 1 and 4, batch 32.
# AB_TREE (a directory holding another tree of the repository, e.g. an earlier commit's `git archive`)
# runs steps 3 and 5 from that tree first (step 3 with AB_PIPELINE_ARGS, default PIPELINE_ARGS): an A/B on
# one machine. A tree before dd7dc16 gives every actor a whole GPU: give it AB_PIPELINE_ARGS with
# `--actors 1`. Copy this tree's benchmarks/pipeline.py into an older one so that both time the same
# variants (before 6b9a364 step 5 also timed a CPU-FAISS variant on cuda, for minutes).
# PIPELINE_LIMIT: the pipeline step's time limit in seconds (default 240).
# Each step has its own time limit; a failing step is reported and the next one still runs. Output:
# one log per step and `summary.txt` under $OUT (default ./gpu_check_out), the summary also printed.
#
#     bash benchmarks/gpu_check.sh            # from the repository root, after `make venv`
#
# The machine needs the wheels of the `gpu` extra (faiss-gpu-cu12) from a package index or a local
# wheel directory (PIP_FIND_LINKS); without them the install step fails and says so, and the FAISS-GPU
# parts are skipped by their own checks.
#
# On a machine without the project's venv and without a package index (a lent GPU machine whose image
# has PyTorch), set PY to that Python and SITE_ARCHIVE to a tar.xz of the other dependencies built for
# it (`benchmarks/gpu_site_archive.sh`): they are unpacked to /tmp/gpu-check-site and put on PYTHONPATH
# with the repository (no install). STEPS and METHODS rerun a subset. Results: benchmarks/RESULTS.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
SITE=/tmp/gpu-check-site
SUMMARY="$OUT/summary.txt"
STEPS=${STEPS:-"pytest_gpu pipeline matching method_only"}  # a subset reruns only those steps
METHODS=${METHODS:-"baseline res2clip resadpp"}  # the method_only step's methods
# METHOD_ARGS: more method_only arguments (e.g. --op-profile: the busiest CUDA operators of one batch)
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
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

# COMMIT: the commit sent, where the machine's copy of .git is not the tree's (a lent machine's may be stale)
say "gpu_check $(date -u +%FT%TZ) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}"
say "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
if ! command -v nvidia-smi > /dev/null; then
    say "no nvidia-smi: not a CUDA machine"
    exit 1
fi
say "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"

if [ -n "${SITE_ARCHIVE:-}" ]; then
    mkdir -p "$SITE"
    step unpack_site 120 tar -C "$SITE" -xJf "$SITE_ARCHIVE"
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    say "python: $("$PY" --version 2>&1), torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)"
    say "== install: skipped (no venv, dependencies from SITE_ARCHIVE; the gpu extra is not in it)"
else
    step install 150 "$PY" -m pip install -q -e '.[gpu]'
fi
step cuda_visible 60 "$PY" -c "import torch, faiss, numpy, pyarrow, ray, timm; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); \
print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 'no GPU build'); \
print('numpy', numpy.__version__, 'pyarrow', pyarrow.__version__, 'ray', ray.__version__, 'timm', timm.__version__)"
cat "$OUT/cuda_visible.log" | tee -a "$SUMMARY"

if wants pytest_gpu; then
    # the library's GPU tests first (seconds), the end-to-end evaluate on GPU actors last
    GPU_TESTS=$(grep -rlE "pytest.mark.gpu" tests --include='test_*.py' | sort -r)
    step pytest_gpu 200 "$PY" -m pytest -v -rsfE -m gpu $GPU_TESTS -p no:cacheprovider
    grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|error|skipped|deselected" "$OUT/pytest_gpu.log" | tail -n 12 | tee -a "$SUMMARY"
fi

PIPELINE_ARGS=${PIPELINE_ARGS:---shard-size 512 --gpu-calls 2 --actor-profile --actors 1 2}
pipeline_step() {  # pipeline_step NAME PREFIX ARGS LAUNCHER...: the pipeline benchmark on cuda, summarised
    local name=$1 prefix=$2 args=$3
    shift 3
    # shellcheck disable=SC2086
    step "$name" "${PIPELINE_LIMIT:-240}" "$@" benchmarks/pipeline.py --device cuda \
        --images "${PIPELINE_IMAGES:-8192}" --batch-size 32 --image-size 224 --actors 1 $args
    grep -E "bare|method.score|one actor|evaluate pipeline" "$OUT/$name.log" | sed "s|^|$prefix|" \
        | tee -a "$SUMMARY"
}

# an A/B in one run: a step first from another tree (e.g. `git archive` of an earlier commit, carried to
# the machine), run from that tree with only it on the path (Ray's workers too)
AB_LAUNCH=()
if [ -n "${AB_TREE:-}" ]; then
    py_a=$PY
    case "$PY" in */*) py_a="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
    AB_LAUNCH=(env -C "$AB_TREE" PYTHONPATH="${SITE_ARCHIVE:+$SITE:}$(cd "$AB_TREE" && pwd)" "$py_a")
fi

if wants pipeline; then
    if [ -n "${AB_TREE:-}" ]; then
        pipeline_step pipeline_a "A ($AB_TREE): " "${AB_PIPELINE_ARGS:-$PIPELINE_ARGS}" "${AB_LAUNCH[@]}"
    fi
    pipeline_step pipeline "" "$PIPELINE_ARGS" "$PY"
fi

if wants matching; then
    step matching 75 "$PY" benchmarks/matching.py --tables exact --exact-sizes 10000 100000 --dims 24 1024 \
        --ks 1 --repeats 2 --threads 0 --gpu
    grep -E "^\[d=" "$OUT/matching.log" | tee -a "$SUMMARY"
fi

method_step() {  # method_step NAME PREFIX LAUNCHER...: in-memory method.score on cuda, summarised
    local name=$1 prefix=$2
    shift 2
    # shellcheck disable=SC2086
    step "$name" 75 "$@" benchmarks/pipeline.py --device cuda --method-only --batch-size 32 --shots 1 4 \
        --methods $METHODS ${METHOD_ARGS:-}
    grep -E "^\[[a-z0-9]+ k=|^\| (bare|baseline|res2clip|resadpp)" "$OUT/$name.log" | sed "s|^|$prefix|" \
        | tee -a "$SUMMARY"
}

if wants method_only; then
    if [ -n "${AB_TREE:-}" ]; then
        method_step method_only_a "A ($AB_TREE): " "${AB_LAUNCH[@]}"
    fi
    method_step method_only "" "$PY"
fi

say "done: $(date -u +%FT%TZ)"
