"""The request path, in order: decode -> letterbox -> dynamic batcher -> backend -> post-process -> encode.
(On CUDA, JPEGs are decoded and letterboxed on the GPU: service/decode_gpu.py.)

HTTP lives in service/app.py; this module knows nothing of it beyond raising ApiErrors.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import default_weights, read_metadata
from model.postprocess import postprocess
from service import errors
from service.backends import Backend, create_backend
from service.batcher import Batcher, QueueFull
from service.decode import Decoded, decode_input
from service.decode_gpu import GpuDecoder, uses_gpu_decoder
from service.encode import encode_result
from service.metrics import STAGES, Metrics
from service.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class Options:
    task: str
    threshold: float | None
    overlap_threshold: float
    max_segments: int | None


@dataclass
class Work:
    image: Decoded
    options: Options


@dataclass
class Inferred:
    """One batch's model outputs (on the backend's device), on their way to the finishing thread."""

    batch: Sequence[Work]
    logits: torch.Tensor
    masks: torch.Tensor
    infer_s: float


class Pipeline:
    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.weights = Path(settings.weights) if settings.weights else default_weights()
        self.cfg, self.info = read_metadata(self.weights)  # fails fast on a bad checkpoint
        self.backend: Backend | None = None
        self.decoder: Callable[[bytes, int, tuple[int, int], tuple[float, float, float]], Decoded] = decode_input
        self.warm_batch_sizes: list[int] = []
        self.batcher: Batcher | None = None

    # -- start-up ------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Create the backend and run every batch size once (blocking; call from a thread)."""
        start = time.perf_counter()
        backend = create_backend(self.settings, self.weights, self.cfg)
        self.check_outputs(backend)
        if self.settings.warmup:
            self.warm_batch_sizes = backend.warmup(self.cfg.input_size)
        if uses_gpu_decoder(backend.device, backend.name, self.settings.gpu_preprocessing):
            gpu = GpuDecoder(backend.device)
            if not self.settings.warmup or gpu.warmup(self.cfg.input_size, self.cfg.pixel_mean):
                self.decoder = gpu
        self.backend = backend
        log.info(
            "%s ready on %s (%s) in %.1f s, warm at batch sizes %s",
            self.info.name,
            backend.device,
            backend.name,
            time.perf_counter() - start,
            self.warm_batch_sizes,
        )

    def check_outputs(self, backend: Backend) -> None:
        """One forward pass: a model file that is not this checkpoint's (a foreign or stale export in the
        cache) stops start-up here with its shapes, instead of failing or mislabelling requests later."""
        logits, masks = backend.infer(torch.zeros(1, 3, *self.cfg.input_size, dtype=torch.uint8))
        want = (1, self.cfg.num_queries, self.cfg.num_classes + 1)
        if tuple(logits.shape) != want or tuple(masks.shape[:2]) != want[:2]:
            where = backend.describe().get("onnx") or backend.describe().get("engine") or backend.name
            raise RuntimeError(
                f"{where} does not match {self.weights.name}: class logits {tuple(logits.shape)}, expected {want}; "
                f"if it is a cached export in {self.settings.cache_dir}, delete it and the next start exports it again"
            )

    def start(self) -> None:
        """Start the batcher on the running event loop, once load() has created the backend."""
        assert self.backend is not None
        s = self.settings
        self.batcher = Batcher(
            self.run_batch,
            s.max_batch_size,
            s.max_queue_delay_ms / 1000,
            s.max_queue_size,
            on_batch=self.batch_taken,
            finish=self.finish_batch,
            overlap=self.overlaps_postprocessing(),
        )
        self.batcher.start()

    def overlaps_postprocessing(self) -> bool:
        """Whether a batch is post-processed while the next one runs (service/batcher.py): where the backend
        allows it, unless the setting turns it off. On a CPU whose every core runs the forward pass the two
        contend, and benchmarks/run_cpu.sh's A/B could not tell overlapping from taking turns."""
        assert self.backend is not None
        return self.backend.overlaps_postprocessing and self.settings.overlap_postprocessing

    def decodes_on_gpu(self) -> bool:
        """Whether JPEGs are decoded and letterboxed on the GPU (service/decode_gpu.py)."""
        return isinstance(self.decoder, GpuDecoder)

    def batch_taken(self, size: int, depth: int) -> None:
        """A batch left the queue: record its size and the depth left, or the gauge counts its requests as
        waiting until they are answered."""
        self.metrics.batch_size.observe(size)
        self.metrics.queue_depth.set(depth)

    # -- the worker thread -----------------------------------------------------------------------------------

    def run_batch(self, batch: Sequence[Work]) -> Inferred:
        """One forward pass for the batch (tasks may differ); finish_batch post-processes it.

        A failed forward pass raises, and the batcher answers every image with that error."""
        assert self.backend is not None
        images = self.backend.stack([w.image.input for w in batch])
        t0 = time.perf_counter()
        try:
            logits, masks = self.backend.infer(images)
            if logits.is_cuda:  # the torch backend returns once its kernels are queued: time them, not that
                torch.cuda.current_stream(logits.device).synchronize()
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("inference failed for a batch of %d (error id %s)", len(batch), error_id)
            raise errors.inference_failed(error_id) from None
        return Inferred(batch, logits, masks, time.perf_counter() - t0)

    def finish_batch(self, inferred: Inferred) -> list[Any]:
        """Each image's post-processing on the device, in the finishing thread while the next batch runs."""
        logits, masks = inferred.logits, inferred.masks
        out: list[Any] = []
        for i, w in enumerate(inferred.batch):
            t1 = time.perf_counter()
            o = w.options
            try:
                result = postprocess(
                    {"pred_logits": logits[i : i + 1], "pred_masks": masks[i : i + 1]},
                    o.task,
                    self.info.isthing,
                    [w.image.image_size],
                    [w.image.orig_size],
                    o.threshold,
                    o.overlap_threshold,
                    o.max_segments,
                )[0]
            except Exception:
                error_id = uuid.uuid4().hex[:12]
                log.exception("post-processing failed (error id %s)", error_id)
                out.append(errors.inference_failed(error_id))
                continue
            if logits.is_cuda:
                # to the host now, on this stream: encoding copies later, from another thread, would queue
                # behind the next batch's forward pass
                result = result.to("cpu", non_blocking=True)
            out.append((result, inferred.infer_s, time.perf_counter() - t1))
        if logits.is_cuda:  # the copies above are done, and the outputs can be reused
            torch.cuda.current_stream(logits.device).synchronize()
        return out

    # -- one request -----------------------------------------------------------------------------------------

    async def segment(self, data: bytes, options: Options, deadline: float) -> dict[str, Any]:
        """The whole path for one image; raises ApiError on bad input, overload, timeout or failure."""
        return await self.segment_decoded(await self.decode(data), options, deadline)

    async def decode(self, data: bytes) -> tuple[Decoded, float]:
        """The first stage alone, so a request of several images can refuse bad input before any queues:
        the letterboxed image and the seconds its decoding took."""
        if self.batcher is None or self.backend is None:
            raise errors.not_ready("the model is still loading")
        t0 = time.perf_counter()
        image = await asyncio.to_thread(self._decode, data)
        return image, time.perf_counter() - t0

    async def segment_decoded(
        self, decoded: tuple[Decoded, float], options: Options, deadline: float
    ) -> dict[str, Any]:
        """The rest of the path, from the batcher on, for what decode() gave."""
        assert self.batcher is not None
        image, t_decode = decoded
        try:
            job = self.batcher.submit(Work(image, options))
        except QueueFull:
            raise errors.queue_full(retry_after_s=1) from None
        self.metrics.queue_depth.set(self.batcher.depth())
        try:
            result, infer_s, post_s = await asyncio.wait_for(asyncio.shield(job.future), deadline - time.monotonic())
        except TimeoutError:
            job.future.cancel()  # the batcher drops it if it has not run yet
            raise errors.timeout(self.settings.request_timeout_s) from None
        except asyncio.CancelledError:
            job.future.cancel()  # the client went away
            raise
        finally:
            self.metrics.queue_depth.set(self.batcher.depth())
        queue_s = job.started - job.enqueued
        t1 = time.perf_counter()
        segments = await asyncio.to_thread(encode_result, result, self.info.class_names)
        encode_s = time.perf_counter() - t1
        timing = dict(zip(STAGES, (t_decode, queue_s, infer_s, post_s, encode_s), strict=True))
        for stage, seconds in timing.items():
            self.metrics.stage.labels(stage).observe(seconds)
        h, w = image.orig_size
        return {
            "task": options.task,
            "width": w,
            "height": h,
            "model": {"name": self.info.name, "version": self.info.version},
            "segments": segments,
            "timing_ms": {stage: round(1000 * seconds, 3) for stage, seconds in timing.items()},
        }

    def _decode(self, data: bytes) -> Decoded:
        return self.decoder(data, self.settings.max_image_pixels, self.cfg.input_size, self.cfg.pixel_mean)

    async def drain(self) -> None:
        if self.batcher is not None:
            await self.batcher.drain()
