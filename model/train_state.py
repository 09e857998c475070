"""The training state in RUN/last.pt: weights, optimizer, scheduler, step and RNG states, enough to resume
a run exactly where it stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": json.dumps(np.random.get_state(legacy=True)[1].tolist()),  # type: ignore[index]
        "python": json.dumps(random.getstate()[1]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", np.array(json.loads(state["numpy"]), dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(json.loads(state["python"])), None))


def save_state(path: Path, model: nn.Module, optimizer, scheduler, step: int) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "rng": rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: str | Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore a save_state() file into these objects; returns its step."""
    # weights_only: tensors and plain containers only, nothing executable
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])
