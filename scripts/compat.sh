#!/usr/bin/env bash
# The test suite at the oldest versions tested of torch, torchvision, onnxruntime and transformers
# (pyproject.toml's lower bounds: those of the GPU image benchmarks/device_check.sh has been prepared for),
# everything else at constraints.txt's pins, in .venv-compat.
# Usage: scripts/compat.sh [PYTEST_ARGS...]   (about 3 minutes to install, then the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
image=(torch==2.11.0 torchvision==0.26.0 onnxruntime==1.30.0 transformers==5.17.0)
venv=.venv-compat
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# huggingface_hub follows transformers; the image's own pins replace ours
grep -v -i -E '^(torch|torchvision|onnxruntime|transformers|huggingface_hub)==' constraints.txt >"$constraints"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" -e '.[dev]' "${image[@]}"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps tensorrt-stubs==10.13.0.35.1
"$venv/bin/python" -c "import torch, torchvision; print('compat: torch', torch.__version__, 'torchvision', torchvision.__version__)"
# This venv replaces constraints.txt's pins on purpose: the test that they are installed is left out (and
# the image's install-script tests skip, saying so).
"$venv/bin/python" -m pytest \
    --deselect tests/test_serve_security.py::test_every_dependency_is_pinned_and_installed_at_its_pin "$@"
