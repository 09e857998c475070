#!/usr/bin/env bash
# Everything a lent GPU machine should run, as one call sized for the device tool's 10-minute command limit:
# the CUDA tests (tests/test_cuda.py and the CUDA cases of tests/test_backends.py), then benchmarks/run_gpu.sh.
# Each step has its own time limit and log under OUT_DIR (8 files in all, what the tool brings back):
#   gpu.txt (nvidia-smi), cuda-tests.log, run_gpu.log, gpu/bench.{json,md,png}, gpu/server-{0,1}.log
# Usage, with .whl carried (benchmarks/gpu_wheels.sh makes it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/device_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:?usage: benchmarks/device_check.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" 2>&1
# The service's GET /v1/model reports the package's version, which needs it installed (not only importable).
if ! "$py" -c "from importlib.metadata import version; version('maskformer-serving')" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
timeout 180 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_backends.py 2>&1 |
    tee "$out/cuda-tests.log"
tests=${PIPESTATUS[0]}
timeout 390 bash benchmarks/run_gpu.sh "$out/gpu" "$py" 2>&1 | tee "$out/run_gpu.log"
bench=${PIPESTATUS[0]}
echo "device_check.sh: tests exited $tests, run_gpu.sh exited $bench (124: over its time limit)"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
