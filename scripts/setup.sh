#!/usr/bin/env bash
# Idempotent set-up: .venv with this package (editable) and its test dependencies at the tested versions.
# Re-running is cheap: it reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
    # TensorRT's type stubs for mypy; --no-deps because they depend on TensorRT itself, which installs
    # only from NVIDIA's index (GPU nodes get it through the [gpu] extra)
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps tensorrt-stubs==10.13.0.35.1
    echo "$stamp" > .venv/.setup-stamp
fi
