"""What this machine can run, and which inference backend `serve` picks from that."""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass, field


@dataclass
class Capabilities:
    python: str
    torch: str | None
    cuda: bool
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

        caps.cuda = torch.cuda.is_available()
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


def choose_backend(caps: Capabilities) -> tuple[str, str]:
    """(backend, reason): TensorRT on a GPU when present, else ONNX Runtime, else torch."""
    if caps.tensorrt and caps.cuda:
        return "tensorrt", f"TensorRT {caps.tensorrt} and a CUDA GPU are present"
    if caps.onnxruntime:
        gpu = "CUDAExecutionProvider" in caps.ort_providers
        return "onnxruntime", f"ONNX Runtime {caps.onnxruntime} ({'CUDA' if gpu else 'CPU'} provider)"
    if caps.torch:
        return "torch", f"torch {caps.torch} on {'CUDA' if caps.cuda else 'CPU'} (no TensorRT or ONNX Runtime)"
    return "none", "torch is not installed"
