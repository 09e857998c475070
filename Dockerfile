# syntax=docker/dockerfile:1
# MaskFormer serving image for NVIDIA GPU nodes (README.md, "Operations": build, run, variables, probes).
#
# Base: NVIDIA's TensorRT container 25.01 (TensorRT 10.8, CUDA 12.8, Ubuntu 24.04, Python 3.12). Engines are
# built and run with this image's TensorRT, so changing the tag rebuilds every cached engine once. Keep both
# stages on one tag. The host needs an NVIDIA driver >= 580: torch's wheel (constraints.txt) brings its own
# CUDA 13.0 runtime, which no older driver runs, and the base's CUDA 12.8 forward-compatibility libraries do
# not change that (service/runtime.py's MIN_DRIVER; `maskformer doctor` prints the requirement).

FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS build
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The dependencies (torch, TensorRT, ONNX Runtime GPU: gigabytes) first: this layer is rebuilt only when
# pyproject.toml, constraints.txt or the install script change, not on every code change.
COPY pyproject.toml constraints.txt ./
COPY docker/install.sh docker/install.sh
RUN docker/install.sh deps /opt/venv gpu
COPY README.md ./
COPY model model
COPY export export
COPY service service
RUN docker/install.sh app /opt/venv

FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS runtime
# /cache (ONNX files, engines, locks) and /models are volumes this user must write or read; a new named
# volume takes over the ownership set here.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin maskformer \
    && mkdir -p /cache /models \
    && chown maskformer:maskformer /cache /models
COPY --from=build /opt/venv /opt/venv
COPY weights/registry.json weights/shapes-r10.safetensors /opt/maskformer/weights/
COPY docker/entrypoint /usr/local/bin/maskformer-entrypoint
COPY docker/healthcheck /usr/local/bin/maskformer-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MASKFORMER_WEIGHTS_DIR=/opt/maskformer/weights \
    MASKFORMER_MODEL_DIR=/models \
    MASKFORMER_CACHE_DIR=/cache \
    MASKFORMER_HOST=0.0.0.0 \
    MASKFORMER_PORT=8000
USER 10001
WORKDIR /home/maskformer
EXPOSE 8000
VOLUME ["/cache"]
# Liveness only: /healthz answers while an engine builds; readiness (/readyz) is the orchestrator's probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 CMD ["/usr/local/bin/maskformer-healthcheck"]
# Exec form, behind the base image's own entrypoint: nvidia_entrypoint.sh runs /opt/nvidia/entrypoint.d (CUDA
# forward-compatibility set-up, driver checks) and then execs ours, which execs the server; the server is then
# PID 1 and gets SIGTERM to drain.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/usr/local/bin/maskformer-entrypoint"]
