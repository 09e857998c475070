"""A run's folder: RUN/metrics.jsonl (one JSON record per line, each with its step) and, when installed,
TensorBoard events under RUN/tensorboard. A resumed run's log goes on from the step it resumed at."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TextIO

from model.atomic_write import replace_atomically

log = logging.getLogger(__name__)

# what a run leaves besides its weights: a fresh run must not mix its log or state with another's
RUN_FILES = ("metrics.jsonl", "last.pt", "tensorboard")


def claim_folder(out: Path, overwrite: bool, delete: bool = True) -> None:
    """Refuse a fresh run's folder that holds another run (a last.pt, or a log with a record in it), or
    (overwrite) delete that run's log and state. What a run that failed before its first record left (an
    empty log, TensorBoard's folder) is deleted either way. `delete`: on one process only."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    another = (out / "last.pt").exists() or _step_of_first_record(out / "metrics.jsonl") is not None
    if another and not overwrite:
        resume = f"resume it with --resume {out / 'last.pt'}, or " if (out / "last.pt").exists() else ""
        raise FileExistsError(
            f"{out} holds another run ({', '.join(found)}): {resume}pass --overwrite to start afresh there "
            "(deleting them)"
        )
    for path in [out / name for name in found] if delete else []:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrite the log with the records of steps <= `step` only: a resumed run logs the later ones again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if (s := _step_of(line)) is not None and s <= step]
    # a crash now leaves the old log or the new one, never half of it
    replace_atomically(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def _step_of_first_record(path: Path) -> int | None:
    if not path.is_file():
        return None
    return next((s for line in path.read_text().splitlines() if (s := _step_of(line)) is not None), None)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line the crash cut short


class RunLog:
    """Writes records to metrics.jsonl and TensorBoard; `resumed_at` is the step of a resumed run.
    Disabled (enabled=False) on all DDP ranks but 0."""

    def __init__(self, out: Path, resumed_at: int | None, enabled: bool = True) -> None:
        self.file: TextIO | None = None
        self.writer = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        if resumed_at is not None:
            keep_steps_up_to(path, resumed_at)
        self.file = path.open("a")
        # purge_step: TensorBoard hides the events of the steps a crash made us repeat
        self.writer = _tensorboard(out, None if resumed_at is None else resumed_at + 1)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
        log.debug("%s", record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _tensorboard(out: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)
