"""The CUDA paths end to end, for a machine with a GPU (they skip here, saying why): post-processing and JPEG
decoding on the GPU give the CPU's results, and the service on the GPU (torch backend, fp16 with CUDA graphs,
and fp32) answers every task with the CPU service's labels. benchmarks/device_check.sh runs this file before
the GPU benchmark.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.data.shapes import VAL_SEED, generate
from model.postprocess import TASKS, postprocess
from service.settings import ServeSettings
from tests.images import awkward, encode
from tests.live_server import live_server
from tests.test_postprocess import default_model_outputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.cpu() == b.cpu()).float().mean().item()


@pytest.mark.parametrize("task", TASKS)
def test_postprocessing_on_the_gpu_gives_the_cpus_results(task):
    """The shipped model's outputs, post-processed on each device at the input size and at a photo's size."""
    model, out = default_model_outputs()
    isthing = model.info.isthing
    for orig in [model.cfg.input_size, (480, 640)]:
        n = len(out["pred_logits"])
        cpu = postprocess(out, task, isthing, orig_sizes=[orig] * n)
        gpu = postprocess({k: v.cuda() for k, v in out.items()}, task, isthing, orig_sizes=[orig] * n)
        for c, g in zip(cpu, gpu):
            assert [s.label_id for s in g.segments] == [s.label_id for s in c.segments]
            assert [s.score for s in g.segments] == pytest.approx([s.score for s in c.segments], abs=1e-3)
            if task == "instance":
                assert agreement(g.masks, c.masks) > 0.999
            else:  # bilinear resizes round differently on the GPU: a few boundary pixels may change hands
                assert g.segment_map.is_cuda and agreement(g.label_map(), c.label_map()) > 0.999


def labels(response: dict, shape: tuple[int, int]) -> torch.Tensor:
    """A semantic or panoptic answer's label map, -1 where no segment is."""
    out = torch.full(shape, -1)
    for seg in response["segments"]:
        out[torch.from_numpy(mask_utils.decode(seg["rle"])).bool()] = seg["label_id"]
    return out


def test_the_service_on_the_gpu_answers_like_the_cpu(tmp_path):
    """PNGs take the host's decoder everywhere; the JPEGs are decoded by nvjpeg and letterboxed on the GPU
    there (service/decode_gpu.py), a level or so from the host's pixels, hence their looser agreement."""
    shapes = [Image.fromarray(generate(VAL_SEED + i).image) for i in range(4)]
    images = [encode(shapes[0], "PNG"), encode(shapes[1], "PNG")]
    images += [encode(shapes[2], "JPEG", quality=95), encode(shapes[3].resize((640, 480)), "JPEG", quality=95)]
    strict = [True, True, False, False]
    answers = {}
    for name, extra in {
        "cpu": dict(device="cpu"),
        "cuda fp32": dict(device="cuda"),
        "cuda fp16 graphs": dict(device="cuda", precision="fp16", cuda_graphs=True),
    }.items():
        settings = ServeSettings(backend="torch", cache_dir=tmp_path / "cache", max_batch_size=4, **extra)
        with live_server(settings) as (url, _):
            model = httpx.get(f"{url}/v1/model").json()
            assert model["device"].startswith(extra["device"]) and model["backend"] == "torch"
            assert model["gpu_preprocessing"] == (extra["device"] == "cuda")
            for task in TASKS:
                for i, data in enumerate(images):
                    files = {"image": ("x.png" if strict[i] else "x.jpg", data)}
                    r = httpx.post(f"{url}/segment", params={"task": task}, files=files, timeout=60)
                    assert r.status_code == 200, r.text
                    answers[name, task, i] = r.json()
    for task in ("semantic", "panoptic"):
        for i in range(len(images)):
            cpu = answers["cpu", task, i]
            shape = (cpu["height"], cpu["width"])
            fp32 = agreement(labels(answers["cuda fp32", task, i], shape), labels(cpu, shape))
            assert fp32 > (0.999 if strict[i] else 0.99), (task, i, fp32)
            assert agreement(labels(answers["cuda fp16 graphs", task, i], shape), labels(cpu, shape)) > 0.99
    for i in [i for i in range(len(images)) if strict[i]]:
        found = [{s["label"] for s in answers[name, "instance", i]["segments"]} for name in ("cpu", "cuda fp32")]
        assert found[0] == found[1]


def test_fp32_on_cuda_is_fp32_and_half_precision_runs_channels_last():
    """cuDNN's TF32 convolutions are PyTorch's default: prepared for fp32 on CUDA they are off, and fp16 runs
    the tensor cores' native layout."""
    from model.checkpoint import load_model
    from model.inference import prepare_for_inference

    model = load_model()
    cuda = torch.device("cuda")
    fp32 = prepare_for_inference(model, cuda, "fp32")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    conv = next(m for m in fp32.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    fp16 = prepare_for_inference(model, cuda, "fp16")
    conv = next(m for m in fp16.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.dtype == torch.float16 and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_jpegs_decode_on_the_gpu_as_on_the_host():
    """nvjpeg and the GPU letterbox against the same steps on the CPU, and against the host path."""
    import warnings

    from service.decode import decode_input
    from service.decode_gpu import GpuDecoder

    fill = (123.675, 116.28, 103.53)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 deprecates its decoders for TorchCodec's
        gpu, cpu = GpuDecoder(torch.device("cuda")), GpuDecoder(torch.device("cpu"))
        shapes = Image.fromarray(generate(VAL_SEED).image)
        sizes = [(480, 640), (1500, 2000), (90, 120)]
        jpegs = [encode(shapes.resize(size[::-1]), "JPEG", quality=92) for size in sizes]
        jpegs += [encode(shapes, "JPEG", progressive=True), encode(shapes.convert("L"), "JPEG")]
        jpegs += [awkward()[name][0] for name in ("exif-rotated", "mpo")]
        for data in jpegs:
            on_gpu, on_cpu = gpu(data, 40_000_000, (256, 256), fill), cpu(data, 40_000_000, (256, 256), fill)
            host = decode_input(data, 40_000_000, (256, 256), fill)
            assert on_gpu.input.is_cuda and (on_gpu.image_size, on_gpu.orig_size) == (host.image_size, host.orig_size)
            for other in (on_cpu.input, host.input):
                diff = (on_gpu.input.cpu().int() - other.int()).abs().float()
                assert diff.mean() < 1.0, diff.mean()


def test_a_batch_mixing_gpu_and_host_inputs_is_stacked_on_the_gpu():
    """JPEGs arrive decoded on the GPU, other formats on the host: one batch may hold both."""
    from model.checkpoint import load_model
    from service.backends.torch_backend import TorchBackend
    from service.decode_gpu import GpuDecoder

    backend = TorchBackend(load_model(), torch.device("cuda"), "fp32", 2)
    on_gpu = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    on_host = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    with torch.cuda.stream(GpuDecoder(torch.device("cuda")).stream):  # made on the decoder's stream
        decoded = on_gpu.cuda()
    torch.cuda.synchronize()
    batch = backend.stack([decoded, on_host])
    assert batch.is_cuda and torch.equal(batch.cpu(), torch.stack([on_gpu, on_host]))
