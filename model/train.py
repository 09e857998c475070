"""Training: the official recipe (AdamW, backbone lr multiplier, poly schedule after an optional linear
warm-up, full-model gradient clipping), DDP through torchrun, mixed precision on GPU, exact resume,
periodic evaluation and a JSON-lines log.

Data order and augmentation are functions of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would, whatever the number of data-loader workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from model.checkpoint import save_model
from model.criterion import SetCriterion
from model.maskformer import MaskFormer
from model.train_log import RunLog, claim_folder
from model.train_state import load_state, save_state

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    out_dir: str
    steps: int = 160_000
    batch_size: int = 16  # global, split across processes
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1
    clip_grad_norm: float = 0.01
    ce_weight: float = 1.0  # classification loss weight (the official 1; focal 20 and dice 1 stay fixed)
    poly_power: float = 0.9
    warmup_steps: int = 0  # linear warm-up (the official Swin configs: 1500 steps from lr x 1e-6)
    warmup_factor: float = 1e-6
    amp: str = "auto"  # "auto" (bf16 on GPUs that have it, else fp16), "bf16", "fp16", "none"
    num_workers: int = 2
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    overwrite: bool = False  # a fresh run into a folder holding another run's log or state replaces them
    stop_at: int = 0  # end this run early at this step (saving the training state); 0 = run to `steps`
    checkpoint_every: int = 1000
    log_every: int = 20
    dist_timeout_min: float = 180.0  # DDP collectives and barriers; rank 0's evaluations must end within it
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the loop divides by these, or would end before its first step and still write a model
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be between 0 and steps ({self.steps}), got {self.stop_at}")


class StepSampler(Sampler):
    """Yields, for each step from `start_step`, this process's share of the global batch as
    (dataset index, augmentation seed) pairs. Epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int, steps: int, rank: int, world: int):
        if size < 1:
            raise ValueError("the training set is empty")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.size, self.batch, self.seed = size, batch_size, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch // self.world
        perms: dict[int, list[int]] = {}
        for step in range(self.start, self.steps):
            batch = []
            for j in range(self.rank * per_rank, (self.rank + 1) * per_rank):
                position = step * self.batch + j
                epoch, offset = divmod(position, self.size)
                if epoch not in perms:
                    g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                    perms = {epoch: torch.randperm(self.size, generator=g).tolist()}
                batch.append((perms[epoch][offset], (self.seed * 1_000_003 + position) % 2**63))
            yield batch


class SeededDataset(Dataset):
    """Applies the wrapped dataset's random augmentation under a per-sample seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def param_groups(model: MaskFormer, cfg: TrainConfig) -> list[dict]:
    """Backbone at lr x backbone_lr_mult; no weight decay on norms, embeddings and position-bias tables.
    Groups are named (head, head_no_decay, backbone, backbone_no_decay) so logs can find them."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.Embedding)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = id(p) not in no_decay and not name.endswith("relative_position_bias_table")
        groups.setdefault((name.startswith("backbone."), decay), []).append(p)
    return [
        {
            "params": params,
            "name": ("backbone" if backbone else "head") + ("" if decay else "_no_decay"),
            "lr": cfg.lr * (cfg.backbone_lr_mult if backbone else 1.0),
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (backbone, decay), params in sorted(groups.items())
    ]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """detectron2's WarmupPolyLR: the poly decay, times a linear ramp from warmup_factor to 1 over the
    first warmup_steps steps."""
    poly = max(0.0, 1 - step / cfg.steps) ** cfg.poly_power
    if step >= cfg.warmup_steps:
        return poly
    alpha = step / cfg.warmup_steps
    return poly * (cfg.warmup_factor * (1 - alpha) + alpha)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The lr of the head (`lr`) and of the backbone (`lr_backbone`) as they are now."""
    return {("lr_backbone" if g["name"].startswith("backbone") else "lr"): g["lr"] for g in optimizer.param_groups}


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def setup_distributed(timeout: timedelta) -> tuple[int, int, torch.device]:
    """rank, world size and device; initialises the process group when launched by torchrun. `timeout` bounds
    every collective, barriers included: the other ranks wait that long for rank 0's evaluation."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world, device


def barrier(world: int, device: torch.device) -> None:
    if world > 1:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def train(
    model: MaskFormer,
    train_set: Dataset,
    cfg: TrainConfig,
    collate_fn,
    evaluate=None,
    resume: str | Path | None = None,
) -> dict:
    """Train `model` in place; returns the last metrics. `evaluate(model) -> dict` runs on rank 0 (give it
    on every rank: the others wait for it at a barrier)."""
    from tqdm import tqdm

    rank, world, device = setup_distributed(timedelta(minutes=cfg.dist_timeout_min))
    if cfg.warmup_steps >= cfg.steps:
        log.warning("the %d warm-up steps outlast the run's %d: it never reaches --lr", cfg.warmup_steps, cfg.steps)
    out = Path(cfg.out_dir)
    if not resume:
        claim_folder(out, cfg.overwrite, delete=rank == 0)  # every rank refuses, so none waits for the others
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    criterion = SetCriterion(model.cfg.num_classes, ce_weight=cfg.ce_weight).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    step = 0
    state_path = out / "last.pt"
    end = cfg.stop_at or cfg.steps
    if resume:
        step = load_state(resume, parts)
        if step > end:  # nothing left to train: the run would write the state's weights as its model
            raise ValueError(f"{resume} is at step {step}, past the end of this run (step {end})")
        log.info("resumed from %s at step %d", resume, step)
    if world > 1 and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # trainable BN (from-scratch presets) sees the global batch
    net: nn.Module = DistributedDataParallel(model) if world > 1 else model

    sampler = StepSampler(len(train_set), cfg.batch_size, cfg.seed, step, end, rank, world)  # type: ignore[arg-type]
    loader = DataLoader(
        SeededDataset(train_set),
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the loader off the global RNG
    )
    run_log = RunLog(out, step if resume else None, enabled=rank == 0)
    last: dict = {}
    running: dict[str, float] = {}  # summed since the last log line, so logged losses are interval means
    progress = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="train", unit="step")
    started = time.time()
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs = net(images)
            losses = criterion(outputs, targets)  # the loss in float32
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lrs = group_lrs(optimizer)  # the step just taken's, before the scheduler moves them on
            scheduler.step()
            step += 1
            progress.update()
            if not math.isfinite(losses["loss"].item()):
                raise FloatingPointError(f"loss is {losses['loss'].item()} at step {step}")
            # final-layer terms and the total; the per-layer auxiliary terms stay out of the log
            for k, v in losses.items():
                if "_" not in k.removeprefix("loss_"):
                    running[k] = running.get(k, 0.0) + v.item()
            running["grad_norm"] = running.get("grad_norm", 0.0) + float(grad_norm)
            running["n"] = running.get("n", 0.0) + 1

            if rank == 0 and (step % cfg.log_every == 0 or step == end):
                n = running.pop("n")
                last = {k: round(v / n, 5) for k, v in running.items()}
                running.clear()
                last.update(step=step, **lrs, elapsed_s=round(time.time() - started, 1))
                progress.set_postfix(loss=last["loss"])
                run_log.write(last)
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == end):
                save_state(state_path, step, parts)
            if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                if rank == 0:
                    model.eval()
                    result = {"step": step, **evaluate(model)}
                    model.train()
                    run_log.write(result)
                    last.update(result)
                barrier(world, device)  # the other ranks wait here, not in the next step's all-reduce
    finally:
        progress.close()  # ends the bar's line, so an error below it is a line of its own
    if rank == 0:
        save_model(model.eval(), out / "model.safetensors")
    run_log.close()
    barrier(world, device)
    return last
