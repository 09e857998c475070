"""JPEG bytes -> the model's uint8 input on the GPU: nvjpeg decodes, the letterbox resizes there.

The host only parses the header (format, size, EXIF orientation, the pixel limit) and copies the compressed
bytes; the decoded picture never exists in host memory. Other formats, and JPEGs whose colours nvjpeg's RGB
output would not match Pillow's (CMYK, YCCK), take service/decode.py's host path.

Decoding and resizing run on a stream of their own, so a request's preprocessing does not queue behind a
batch's forward pass on the stream the model runs on; the thread waits for it before handing the input over,
and Backend.stack marks the input used on the model's stream. One request at a time: nvjpeg writes its output
from a private stream that does not wait for the decoder's, so memory another thread's queued resize still
reads could be handed to it (torchvision serialises its decodes anyway), and the lock bounds the GPU memory
held by decodes in flight. Whatever fails on the GPU (a JPEG nvjpeg refuses, a truncated one, a resize the
GPU kernel cannot do, memory) is decoded by the host path instead, which answers as it always does.
"""

from __future__ import annotations

import io
import logging
import threading
from contextlib import nullcontext

import torch
from PIL import Image, JpegImagePlugin
from torch import Tensor

from model.preprocess import letterbox
from service.decode import TRANSPOSED, Decoded, decode_opened, exif_orientation, open_image

log = logging.getLogger(__name__)

GPU_MODES = ("RGB", "L")  # Pillow's modes for YCbCr and grayscale JPEGs


def orient(image: Tensor, orientation: int) -> Tensor:
    """[C, H, W] as stored -> upright, as EXIF orientation 1..8 says (Pillow's ImageOps.exif_transpose)."""
    if orientation in (2, 4, 5, 7):  # mirrored: the stored columns run right to left once turned upright
        image = image.flip(-1)
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # quarter turns anticlockwise
    return image.rot90(turns, (-2, -1)) if turns else image


class GpuDecoder:
    """decode_input() for a CUDA device: JPEGs on the GPU, everything else through the host path."""

    def __init__(self, device: torch.device) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device, self.decode_jpeg, self.rgb = device, decode_jpeg, ImageReadMode.RGB
        # a CPU device runs the same steps without a stream: the tests' way through this path
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.lock = threading.Lock()

    def __call__(
        self, data: bytes, max_pixels: int, input_size: tuple[int, int], fill: tuple[float, float, float]
    ) -> Decoded:
        img = open_image(data, max_pixels)  # the header only; refuses oversized images before any decoding
        # a JPEG cut short (no end-of-image marker) may decode to grey on the GPU; Pillow refuses it
        whole = data.rstrip(b"\x00").endswith(b"\xff\xd9")
        if not isinstance(img, JpegImagePlugin.JpegImageFile) or img.mode not in GPU_MODES or not whole:
            return decode_opened(img, input_size, fill)
        orientation = exif_orientation(img)
        w, h = img.size
        orig = (w, h) if orientation in TRANSPOSED else (h, w)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with self.lock, torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            try:
                image = self.decode_jpeg(raw, mode=self.rgb, device=self.device)
                boxed, inner = letterbox(orient(image, orientation), input_size, fill)
                if self.stream is not None:
                    self.stream.synchronize()
            except (RuntimeError, ValueError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
                log.debug("GPU decode failed (%s); decoding on the host", err)
                boxed = None
        if boxed is None:
            return decode_opened(img, input_size, fill)
        return Decoded(boxed, inner, orig)

    def warmup(self, input_size: tuple[int, int], fill: tuple[float, float, float]) -> bool:
        """Decode one JPEG on the device (nvjpeg sets itself up on its first image); False where that fails,
        e.g. a torchvision built without nvjpeg, whose every JPEG would otherwise fail over to the host."""
        buf = io.BytesIO()
        Image.new("RGB", (2 * input_size[1], 2 * input_size[0])).save(buf, format="JPEG")
        raw = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        try:
            image = self.decode_jpeg(raw, mode=self.rgb, device=self.device)
            letterbox(image, input_size, fill)
        except (RuntimeError, ValueError) as err:
            log.warning("JPEGs cannot be decoded on %s (%s); they are decoded on the host", self.device, err)
            return False
        return image.device.type == self.device.type  # torch.device('cuda') != torch.device('cuda:0')


def uses_gpu_decoder(device: torch.device, backend: str, enabled: bool) -> bool:
    """JPEGs are decoded on the GPU for backends that take CUDA input tensors (torch, TensorRT), unless the
    setting turns it off. ONNX Runtime is fed from host memory."""
    return enabled and device.type == "cuda" and backend in ("torch", "tensorrt")
