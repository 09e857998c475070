#!/usr/bin/env bash
# Wheels the lent GPU machine's image lacks (its Python is 3.12; it has torch, transformers, httpx,
# prometheus-client, pillow, matplotlib, but not the service's web stack or pycocotools), downloaded here
# into .whl/ for `device.run` to carry. Versions are constraints.txt's.
# Usage: benchmarks/gpu_wheels.sh   (then carry .whl and start the device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# before benchmarks/run_gpu.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
rm -rf .whl  # two versions of one package stop the device's install
wheels=(annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4 annotated-doc==0.0.7
    typing-extensions==4.16.0)
# fastapi imports opentelemetry-api (which needs only typing-extensions), and the image has neither
for name in fastapi opentelemetry-api starlette uvicorn python-multipart pydantic pydantic-core pydantic-settings orjson \
    pycocotools; do
    pinned=$(grep -i "^$name==" constraints.txt) || { echo "gpu_wheels.sh: $name is not pinned in constraints.txt" >&2; exit 1; }
    wheels+=("$pinned")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
du -sh .whl
