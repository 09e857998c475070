"""Every `maskformer serve` setting, from flags or MASKFORMER_* environment variables (pydantic-settings).

A flag wins over the environment, which wins over the default. README.md lists these settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Task = Literal["semantic", "panoptic", "instance"]


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MASKFORMER_", extra="forbid")

    weights: Path | None = Field(None, description="checkpoint (.safetensors); default: the shipped model")
    backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = Field(
        "auto", description="auto: TensorRT on a GPU with TensorRT, else ONNX Runtime, else torch"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp16 on GPU backends; bf16 on torch, on CUDA or on a CPU with AMX or AVX512-BF16"
    )
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    cache_dir: Path = Field(
        Path.home() / ".cache" / "maskformer", description="where exported ONNX files and engines are cached"
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="largest batch one forward pass runs")
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="how long a partial batch waits for more requests before it runs"
    )
    max_queue_size: int = Field(64, ge=1, description="queued images beyond this are refused with 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered by then gets 504")
    drain_grace_s: float = Field(
        2.0, ge=0, description="after SIGTERM, keep serving this long with readiness 503 before intake stops"
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="larger bodies get 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images get 413, checked before decoding")
    max_batch_images: int = Field(32, ge=1, description="most images one /segment/batch request may carry")
    default_task: Task = "panoptic"
    threshold: float | None = Field(
        None, ge=0, le=1, description="default score threshold (panoptic 0.8, instance 0.0 when unset)"
    )
    overlap_threshold: float = Field(0.8, ge=0, le=1)
    api_key: SecretStr | None = Field(
        None,
        description="when set, all but /healthz, /readyz, /metrics and the demo page need `Authorization: Bearer KEY`",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for inference (default: the library's)")
    torch_compile: bool = Field(False, description="torch backend: torch.compile the model")
    cuda_graphs: bool = Field(False, description="torch backend on CUDA: replay one CUDA graph per batch size")
    fold_mask_conv: bool = Field(
        True, description="on a CPU: fold the mask head into the last conv where that saves FLOPs (the same masks)"
    )
    overlap_postprocessing: bool = Field(
        True, description="post-process a batch while the next one's forward pass runs, where the backend allows it"
    )
    gpu_preprocessing: bool = Field(
        True, description="on CUDA (torch, tensorrt): decode JPEGs with nvjpeg and letterbox them on the GPU"
    )
    warmup: bool = Field(True, description="run every batch size once before reporting ready")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value():  # an unset ${API_KEY} in Compose, say
            raise ValueError("is empty, which would turn authentication off; unset it to serve without a key")
        return key

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, level: object) -> object:
        return level.lower() if isinstance(level, str) else level


def serve_settings(argv: list[str], exit_on_error: bool = True) -> ServeSettings:
    """`maskformer serve`'s settings: its flags in `argv` over MASKFORMER_* variables over the defaults.

    The one parser for both `serve` and the container's start checks (service/container.py), so both see the
    same values. `exit_on_error=False` raises pydantic_settings.SettingsError on an unknown flag instead of
    printing the usage and exiting."""
    return ServeSettings(
        _cli_parse_args=argv,
        _cli_prog_name="maskformer serve",
        _cli_kebab_case=True,
        _cli_implicit_flags=True,
        _cli_exit_on_error=exit_on_error,
    )  # type: ignore[call-arg]
