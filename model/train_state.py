"""The training state in RUN/last.pt: weights, optimizer, scheduler, GradScaler, step and RNG states,
enough to resume a run exactly where it stopped."""

from __future__ import annotations

import json
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.atomic_write import replace_atomically

# 2: numpy's and Python's RNG states whole, the GradScaler's state, named optimizer param groups
STATE_VERSION = 2

log = logging.getLogger(__name__)


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
    state.update(step=step, rng=rng_state(), version=STATE_VERSION)
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def read_state(path: str | Path) -> dict:
    """A save_state() file, or a ValueError that says what the file is instead."""
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} holds model weights, not a training state: --resume takes RUN/last.pt")
    try:
        # weights_only: tensors and plain containers only, nothing executable
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a training state (RUN/last.pt): {err}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path} is not a training state (RUN/last.pt)")
    version = state.get("version", 1)
    if version == 1:
        return upgrade_v1(path, state)
    if version != STATE_VERSION:
        raise ValueError(f"{path} is a training state of version {version}; this version resumes 1 and {STATE_VERSION}")
    return state


def upgrade_v1(path: str | Path, state: dict) -> dict:
    """A version-1 state in version 2's layout. Version 1 kept numpy's and Python's Mersenne Twister keys
    only (as JSON) and no GradScaler: their positions restart, so np.random and random go on close to, not
    exactly as, an uninterrupted run (the data path draws from torch's generator, which was kept whole)."""
    log.warning("%s: a version-1 training state; numpy's and Python's RNGs resume approximately", path)
    rng = dict(state["rng"])
    rng["numpy"] = ["MT19937", json.loads(rng["numpy"]), 624, 0, 0.0]
    rng["python"] = [3, json.loads(rng["python"]), None]
    return {**state, "rng": rng, "version": STATE_VERSION}


def check_fits(path: str | Path, saved: dict, model: nn.Module) -> None:
    """The weights in `saved` have the names and shapes of `model`'s, else a ValueError naming them."""
    here = model.state_dict()
    problems = [f"{k} missing" for k in here if k not in saved]
    problems += [f"{k} not in this model" for k in saved if k not in here]
    problems += [
        f"{k} is {list(saved[k].shape)} there, {list(v.shape)} here"
        for k, v in here.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if problems:
        raise ValueError(
            f"{path} is the training state of another model (another preset or class list): "
            f"{len(problems)} weights differ, e.g. {'; '.join(problems[:3])}"
        )


def load_state(path: str | Path, parts: dict) -> int:
    """Restore a save_state() file into these objects; returns its step."""
    state = read_state(path)
    if "model" in parts:
        check_fits(path, state["model"], parts["model"])
    for name, part in parts.items():
        # an fp16 run's GradScaler resumes at its scale; a state from a run without one (empty) starts afresh
        if name != "scaler" or state.get(name):
            names = [g.get("name") for g in part.param_groups] if name == "optimizer" else []
            part.load_state_dict(state[name])
            for group, group_name in zip(getattr(part, "param_groups", []) if names else [], names):
                group.setdefault("name", group_name)  # version 1 saved its groups unnamed; the logs find them by name
    set_rng_state(state["rng"])
    return int(state["step"])
