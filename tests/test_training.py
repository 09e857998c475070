"""Training: overfitting a handful of images, exact resume, and DDP with two CPU processes."""

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import ModelInfo, build_model, load_model, save_model
from model.data.coco_panoptic import CocoPanoptic, collate
from model.data.shapes import CATEGORIES, write_split
from model.data.transforms import train_transforms
from model.evaluation import evaluate_panoptic_dataset
from model.train import StepSampler, TrainConfig, lr_factor, setup_distributed, train
from model.train_state import load_state, rng_state, save_state, set_rng_state
from service.cli import build_parser
from service.commands_train import recipe
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
NAMES = [c["name"] for c in CATEGORIES]
ISTHING = [bool(c["isthing"]) for c in CATEGORIES]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_split(root, "train", 8, 0)
    return root


def dataset(root, crop):
    return CocoPanoptic(
        root / "images" / "train",
        root / "panoptic_train.json",
        root / "panoptic_train",
        train_transforms((crop, crop), 1.0, 1.0, colour=False),
    )


def tiny_model(size, dropout=0.1, norm="frozen_bn"):
    return build_model(tiny_config(size, dropout, norm), ModelInfo("tiny", NAMES, ISTHING))


def straight_and_resumed(shapes, tmp_path, stop_at: int, edit_state=None, **common) -> tuple[dict, dict]:
    """The weights of a run straight through and of the same run stopped at `stop_at` and resumed from its
    last.pt (after `edit_state(path)`), in a fresh model: nothing but the saved state carries over."""
    data = dataset(shapes, 64)
    torch.manual_seed(0)
    straight = tiny_model(64)
    train(straight, data, TrainConfig(out_dir=str(tmp_path / "a"), **common), collate)
    torch.manual_seed(0)
    train(tiny_model(64), data, TrainConfig(out_dir=str(tmp_path / "b"), stop_at=stop_at, **common), collate)
    if edit_state:
        edit_state(tmp_path / "b" / "last.pt")
    torch.manual_seed(123)
    resumed = tiny_model(64)
    train(resumed, data, TrainConfig(out_dir=str(tmp_path / "b"), **common), collate, resume=tmp_path / "b" / "last.pt")
    return straight.state_dict(), resumed.state_dict()


def test_resume_equals_an_uninterrupted_run(shapes, tmp_path):
    # dropout stays on so the run depends on the restored RNG state
    common = dict(steps=6, batch_size=2, num_workers=0, lr=1e-3, backbone_lr_mult=1.0, checkpoint_every=100)
    a, b = straight_and_resumed(shapes, tmp_path, 3, **common)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert not torch.equal(a["class_embed.weight"], tiny_model(64).state_dict()["class_embed.weight"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_the_log_gives_the_head_and_backbone_lr_of_each_step_taken(shapes, tmp_path):
    common = dict(batch_size=2, num_workers=0, lr=1e-3, backbone_lr_mult=0.1, log_every=1)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=3, warmup_steps=2, **common)
    train(tiny_model(64), dataset(shapes, 64), cfg, collate)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # steps 0, 1, 2: (1 - step / 3) ** 0.9 times the warm-up ramp from 1e-6 over 2 steps
    factors = [1e-6, (1 - 1 / 3) ** 0.9 * (0.5e-6 + 0.5), (1 - 2 / 3) ** 0.9]
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * f for f in factors])
    assert [r["lr_backbone"] for r in log] == pytest.approx([1e-4 * f for f in factors])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps must be at least 1, got 0"),
        ("steps", -3, "steps must be at least 1, got -3"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("checkpoint_every", 0, "checkpoint_every must be at least 1"),
        ("log_every", 0, "log_every must be at least 1"),
        ("eval_every", -1, "eval_every must be 0 or more"),
        ("warmup_steps", -1, "warmup_steps must be 0 or more"),
        ("stop_at", 11, r"stop_at must be between 0 and steps \(10\), got 11"),
    ],
)
def test_a_config_the_loop_cannot_run_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out_dir="-", **{"steps": 10, field: value})


def test_an_empty_training_set_is_refused():
    with pytest.raises(ValueError, match="the training set is empty"):
        StepSampler(0, batch_size=2, seed=0, start_step=0, steps=5, rank=0, world=1)


def test_linear_warmup_then_poly_as_detectron2s_warmup_poly_lr():
    cfg = TrainConfig(out_dir="-", steps=10_000, warmup_steps=1500, warmup_factor=1e-6)
    poly = [(1 - s / 10_000) ** 0.9 for s in (0, 750, 1500, 5000)]
    ramp = [1e-6, 1e-6 * 0.5 + 0.5, 1.0, 1.0]
    assert [lr_factor(s, cfg) for s in (0, 750, 1500, 5000)] == pytest.approx([p * r for p, r in zip(poly, ramp)])
    assert lr_factor(750, TrainConfig(out_dir="-", steps=10_000)) == pytest.approx(poly[1])  # no warm-up


def test_swin_trains_with_the_official_swin_recipe():
    def parsed(*flags: str):
        return build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags])

    # MaskFormer's Swin configs: lr 6e-5, weight decay 0.01, backbone multiplier 1.0, 1500 warm-up steps
    assert recipe(parsed(), "swin") == dict(lr=6e-5, weight_decay=0.01, backbone_lr_mult=1.0, warmup_steps=1500)
    assert recipe(parsed(), "resnet") == dict(lr=1e-4, weight_decay=1e-4, backbone_lr_mult=0.1, warmup_steps=0)
    given = recipe(parsed("--backbone-lr-mult", "0.5", "--warmup-steps", "0", "--lr", "1e-3"), "swin")
    assert given == dict(lr=1e-3, weight_decay=0.01, backbone_lr_mult=0.5, warmup_steps=0)


def draws() -> tuple:
    return np.random.standard_normal(3).tolist(), np.random.randint(0, 1000, 5).tolist(), random.gauss(0, 1)


def test_numpy_and_python_rng_states_are_restored_exactly(tmp_path):
    np.random.seed(1)
    random.seed(1)
    draws()  # mid-stream: numpy's position is not 624, and numpy and Python each hold a cached Gaussian
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draws()
    np.random.seed(2)
    random.seed(2)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # as last.pt is read
    assert draws() == expected


def test_an_fp16_runs_grad_scaler_resumes_at_its_scale(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=1024.0)  # where a few overflows leave it
    save_state(tmp_path / "last.pt", 7, {"scaler": scaler})
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert load_state(tmp_path / "last.pt", {"scaler": resumed}) == 7
    assert resumed.get_scale() == 1024.0
    # a state from a run without fp16 (an empty scaler state) leaves a new fp16 run at the initial scale
    save_state(tmp_path / "bf16.pt", 7, {"scaler": torch.amp.GradScaler("cpu", enabled=False)})
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    load_state(tmp_path / "bf16.pt", {"scaler": fresh})
    assert fresh.get_scale() == 2.0**16


def test_resuming_from_what_is_not_this_models_training_state_says_why(tmp_path):
    model = tiny_model(64)
    save_model(model, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors holds model weights, not a training state"):
        load_state(tmp_path / "model.safetensors", {"model": model})
    (tmp_path / "notes.pt").write_text("not a pickle")
    with pytest.raises(ValueError, match="notes.pt is not a training state"):
        load_state(tmp_path / "notes.pt", {"model": model})
    other = build_model(replace(tiny_config(64), num_classes=3), ModelInfo("other", NAMES[:3], ISTHING[:3]))
    save_state(tmp_path / "last.pt", 3, {"model": other})
    with pytest.raises(ValueError, match=r"last.pt is the training state of another model .*class_embed.weight is"):
        load_state(tmp_path / "last.pt", {"model": model})
    future = torch.load(tmp_path / "last.pt", weights_only=True)
    future["version"] = 3
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt is a training state of version 3; this version resumes 1 and 2"):
        load_state(tmp_path / "future.pt", {"model": other})


def as_version_1(path: Path) -> None:
    """Rewrite a last.pt as the code before version 2 wrote it: no version, no GradScaler, unnamed optimizer
    groups, and numpy's and Python's Mersenne Twister keys alone, as JSON."""
    state = torch.load(path, weights_only=True)
    for key in ("version", "scaler"):
        del state[key]
    for group in state["optimizer"]["param_groups"]:
        del group["name"]
    rng = state["rng"]
    rng["numpy"], rng["python"] = json.dumps(rng["numpy"][1]), json.dumps(rng["python"][1])
    torch.save(state, path)


def test_a_version_1_state_resumes_as_the_uninterrupted_run(shapes, tmp_path):
    # the data path draws from torch's generator, which version 1 kept whole: the weights come out the same
    common = dict(steps=4, batch_size=2, num_workers=0, lr=1e-3, log_every=1, checkpoint_every=100)
    a, b = straight_and_resumed(shapes, tmp_path, 2, as_version_1, **common)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("lr_backbone" in r for r in log)  # groups named again


class FakeWriter:
    opened: list = []

    def __init__(self, logdir: str, purge_step: int | None = None) -> None:
        self.opened.append(purge_step)

    def add_scalar(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_run_resumed_after_a_crash_logs_each_step_once(shapes, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", type(sys)("tb"))
    monkeypatch.setattr(sys.modules["torch.utils.tensorboard"], "SummaryWriter", FakeWriter, raising=False)
    FakeWriter.opened = []
    data, run = dataset(shapes, 64), tmp_path / "run"
    common = dict(out_dir=str(run), steps=5, batch_size=2, num_workers=0, log_every=1, checkpoint_every=100)
    train(tiny_model(64), data, TrainConfig(stop_at=2, **common), collate)
    shutil.copy(run / "last.pt", tmp_path / "step2.pt")
    train(tiny_model(64), data, TrainConfig(stop_at=4, **common), collate, resume=run / "last.pt")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"loss": 1.0, "st')  # the crash cut the last line short
    # the run crashed after step 4; its last checkpoint was step 2's
    train(tiny_model(64), data, TrainConfig(**common), collate, resume=tmp_path / "step2.pt")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert FakeWriter.opened == [None, 3, 3]  # TensorBoard hides the events past the resumed step
    with pytest.raises(ValueError, match="last.pt is at step 5, past the end of this run \\(step 4\\)"):
        train(tiny_model(64), data, TrainConfig(**{**common, "steps": 4}), collate, resume=run / "last.pt")

    with pytest.raises(FileExistsError, match="holds another run .*metrics.jsonl, last.pt.*--overwrite"):
        train(tiny_model(64), data, TrainConfig(**common), collate)
    train(tiny_model(64), data, TrainConfig(overwrite=True, **{**common, "steps": 1}), collate)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_warm_up_as_long_as_the_run_is_warned_about(shapes, tmp_path, caplog):
    cfg = TrainConfig(out_dir=str(tmp_path), steps=2, warmup_steps=2, batch_size=2, num_workers=0)
    with caplog.at_level("WARNING", logger="model.train"):
        train(tiny_model(64), dataset(shapes, 64), cfg, collate)
    assert "the 2 warm-up steps outlast the run's 2: it never reaches --lr" in caplog.text


def test_a_run_that_failed_before_its_first_record_can_simply_run_again(shapes, tmp_path):
    from model.train_log import claim_folder

    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")  # what a run that failed at its first step leaves
    claim_folder(run, overwrite=False)
    assert not (run / "metrics.jsonl").exists() and not (run / "tensorboard").exists()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # one that logged is another run
    with pytest.raises(FileExistsError, match=r"holds another run \(metrics.jsonl\): pass --overwrite") as err:
        claim_folder(run, overwrite=False)
    assert "--resume" not in str(err.value)  # there is no last.pt to resume from


def test_overfits_a_handful_of_images(shapes, tmp_path):
    data = dataset(shapes, 128)
    data.items = data.items[:4]
    model = tiny_model(128, dropout=0.0, norm="bn")  # the from-scratch settings of the tiny presets
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        steps=200,
        batch_size=4,
        num_workers=0,
        lr=1e-3,
        backbone_lr_mult=1.0,
        log_every=10,
        checkpoint_every=1000,
    )
    train(model, data, cfg, collate)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.05 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])

    # predictions on those images (evaluated at 128x128 after letterboxing the 256x256 originals)
    model = load_model(tmp_path / "model.safetensors")
    data.transforms = None
    report = evaluate_panoptic_dataset(model, data)["summary"]
    assert report["mIoU"] > 90 and report["PQ"] > 85 and report["pixel_accuracy"] > 98, report


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over loopback is tested on Linux")
def test_ddp_with_two_cpu_processes(shapes, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "service.cli",
        "train",
        "--preset",
        "r10-tiny-shapes",
        "--data",
        str(shapes),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--crop",
        "64",
        "--min-scale",
        "1",
        "--max-scale",
        "1",
        *("--val-split", "train", "--eval-images", "2", "--eval-every", "2", "--dist-timeout", "5"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "PQ" in r] == [2, 3]  # rank 0 evaluated while rank 1 waited
    assert log[-1]["step"] == 3


def test_ddp_waits_as_long_as_told(monkeypatch):
    """The process group's timeout bounds the other ranks' wait for rank 0's evaluation (NCCL's default is
    10 minutes), so it is ours: 180 minutes unless --dist-timeout says otherwise."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    assert setup_distributed(timedelta(minutes=180)) == (1, 2, torch.device("cpu"))
    assert calls == [(("gloo",), {"timeout": timedelta(minutes=180)})]
    assert TrainConfig(out_dir="-").dist_timeout_min == 180
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--dist-timeout", "600"])
    assert args.dist_timeout == 600
