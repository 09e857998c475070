#!/usr/bin/env bash
# The GPU benchmark for benchmarks/results/gpu/, as one command for a machine with a CUDA GPU: the R50 with
# ADE20K's 150 classes at 512x512 (random weights; nothing can be downloaded here), on the torch backend.
#   model level: fp32 eager, fp16, fp16 + CUDA graphs, bf16 (and tensorrt:fp16 where TensorRT is installed)
#     at batch 1, 8 and 32: img/s, latency, peak GPU memory, semantic agreement with fp32;
#   server level: the fp16 + CUDA graphs server and the fp32 one (both at most 32 images a batch) at
#     concurrency 1, 4, 16 and 64, each also divided by its own backend's img/s at batch 32.
# Targets it reports on: fp16 batched >= 3x fp32 eager at batch 1; the server at concurrency 64 >= 85 % of
# its raw backend; p99 and GPU memory (the paper: 24.5 fps on a V100 at batch 1).
# Usage: benchmarks/run_gpu.sh OUT_DIR [PYTHON]   (needs the service's packages: benchmarks/gpu_wheels.sh;
# at most 4 levels x 2 servers x 20 s of load, plus the model level and start-ups (never timed on a GPU); the
# model level is written to OUT_DIR before the server level starts, so a run cut short still leaves it)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/run_gpu.sh OUT_DIR [PYTHON]}
py=${2:-python3}
if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "run_gpu.sh: no CUDA GPU visible to $py" >&2
    exit 2
fi
# The server's GET /v1/model reports the package's version, which needs it installed (not only importable).
if ! "$py" -c "from importlib.metadata import version; version('maskformer-serving')" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

variants=torch,torch:fp16,torch:fp16+graphs,torch:bf16
if "$py" -c "import tensorrt" 2>/dev/null; then
    variants+=,tensorrt:fp16
fi
"$py" benchmarks/hf_r50.py --out "$work/r50-hf"
"$py" -m service.cli convert --from hf "$work/r50-hf" --out "$work/r50.safetensors" --name r50-random-ade
"$py" -m service.cli bench --weights "$work/r50.safetensors" --cache-dir "$work/cache" --out "$out" \
    --variants "$variants" --batch-sizes 1,8,32 --iters 20 --warmup 3 \
    --task semantic --image-size 512 --concurrency 1,4,16,64 --requests 512 --seconds 20 \
    --serve-args "--backend torch --precision fp16 --cuda-graphs --max-batch-size 32" \
    --serve-args "--backend torch --precision fp32 --max-batch-size 32"
