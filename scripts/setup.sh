#!/usr/bin/env bash
# Idempotent set-up: .venv with this package (editable) and its test dependencies at the tested versions.
# Re-running is cheap: it reinstalls only when pyproject.toml or constraints.txt changed.
# --tests: also Debian's chromium for the demo page's browser test (as root with apt-get; else that test skips).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=false
case "${1:-}" in
    "") ;;
    --tests) tests=true ;;
    *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
esac
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
if $tests && ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get -o DPkg::Lock::Timeout=300 update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
          chromium >/dev/null; } || echo "setup: chromium did not install; the browser test will skip" >&2
fi
