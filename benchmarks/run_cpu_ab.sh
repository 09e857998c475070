#!/usr/bin/env bash
# A server-level A/B on the random-init R50 of run_cpu.sh: the default `maskformer serve` (A) against it with
# SERVE_ARGS (B), semantic task, in two rounds; each round starts both servers and measures each concurrency
# level on both back to back. Results in OUT/round{1,2}/. The A/Bs behind two CPU defaults:
#   benchmarks/run_cpu_ab.sh benchmarks/results/cpu-fp32-backends "--backend torch" 1,4
#   benchmarks/run_cpu_ab.sh benchmarks/results/cpu-overlap "--no-overlap-postprocessing" 4,16
# Usage: benchmarks/run_cpu_ab.sh OUT SERVE_ARGS [CONCURRENCY]   (about 8 minutes on 2 cores for two levels)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: run_cpu_ab.sh OUT SERVE_ARGS [CONCURRENCY]}
serve_args=${2:?usage: run_cpu_ab.sh OUT SERVE_ARGS [CONCURRENCY]}
levels=${3:-1,4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=.venv/bin/python

$py benchmarks/hf_r50.py --out "$work/r50-hf"
.venv/bin/maskformer convert --from hf "$work/r50-hf" --out "$work/r50.safetensors" --name r50-random-ade
for round in 1 2; do
    .venv/bin/maskformer bench --weights "$work/r50.safetensors" --cache-dir "$work/cache" --out "$out/round$round" \
        --skip-model --task semantic --image-size 512 --concurrency "$levels" --requests 48 --seconds 60 \
        --serve-args "--request-timeout-s 300" --serve-args "$serve_args --request-timeout-s 300"
done
