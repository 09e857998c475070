"""The backends behind one interface agree with the model; GPU-only paths skip where there is no GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.checkpoint import save_model
from model.maskformer import ModelInfo, build_model
from service.backends.ort_backend import OnnxRuntimeBackend, cached_onnx, exporter_tag, onnx_cache_path
from service.backends.torch_backend import TorchBackend
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.settings import ServeSettings
from tests.conftest import scene, tiny_config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="module")
def model_and_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_config(128), ModelInfo("t", list("abcde"), [False, False, True, True, True])).eval()
    return model, save_model(model, tmp_path_factory.mktemp("w") / "t.safetensors")


def images(batch: int) -> torch.Tensor:
    return scene(batch, 128, 128).round().to(torch.uint8)


def reference(model, x):
    with torch.no_grad():
        out = model(x.float())
    return out["pred_logits"], out["pred_masks"]


def test_torch_backend_equals_the_model_and_warms_every_batch_size(model_and_weights):
    model, _ = model_and_weights
    backend = TorchBackend(model, torch.device("cpu"), "fp32", max_batch_size=3)
    assert backend.warmup((128, 128)) == [1, 2, 3]
    x = images(2)
    for got, want in zip(backend.infer(x), reference(model, x)):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)  # batch norms folded: equal up to rounding


def test_torch_compile_agrees_with_eager(model_and_weights):
    model, _ = model_and_weights
    compiled = TorchBackend(model, torch.device("cpu"), "fp32", max_batch_size=1, compile=True)
    x = images(1)
    for got, want in zip(compiled.infer(x), reference(model, x)):
        assert (got - want).abs().max() < 1e-3


def test_half_precision_is_refused_on_the_cpu(model_and_weights):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TorchBackend(model_and_weights[0], torch.device("cpu"), "fp16", 1)


def test_onnxruntime_backend_matches_torch_and_caches_the_export(model_and_weights, tmp_path):
    """On the CPU it serves the graph with the folded mask head (where that saves work, as here)."""
    from export.onnx import onnx_folds_mask_conv
    from service.backends import create_backend

    model, weights = model_and_weights
    settings = ServeSettings(backend="onnxruntime", device="cpu", max_batch_size=4, cache_dir=tmp_path)
    backend = create_backend(settings, weights, model.cfg)
    assert isinstance(backend, OnnxRuntimeBackend)
    path = backend.onnx_path
    assert path.name.endswith(f"-fold-e{exporter_tag()}.onnx") and onnx_folds_mask_conv(path)
    mtime = path.stat().st_mtime_ns
    assert cached_onnx(weights, tmp_path, (128, 128), fold_mask_conv=True) == path
    assert path.stat().st_mtime_ns == mtime and path != onnx_cache_path(weights, tmp_path, (128, 128))
    x = images(3)
    for got, want in zip(backend.infer(x), reference(model, x)):
        assert (got - want).abs().max() < 1e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_batch_is_stacked_in_pinned_memory_for_a_gpu_only(model_and_weights, device):
    backend = TorchBackend(model_and_weights[0], torch.device(device), "fp32", 4)
    inputs = list(images(3))
    batch = backend.stack(inputs)
    assert torch.equal(batch, torch.stack(inputs)) and batch.device.type == "cpu"
    assert batch.is_pinned() == (device == "cuda")
    # on CUDA its forward pass shares post-processing's stream, so the two are not overlapped
    assert backend.overlaps_postprocessing == (device == "cpu")


@pytest.mark.parametrize(
    "backend_allows, setting, overlaps",
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],  # False: torch on CUDA
)
def test_postprocessing_overlaps_the_next_forward_pass_where_the_backend_allows(backend_allows, setting, overlaps):
    settings = ServeSettings(overlap_postprocessing=setting)
    pipeline = Pipeline(settings, Metrics(settings.max_batch_size))
    pipeline.backend = SimpleNamespace(overlaps_postprocessing=backend_allows)
    assert pipeline.overlaps_postprocessing() is overlaps


@CUDA
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_graphs_replay_equals_eager(model_and_weights, precision):
    model, _ = model_and_weights
    eager = TorchBackend(model, torch.device("cuda"), precision, 2)
    graphs = TorchBackend(model, torch.device("cuda"), precision, 2, cuda_graphs=True)
    graphs.warmup((128, 128))
    assert set(graphs.graphs) == {1, 2}
    x = images(2)
    for got, want in zip(graphs.infer(x), eager.infer(x)):
        assert torch.allclose(got, want, atol=1e-3 if precision == "fp32" else 5e-2)


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_bf16_is_refused_by_the_onnx_backends_before_any_export(model_and_weights, tmp_path, backend):
    # They would run fp32 under the name bf16 (and TensorRT would miss its engine cache on every start).
    from service.backends import create_backend

    model, weights = model_and_weights
    settings = ServeSettings(backend=backend, device="cpu", precision="bf16", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=f"precision bf16 is not supported by the {backend} backend"):
        create_backend(settings, weights, model.cfg)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing exported


def test_bf16_is_refused_by_the_onnx_backend_constructors(tmp_path):
    from service.backends.trt_backend import TensorRTBackend

    with pytest.raises(ValueError, match="precision bf16 is not supported by the onnxruntime backend"):
        OnnxRuntimeBackend(tmp_path / "m.onnx", torch.device("cpu"), "bf16", 1, tmp_path)
    with pytest.raises(ValueError, match="precision bf16 is not supported by the tensorrt backend"):
        TensorRTBackend(tmp_path / "m.engine", torch.device("cpu"), "bf16", 1)


def test_fp16_is_refused_on_the_cpu_before_any_export(model_and_weights, tmp_path):
    from service.backends import create_backend

    model, weights = model_and_weights
    settings = ServeSettings(backend="onnxruntime", device="cpu", precision="fp16", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        create_backend(settings, weights, model.cfg)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_gpu_providers_and_their_options(monkeypatch, tmp_path):
    """Which ONNX Runtime providers a session asks for, given what this onnxruntime build offers (the list is
    ONNX Runtime's; no session is created)."""
    import onnxruntime as ort

    from service.backends.ort_backend import providers

    def names(chosen):
        return [p if isinstance(p, str) else p[0] for p in chosen]

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    chosen = providers(torch.device("cuda", 1), "fp16", tmp_path)
    assert names(chosen) == gpu  # TensorRT first, the CPU for the rest
    trt_options, cuda_options = chosen[0][1], chosen[1][1]
    assert trt_options["trt_engine_cache_enable"] == "True"
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "ort-trt")
    assert trt_options["trt_timing_cache_enable"] == "True" and trt_options["trt_fp16_enable"] == "True"
    assert cuda_options == {"device_id": "1"}
    assert providers(torch.device("cuda"), "fp32", tmp_path)[0][1]["trt_fp16_enable"] == "False"

    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu[1:])
    assert names(providers(torch.device("cuda"), "fp16", tmp_path)) == gpu[1:]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="no GPU provider"):
        providers(torch.device("cuda"), "fp32", tmp_path)
    assert providers(torch.device("cpu"), "fp32", tmp_path) == ["CPUExecutionProvider"]


def test_which_backends_run_the_fp16_graph():
    from types import SimpleNamespace

    from service.backends import runs_fp16_graph

    assert runs_fp16_graph("onnxruntime")  # the CUDA provider runs the graph's own precision
    assert not runs_fp16_graph("torch")
    tensorrt_10 = SimpleNamespace(BuilderFlag=SimpleNamespace(FP16=0))
    tensorrt_11 = SimpleNamespace(BuilderFlag=SimpleNamespace())  # no BuilderFlag.FP16: strongly typed only
    assert not runs_fp16_graph("tensorrt", tensorrt_10) and runs_fp16_graph("tensorrt", tensorrt_11)


def test_the_fp16_graph_is_cached_beside_the_fp32_one(model_and_weights, tmp_path):
    from export.onnx import onnx_precision

    _, weights = model_and_weights
    fp32, fp16 = cached_onnx(weights, tmp_path, (128, 128)), cached_onnx(weights, tmp_path, (128, 128), fp16=True)
    assert fp32 != fp16 and onnx_precision(fp32) == "fp32" and onnx_precision(fp16) == "fp16"
    assert cached_onnx(weights, tmp_path, (128, 128), fp16=True) == fp16
