"""Shared machinery for checkpoint converters: regex key renaming, fused-attention split/merge, strict assembly."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.checkpoint import load_state
from model.maskformer import MaskFormer

Rules = list[tuple[str, str]]  # (full-match regex, replacement template)


class ConversionError(ValueError):
    """The source checkpoint does not fit the architecture it was declared to have."""


@contextmanager
def unreadable_as(path: str | Path, what: str) -> Iterator[None]:
    """A loader's failure as a ConversionError naming the file. Unpicklers fail on junk with whatever they trip
    over (UnpicklingError, EOFError, KeyError, IndexError, RuntimeError, ...); OSError passes, naming the path."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        detail = (str(err).splitlines() or [""])[0]
        raise ConversionError(f"{path}: not a readable {what} ({type(err).__name__}: {detail})") from err


def read_torch_file(path: str | Path) -> object:
    """A torch.save file through the weights-only loader: tensors and plain containers, never arbitrary objects."""
    with unreadable_as(path, "torch file"):
        return torch.load(path, map_location="cpu", weights_only=True)


def tensors_only(data: object, path: str | Path) -> dict[str, torch.Tensor]:
    """`data` where it maps names to tensors, as a state dict does; an error naming the file otherwise."""
    if not isinstance(data, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        raise ConversionError(f"{path}: not a state dict (names to tensors)")
    return data


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    with unreadable_as(path, "safetensors file"):
        return load_file(str(path))


def read_json(path: Path) -> dict:
    with unreadable_as(path, "JSON file"):
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return data


def rename(state: dict[str, torch.Tensor], rules: Rules, ignore: Iterable[str]) -> dict[str, torch.Tensor]:
    """Rename every key with the first rule that matches it in full; keys matching `ignore` are dropped.

    A key no rule or ignore pattern matches is an error: silently dropping weights is how converters
    produce models that load and then predict garbage.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    skip = [re.compile(p) for p in ignore]
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state.items():
        if any(s.fullmatch(key) for s in skip):
            continue
        for pattern, repl in compiled:
            m = pattern.fullmatch(key)
            if m:
                new = m.expand(repl)
                new = re.sub(r"\{(\d+)([+-]\d+|\*2\+\d+)\}", lambda g: str(_arith(int(g[1]), g[2])), new)
                if new in out:
                    raise ConversionError(f"two source keys map to {new}")
                out[new] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
        raise ConversionError(f"{len(unmatched)} source keys have no mapping: {shown}")
    return out


def _arith(value: int, op: str) -> int:
    """Index arithmetic in replacement templates: {3+1} -> 4, {2-1} -> 1, {1*2+1} -> 3."""
    if op.startswith("*2+"):
        return value * 2 + int(op[3:])
    return value + int(op)


def split_fused_qkv(state: dict[str, torch.Tensor], fused: str = ".in_proj") -> dict[str, torch.Tensor]:
    """`x.in_proj.weight` [3C, C] (torch.nn.MultiheadAttention layout) -> `x.q_proj/k_proj/v_proj.weight`."""
    out = {}
    for key, value in state.items():
        if fused + "." in key:
            prefix, suffix = key.split(fused + ".")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{suffix}"] = part.clone()
        else:
            out[key] = value
    return out


def merge_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`x.qkv.weight.{q,k,v}` parts -> one `x.qkv.weight` [3C, C] (torchvision Swin layout)."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*\.qkv\.(?:weight|bias))\.([qkv])", key)
        if m:
            parts.setdefault(m[1], {})[m[2]] = value
        else:
            out[key] = value
    for key, p in parts.items():
        if set(p) != {"q", "k", "v"}:
            raise ConversionError(f"{key}: missing one of query/key/value")
        out[key] = torch.cat([p["q"], p["k"], p["v"]], dim=0)
    return out


def assemble(model: MaskFormer, state: dict[str, torch.Tensor], source: str) -> MaskFormer:
    try:
        load_state(model, state, source)
    except ValueError as err:
        raise ConversionError(str(err)) from err
    return model.eval()
