#!/usr/bin/env bash
# Which fp32 backend the CPU default should be: the server level of ONNX Runtime (the default) against the
# torch backend on the random-init R50 of run_cpu.sh, concurrency 1 and 4, in two rounds (each round
# measures both servers back to back per level). Results in results/cpu-fp32-backends/round{1,2}/.
# Usage: benchmarks/run_cpu_fp32_backends.sh [OUT_DIR]   (about 8 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/cpu-fp32-backends}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=.venv/bin/python

$py benchmarks/hf_r50.py --out "$work/r50-hf"
.venv/bin/maskformer convert --from hf "$work/r50-hf" --out "$work/r50.safetensors" --name r50-random-ade
for round in 1 2; do
    .venv/bin/maskformer bench --weights "$work/r50.safetensors" --cache-dir "$work/cache" --out "$out/round$round" \
        --skip-model --task semantic --image-size 512 --concurrency 1,4 --requests 48 --seconds 60 \
        --serve-args "--request-timeout-s 300" --serve-args "--backend torch --request-timeout-s 300"
done
