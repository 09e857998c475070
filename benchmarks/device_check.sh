#!/usr/bin/env bash
# Everything a lent GPU machine should run, as one call sized for the device tool's 10-minute command limit:
# the CUDA tests (tests/test_cuda.py and the CUDA cases of tests/test_backends.py; CI runs the rest), then
# benchmarks/run_gpu.sh. First it checks that everything the server imports is importable, and stops at once
# if not (a missing carried wheel would otherwise fail every test and both benchmark servers).
# Each step has its own time limit and log under OUT_DIR (9 files in all, what the tool brings back):
#   gpu.txt (nvidia-smi), imports.log, cuda-tests.log, run_gpu.log, gpu/bench.{json,md,png},
#   gpu/server-{0,1}.log
# Usage, with .whl carried (benchmarks/gpu_wheels.sh makes it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/device_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:?usage: benchmarks/device_check.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # a step cut by its time limit keeps the lines it printed
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
# The service's GET /v1/model reports the package's version, which needs it installed (not only importable).
if ! "$py" -c "from importlib.metadata import version; version('maskformer-serving')" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
imports="import fastapi, uvicorn, multipart, pydantic_settings, orjson, httpx, prometheus_client, pycocotools.mask
import onnxruntime, torchvision, safetensors, scipy, service.app, service.bench.load"
if ! "$py" -c "$imports" >"$out/imports.log" 2>&1; then
    cat "$out/imports.log"
    echo "device_check.sh: a module the server or the bench needs does not import (imports.log); nothing ran"
    exit 3
fi
# -o addopts=: in one process (pyproject.toml asks for pytest-xdist, which the GPU image lacks)
timeout 150 "$py" -m pytest -o addopts= -q -rs -p no:cacheprovider -k cuda tests/test_cuda.py tests/test_backends.py 2>&1 |
    tee "$out/cuda-tests.log"
tests=${PIPESTATUS[0]}
timeout 360 bash benchmarks/run_gpu.sh "$out/gpu" "$py" 2>&1 | tee "$out/run_gpu.log"
bench=${PIPESTATUS[0]}
echo "device_check.sh: tests exited $tests, run_gpu.sh exited $bench (124: over its time limit)"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
