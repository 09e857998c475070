#!/usr/bin/env bash
# The image's install steps, in two phases so the Dockerfile can cache the heavy one:
#   docker/install.sh deps VENV [EXTRAS]   dependencies from pyproject.toml at constraints.txt's versions
#                                          (needs only those two files; a no-op when VENV already has them)
#   docker/install.sh app VENV             this package itself, without dependencies, then an import check
# VENV is created if missing. EXTRAS: comma-separated pyproject extras, e.g. "gpu" in the image.
set -euo pipefail

usage() { echo "usage: $0 deps VENV [EXTRAS] | app VENV" >&2; exit 2; }
[ $# -ge 2 ] || usage
phase=$1 venv=$2 extras=${3:-}
src=$(cd "$(dirname "$0")/.." && pwd)
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)

if [ ! -x "$venv/bin/python" ]; then
    # --system-site-packages: the gpu extra's TensorRT is the NVIDIA base image's (checked in deps; never pip's)
    "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi

case $phase in
deps)
    reqs=$(mktemp)
    trap 'rm -f "$reqs"' EXIT
    "$venv/bin/python" - "$src/pyproject.toml" "$extras" >"$reqs" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = [e for e in sys.argv[2].split(",") if e]
unknown = set(extras) - set(project.get("optional-dependencies", {}))
if unknown:
    sys.exit(f"unknown extra(s) {sorted(unknown)}; pyproject.toml has {sorted(project['optional-dependencies'])}")
reqs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
if "gpu" in extras:  # TensorRT comes from the base image (checked below), never from the package index
    reqs = [r for r in reqs if re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() != "tensorrt"]
print("\n".join(["setuptools>=69", *reqs]))  # setuptools builds the package in the app phase
PY
    if [[ ,$extras, == *,gpu,* ]]; then
        # The engines must be built by the base image's TensorRT (the venv sees its system site-packages);
        # constraints.txt pins no TensorRT, so pip would otherwise pull the newest one from PyPI.
        if ! "$venv/bin/python" -c 'import sys, tensorrt as t; sys.exit(not (hasattr(t, "Builder") and int(t.__version__.split(".")[0]) >= 10))' 2>/dev/null; then
            echo "$0: the gpu extra needs TensorRT >= 10 from the base image, importable in $venv (created with --system-site-packages); \`import tensorrt\` fails or finds only stubs. Build FROM an NGC TensorRT image." >&2
            exit 1
        fi
    fi
    "${pip[@]}" install -c "$src/constraints.txt" -r "$reqs"
    if [[ ,$extras, == *,gpu,* ]]; then
        # onnxruntime and onnxruntime-gpu share the `onnxruntime` module; keep only the GPU build's files
        ort_gpu=$("${pip[@]}" show onnxruntime-gpu | sed -n 's/^Version: //p')
        "${pip[@]}" uninstall -y onnxruntime
        "${pip[@]}" install --no-deps --force-reinstall "onnxruntime-gpu==$ort_gpu"
    fi
    ;;
app)
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    cp -r "$src/pyproject.toml" "$src/README.md" "$src/model" "$src/export" "$src/service" "$stage/"
    "${pip[@]}" install --no-deps --no-build-isolation "$stage"
    # from outside the source tree, so this checks the installed copy
    (cd / && "$venv/bin/python" -c 'import model, export, service.app, service.engine_cache')
    ;;
*) usage ;;
esac
