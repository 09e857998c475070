"""The training state in RUN/last.pt: weights, optimizer, scheduler, GradScaler, step and RNG states,
enough to resume a run exactly where it stopped."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    # numpy's and Python's states whole (key, position and cached Gaussian), as lists and numbers, which
    # torch.load(weights_only=True) reads back (numpy arrays it would refuse)
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_state(path: Path, step: int, parts: dict) -> None:
    """`parts`: the objects with a state_dict() to keep (model, optimizer, scheduler, scaler)."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(step=step, rng=rng_state())
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: str | Path, parts: dict) -> int:
    """Restore a save_state() file into these objects; returns its step."""
    # weights_only: tensors and plain containers only, nothing executable
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, part in parts.items():
        # an fp16 run's GradScaler resumes at its scale; a state from a run without one (empty) starts afresh
        if name != "scaler" or state.get(name):
            part.load_state_dict(state[name])
    set_rng_state(state["rng"])
    return int(state["step"])
