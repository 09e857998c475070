"""What this machine can run, and which inference backend `serve` picks from that."""

from __future__ import annotations

import functools
import importlib
import platform
import warnings
from dataclasses import dataclass, field

# The oldest NVIDIA driver each CUDA major version runs on (NVIDIA's minor version compatibility table):
# torch's wheels carry their own CUDA runtime, so this, not the machine's or the image's CUDA, decides.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


@dataclass
class Capabilities:
    python: str
    torch: str | None
    cuda: bool
    cuda_build: str | None = None  # the CUDA runtime torch was built with (torch.version.cuda)
    gpus: list[str] = field(default_factory=list)
    cpu_bf16: bool = False  # AMX or AVX512-BF16: `--backend torch --precision bf16` on the CPU
    torchvision: str | None = None
    onnxruntime: str | None = None
    ort_providers: list[str] = field(default_factory=list)
    tensorrt: str | None = None
    problems: list[str] = field(default_factory=list)


def _version(module: str, problems: list[str]) -> str | None:
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return None
    except Exception as err:  # a broken install (e.g. torchvision against the wrong torch) is worth reporting
        problems.append(f"import {module} failed: {err}")
        return None
    if getattr(imported, "__file__", None) is None:
        return None  # a namespace package, e.g. type stubs (tensorrt-stubs) without the library
    version = getattr(imported, "__version__", None)
    if version is None:
        problems.append(f"{module} has no __version__")
    return str(version) if version is not None else None


def probe() -> Capabilities:
    problems: list[str] = []
    caps = Capabilities(python=platform.python_version(), torch=_version("torch", problems), cuda=False)
    if caps.torch:
        import torch

        from model.inference import cpu_has_bf16

        caps.cuda_build = torch.version.cuda
        caps.cuda, cuda_problem = cuda_available()
        if cuda_problem:  # a GPU node whose driver is too old, say: worth a non-zero `doctor`
            problems.append(f"CUDA: {cuda_problem} ({driver_requirement(caps.cuda_build)})")
        caps.cpu_bf16 = cpu_has_bf16()
        if caps.cuda:
            caps.gpus = [
                f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                for i in range(torch.cuda.device_count())
            ]
    caps.torchvision = _version("torchvision", problems)
    caps.onnxruntime = _version("onnxruntime", problems)
    if caps.onnxruntime:
        import onnxruntime

        caps.ort_providers = list(onnxruntime.get_available_providers())
    caps.tensorrt = _version("tensorrt", problems)
    caps.problems = problems
    return caps


@functools.cache  # torch warns only on its first look; later callers need the same reason
def cuda_available() -> tuple[bool, str | None]:
    """torch.cuda.is_available(), and the reason torch warned of when a GPU is there but unusable (a driver
    too old for torch's CUDA, say); a machine without any NVIDIA driver gives no reason."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    reasons = [str(w.message).strip() for w in caught]
    return available, " ".join(reasons) or None


def driver_requirement(cuda_build: str | None) -> str | None:
    """'torch's CUDA 13.0 needs an NVIDIA driver >= 580', or None for a CPU-only torch."""
    if not cuda_build:
        return None
    major = int(cuda_build.split(".")[0])
    need = MIN_DRIVER.get(major)
    return f"torch's CUDA {cuda_build} needs an NVIDIA driver >= {need}" if need else f"torch's CUDA {cuda_build}"


def choose_backend(caps: Capabilities, on_cpu: bool = False) -> tuple[str, str]:
    """(backend, reason): TensorRT on a GPU when present (unless told to run `on_cpu`), else ONNX Runtime,
    else torch."""
    if caps.tensorrt and caps.cuda and not on_cpu:
        return "tensorrt", f"TensorRT {caps.tensorrt} and a CUDA GPU are present"
    if caps.onnxruntime:
        gpu = "CUDAExecutionProvider" in caps.ort_providers
        return "onnxruntime", f"ONNX Runtime {caps.onnxruntime} ({'CUDA' if gpu else 'CPU'} provider)"
    if caps.torch:
        return "torch", f"torch {caps.torch} on {'CUDA' if caps.cuda else 'CPU'} (no TensorRT or ONNX Runtime)"
    return "none", "torch is not installed"
