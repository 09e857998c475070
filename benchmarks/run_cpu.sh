#!/usr/bin/env bash
# The CPU comparison in benchmarks/results/cpu/: our server against the transformers baseline on the same
# random-init R50 weights (ADE20K's 150 classes, 512x512), then post-processing on the same logits and
# preprocessing of the same JPEGs, then the shipped model's variants with their semantic agreement with
# torch fp32.
# Usage: benchmarks/run_cpu.sh [OUT_DIR]   (20 to 30 minutes on 2 cores; run it on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/cpu}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=.venv/bin/python

# The baseline has no request timeout; ours would answer 504 after 30 s at concurrency 64 on a slow day.
timeout="--request-timeout-s 300"
# bf16 (torch on oneDNN) only where the CPU has AMX or AVX512-BF16; the default server is fp32 ONNX Runtime
variants=torch,onnxruntime
bf16_server=()
if $py -c "import sys; from model.inference import cpu_has_bf16; sys.exit(not cpu_has_bf16())"; then
    variants=torch,torch:bf16,onnxruntime
    bf16_server=(--serve-args "--backend torch --precision bf16 $timeout")
fi

# The A/B of the folded mask head (model/heads.py): ONNX Runtime without it, at model and server level
ab_variant=onnxruntime+unfolded
ab_server=(--serve-args "--no-fold-mask-conv $timeout")

# The A/B of overlapping post-processing with the next forward pass (service/batcher.py), on by default
overlap_server=(--serve-args "--no-overlap-postprocessing $timeout")

$py benchmarks/hf_r50.py --out "$work/r50-hf"
.venv/bin/maskformer convert --from hf "$work/r50-hf" --out "$work/r50.safetensors" --name r50-random-ade
.venv/bin/maskformer bench --weights "$work/r50.safetensors" --baseline "$work/r50-hf" \
    --cache-dir "$work/cache" --out "$out" \
    --variants "$variants,$ab_variant" --batch-sizes 1,2,4,8 --iters 5 --warmup 1 \
    --task semantic --image-size 512 --concurrency 1,4,16,64 --requests 64 --seconds 90 \
    --serve-args "$timeout" "${bf16_server[@]}" "${ab_server[@]}" "${overlap_server[@]}"
$py benchmarks/postprocess_vs_transformers.py --hf "$work/r50-hf" --out "$out" --images 6 --repeats 3
$py benchmarks/preprocess_vs_transformers.py --out "$out"
# The random R50 gives one class everywhere, so its fidelity column says little: the shipped (trained)
# model's model-level run says what bf16 and ONNX Runtime change in its semantic maps.
.venv/bin/maskformer bench --skip-server --cache-dir "$work/cache" --out "$out/shipped" \
    --variants "$variants" --batch-sizes 1,4 --iters 5 --warmup 1
