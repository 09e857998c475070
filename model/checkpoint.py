"""Self-describing checkpoints: one .safetensors file with the weights and, in its metadata, everything
needed to rebuild and serve the model (architecture, class names, thing flags, mean/std, input size).

Loading never unpickles anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.atomic_write import replace_atomically
from model.config import MaskFormerConfig
from model.maskformer import MaskFormer, ModelInfo, build_model

FORMAT = "maskformer-serving"
FORMAT_VERSION = "1"

# Shipped checkpoints and registry.json; MASKFORMER_WEIGHTS_DIR points elsewhere (e.g. in a container).
WEIGHTS_DIR = Path(os.environ.get("MASKFORMER_WEIGHTS_DIR", Path(__file__).resolve().parents[1] / "weights"))

# Buffers every model recomputes from its config; checkpoints need not carry them.
DERIVED_BUFFERS = ("pixel_mean", "pixel_std", "relative_position_index")


class CheckpointError(ValueError):
    """The file is not a checkpoint this project can load."""


def save_model(model: MaskFormer, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write model weights and metadata. dtype=torch.float16 halves the file; loading casts back."""
    if model.info is None:
        raise ValueError("model.info (name, class names, thing flags) must be set before saving")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoints are .safetensors files, got {path.name}")
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = cast(key, value, dtype)
        tensors[key] = value.contiguous()
    info = model.info
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(model.cfg.to_dict()),
        "info": json.dumps(
            {
                "name": info.name,
                "version": info.version,
                "class_names": info.class_names,
                "isthing": info.isthing,
                "extra": info.extra,
            }
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(tensors, metadata, path)
    return path


def cast(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` in `dtype`, refused where a finite value does not fit (in float16, above 65504 becomes inf)."""
    out = value.to(dtype)
    finite = torch.isfinite(value)
    if (finite & ~torch.isfinite(out)).any():
        largest = value[finite].abs().max().item()
        raise ValueError(f"{key} holds values beyond {dtype}'s range (up to {largest:.6g}); store it in float32")
    return out


def write_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Never a half-written checkpoint under the real name, nor a stray temp file (model/atomic_write.py)."""
    try:
        replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except SafetensorError as err:
        raise OSError(f"cannot write {path}: {err}") from err


def read_metadata(path: str | Path) -> tuple[MaskFormerConfig, ModelInfo]:
    """Config and model info of a checkpoint, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path.name}: only .safetensors checkpoints are loaded (nothing is unpickled); "
            "convert other formats with `maskformer convert`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (missing metadata); use `maskformer convert`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    try:
        cfg = MaskFormerConfig.from_dict(json.loads(meta["config"]))
        info = ModelInfo(**json.loads(meta["info"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid checkpoint metadata ({err})") from err
    return cfg, info


def default_weights(weights_dir: Path | None = None) -> Path:
    """The shipped default checkpoint, as weights/registry.json names it, checked against the registry's
    `bytes` and `sha256` (each where given): a damaged file would load and predict NaNs."""
    weights_dir = weights_dir or WEIGHTS_DIR
    entry = default_entry(weights_dir / "registry.json")
    path = weights_dir / entry["file"]
    verify_file(path, entry.get("bytes"), entry.get("sha256"))
    return path


def default_entry(registry_file: Path) -> dict:
    """The registry's entry for its default model."""
    if not registry_file.is_file():
        raise FileNotFoundError(f"no {registry_file}: pass a checkpoint path, or set MASKFORMER_WEIGHTS_DIR")
    try:
        registry = json.loads(registry_file.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{registry_file}: not valid JSON ({err})") from err
    models = registry.get("models") if isinstance(registry, dict) else None
    if not isinstance(models, dict) or "default" not in registry:
        raise CheckpointError(f'{registry_file}: expected {{"default": NAME, "models": {{NAME: {{"file": ...}}}}}}')
    default = registry["default"]
    if not isinstance(default, str) or default not in models:
        raise CheckpointError(f"{registry_file}: default {default!r} is not one of its models ({', '.join(models)})")
    entry = models[default]
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise CheckpointError(f"{registry_file}: model {default!r} names no file")
    return entry


def verify_file(path: Path, size: int | None, sha256: str | None) -> None:
    """Size first (free), then sha256, against what the registry says."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path}, the registry's default checkpoint")
    st = path.stat()
    if size is not None and st.st_size != size:
        raise CheckpointError(f"{path}: {st.st_size} bytes, but the registry says {size} (a damaged or replaced file)")
    if sha256 is not None:
        actual = file_sha256(str(path), st.st_size, st.st_mtime_ns)
        if actual != str(sha256).lower():
            raise CheckpointError(
                f"{path}: sha256 {actual}, but the registry says {sha256} (a damaged or replaced file)"
            )


@functools.lru_cache(maxsize=16)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Streamed sha256; size and mtime_ns only key the cache, so a file is hashed once per process unless it
    changes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> MaskFormer:
    """Rebuild the model a checkpoint describes (default: the shipped one), load its weights and return
    it in eval mode.

    The model's `info` holds the class names and thing flags, `cfg` the architecture, mean/std and
    the intended input size.
    """
    path = default_weights() if path is None else path
    cfg, info = read_metadata(path)
    model = build_model(cfg, info)
    with safe_open(str(path), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    load_state(model, state, source=str(path))
    return model.to(device).eval()


def load_state(model: MaskFormer, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load: every model tensor must be present (derived buffers may be), with matching shapes."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(DERIVED_BUFFERS))
    wrong_shape = sorted(
        f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if unexpected or missing or wrong_shape:
        lines = [f"{source} does not match the model it describes:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise CheckpointError("\n".join(lines))
    cast = {k: v.to(expected[k].dtype) for k, v in state.items() if not k.endswith(DERIVED_BUFFERS)}
    model.load_state_dict(cast, strict=False)
