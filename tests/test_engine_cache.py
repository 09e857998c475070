"""The engine-cache decision (reuse, rebuild, one builder across replicas) without TensorRT.

Sidecars and lock holders are planted by hand; no test fakes a TensorRT build: the build callable either
must not run, or is the real builder, which runs only where TensorRT imports.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from export.tensorrt import EngineSidecar, TensorRTUnavailable, build_engine, load_tensorrt
from service.engine_cache import Node, Want, engine_path, ensure_engine, file_lock, find_engine

NODE = Node("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


def must_not_build(onnx: Path, out: Path) -> None:
    raise AssertionError("the cache should have been used")


@pytest.fixture
def want(tmp_path) -> Want:
    onnx = tmp_path / "0123456789abcdef-256x256.onnx"
    onnx.write_bytes(b"an onnx graph")
    return Want.of(onnx, "fp32", 8)


def plant(cache: Path, node: Node, want: Want, name: str | None = None, **changes) -> Path:
    """An engine file and the sidecar a build on `node` would have written (the engine bytes are not real)."""
    engine = cache / name if name else engine_path(cache, node, want)
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(b"planted")
    sidecar = EngineSidecar(
        node.tensorrt_version, node.gpu_name, node.compute_capability, want.onnx_sha256, [3, 256, 256],
        {"min": 1, "opt": 4, "max": want.max_batch_size}, want.precision,
    )  # fmt: skip
    replace(sidecar, **changes).write(engine)
    return engine


def test_empty_cache_has_nothing_to_reuse(tmp_path, want):
    assert find_engine(tmp_path / "cache", NODE, want) == (None, [])


def test_a_matching_engine_is_reused_without_a_build(tmp_path, want):
    engine = plant(tmp_path, NODE, want)
    assert ensure_engine(tmp_path, NODE, want, must_not_build) == engine


def test_an_engine_built_under_another_name_is_found_by_its_sidecar(tmp_path, want):
    engine = plant(tmp_path, NODE, want, name=f"{want.onnx.stem}-copied-by-hand.engine")
    assert find_engine(tmp_path, NODE, want)[0] == engine


def test_a_larger_profile_serves_a_smaller_max_batch(tmp_path, want):
    engine = plant(tmp_path, NODE, want, profile={"min": 1, "opt": 8, "max": 16})
    assert find_engine(tmp_path, NODE, want)[0] == engine


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tensorrt_version": "10.7.0.23"}, "built with TensorRT 10.7.0.23, this node has 10.8.0.43"),
        ({"compute_capability": "8.6"}, "built for compute capability 8.6, this GPU is 9.0"),
        ({"gpu_name": "NVIDIA H200"}, "built on NVIDIA H200, this GPU is NVIDIA H100 80GB HBM3"),
        ({"onnx_sha256": "0" * 64}, "built from a different ONNX file"),
        ({"precision": "fp16"}, "precision fp16, wanted fp32"),
        ({"profile": {"min": 1, "opt": 2, "max": 4}}, "profile max batch 4, wanted 8"),
    ],
)
def test_a_mismatched_engine_is_rebuilt_and_the_reason_is_given(tmp_path, want, changes, reason):
    engine = plant(tmp_path, NODE, want, name=f"{want.onnx.stem}-other.engine", **changes)
    assert find_engine(tmp_path, NODE, want) == (None, [f"{engine.name}: {reason}"])


def test_engines_without_a_readable_sidecar_are_passed_over(tmp_path, want):
    (tmp_path / f"{want.onnx.stem}-half.engine").write_bytes(b"x")  # a build killed before its sidecar
    broken = plant(tmp_path, NODE, want, name=f"{want.onnx.stem}-broken.engine")
    Path(f"{broken}.json").write_text('{"tensorrt_version": ')
    found, rejected = find_engine(tmp_path, NODE, want)
    assert found is None
    assert any("no sidecar" in r for r in rejected) and any("unreadable sidecar" in r for r in rejected)


def test_another_models_engines_are_ignored(tmp_path, want):
    plant(tmp_path, NODE, want, name="ffffffffffffffff-256x256-fp32-b8-h100-80gb-hbm3-sm90-trt10.8.0.43.engine")
    assert find_engine(tmp_path, NODE, want) == (None, [])


def test_gpu_models_of_one_compute_capability_keep_separate_engines(tmp_path, want):
    a10, a40 = Node("10.8.0.43", "NVIDIA A10", "8.6"), Node("10.8.0.43", "NVIDIA A40", "8.6")
    assert engine_path(tmp_path, a10, want).name == "0123456789abcdef-256x256-fp32-b8-a10-sm86-trt10.8.0.43.engine"
    plant(tmp_path, a10, want)
    plant(tmp_path, a40, want)
    assert find_engine(tmp_path, a40, want)[0] == engine_path(tmp_path, a40, want)
    assert find_engine(tmp_path, a10, want)[0] == engine_path(tmp_path, a10, want)


def hold_lock(lock: Path, held: multiprocessing.Event, release: multiprocessing.Event, then_plant: bool) -> None:
    """Another replica: takes the lock, and (if asked) finishes 'its build' by planting an engine."""
    with file_lock(lock):
        held.set()
        release.wait(30)
        if then_plant:
            onnx = next(lock.parent.parent.glob("*.onnx"))
            plant(lock.parent, NODE, Want.of(onnx, "fp32", 8))


def other_replica(lock: Path, then_plant: bool):
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=hold_lock, args=(lock, held, release, then_plant))
    proc.start()
    assert held.wait(60), "the other process never took the lock"
    return proc, release


def test_a_replica_waiting_on_the_lock_reuses_what_the_builder_made(tmp_path, want):
    cache = tmp_path / "cache"
    target = engine_path(cache, NODE, want)
    proc, release = other_replica(target.with_name(target.name + ".lock"), then_plant=True)
    try:
        result: list[Path] = []
        waiter = threading.Thread(target=lambda: result.append(ensure_engine(cache, NODE, want, must_not_build)))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not result  # blocked on the other replica's lock
        release.set()
        waiter.join(30)
        assert result == [target]
    finally:
        release.set()
        proc.join(30)


def test_lock_timeout_says_what_it_waited_for(tmp_path):
    lock = tmp_path / "x.engine.lock"
    proc, release = other_replica(lock, then_plant=False)
    try:
        with pytest.raises(TimeoutError, match="another replica still building"):
            with file_lock(lock, timeout_s=0.3, poll_s=0.1):
                pass
    finally:
        release.set()
        proc.join(30)
    with file_lock(lock, timeout_s=1):  # released by the holder's exit
        assert str(os.getpid()) in lock.read_text()


def test_without_tensorrt_a_needed_build_fails_with_a_clear_error(tmp_path, want):
    try:
        load_tensorrt()
        pytest.skip("TensorRT is installed here; the GPU test below covers the build")
    except TensorRTUnavailable:
        pass

    def build(onnx: Path, out: Path) -> None:
        build_engine(onnx, out)

    with pytest.raises(TensorRTUnavailable, match="TensorRT"):
        ensure_engine(tmp_path, NODE, want, build)
    assert list(tmp_path.glob("*.engine*")) == [engine_path(tmp_path, NODE, want).with_suffix(".engine.lock")]


def test_real_build_then_reuse_on_a_gpu(tmp_path):
    try:
        load_tensorrt()
        import torch

        assert torch.cuda.is_available()
    except (TensorRTUnavailable, AssertionError):
        pytest.skip("needs TensorRT and a CUDA GPU (not available here)")
    from export.onnx import export_onnx
    from model import ModelInfo, build_model
    from service.backends.trt_backend import cached_engine
    from tests.conftest import tiny_config

    onnx = tmp_path / "m-128x128.onnx"
    export_onnx(build_model(tiny_config(128), ModelInfo("t", list("abcde"), [True] * 5)), onnx, (128, 128))
    engine = cached_engine(onnx, tmp_path, "fp32", 2)
    assert EngineSidecar.read(engine).profile["max"] == 2
    mtime = engine.stat().st_mtime_ns
    assert cached_engine(onnx, tmp_path, "fp32", 2) == engine and engine.stat().st_mtime_ns == mtime


def test_a_replica_waiting_to_export_the_onnx_reuses_the_holders_file(tmp_path, monkeypatch):
    import export.onnx
    from service.backends.ort_backend import cached_onnx, onnx_cache_path

    def must_not_export(*args, **kwargs):
        raise AssertionError("the ONNX another replica exported should have been used")

    monkeypatch.setattr(export.onnx, "export_onnx", must_not_export)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    onnx = onnx_cache_path(weights, tmp_path / "cache", (64, 64))
    proc, release = other_replica(onnx.with_name(onnx.name + ".lock"), then_plant=False)
    try:
        result: list[Path] = []
        waiter = threading.Thread(target=lambda: result.append(cached_onnx(weights, tmp_path / "cache", (64, 64))))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not result
        onnx.write_bytes(b"exported by the other replica")
        release.set()
        waiter.join(30)
        assert result == [onnx]
    finally:
        release.set()
        proc.join(30)


def test_the_cached_onnx_is_exported_again_when_the_exporter_changes(tmp_path, monkeypatch):
    import export.onnx
    import model.checkpoint
    from service.backends import ort_backend

    exported: list[Path] = []

    def fake_export(model, out, size, max_batch, fp16, fold_mask_conv):  # this test is about the name, not the graph
        exported.append(Path(out))
        Path(out).write_bytes(b"an exported graph")

    monkeypatch.setattr(export.onnx, "export_onnx", fake_export)
    monkeypatch.setattr(model.checkpoint, "load_model", lambda weights: None)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    first = ort_backend.cached_onnx(weights, tmp_path, (64, 64))
    assert re.fullmatch(r"[0-9a-f]{16}-64x64-e[0-9a-f]{8}\.onnx", first.name) and len(exported) == 1
    assert ort_backend.cached_onnx(weights, tmp_path, (64, 64)) == first and len(exported) == 1  # reused

    real_version = ort_backend.metadata.version
    for dist in ort_backend.EXPORTER:  # a new version of any part of the exporter: a new file, exported anew
        monkeypatch.setattr(
            ort_backend.metadata, "version", lambda name, dist=dist: "99.0" if name == dist else real_version(name)
        )
        again = ort_backend.cached_onnx(weights, tmp_path, (64, 64))
        assert again != first and again.is_file() and exported[-1].name.startswith(again.stem), dist
    assert len(exported) == 1 + len(ort_backend.EXPORTER)
    monkeypatch.setattr(ort_backend.metadata, "version", real_version)
    assert ort_backend.cached_onnx(weights, tmp_path, (64, 64)) == first  # back to the old exporter: its file
    fp16 = ort_backend.cached_onnx(weights, tmp_path, (64, 64), fp16=True)  # the FP16 graph: its own file
    assert re.fullmatch(first.name.replace("64x64", "64x64-fp16"), fp16.name) and exported[-1] != first
    folded = ort_backend.cached_onnx(weights, tmp_path, (64, 64), fold_mask_conv=True)  # the CPU's: its own file
    assert re.fullmatch(first.name.replace("64x64", "64x64-fold"), folded.name)
    assert exported[-1].name.startswith(folded.stem) and len(exported) == 3 + len(ort_backend.EXPORTER)
