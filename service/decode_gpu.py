"""JPEG bytes -> the model's uint8 input on the GPU: nvjpeg decodes, the letterbox resizes there.

The host only parses the header (format, size, EXIF orientation, the pixel limit) and copies the compressed
bytes; the decoded picture never exists in host memory. Other formats, and JPEGs whose colours nvjpeg's RGB
output would not match Pillow's (CMYK, YCCK), take service/decode.py's host path.

Decoding and resizing run on a stream of their own, so a request's preprocessing does not queue behind a
batch's forward pass on the stream the model runs on; the thread waits for it before handing the input over,
and Backend.stack marks the input used on the model's stream.
"""

from __future__ import annotations

import io
from contextlib import nullcontext

import torch
from PIL import Image, JpegImagePlugin
from torch import Tensor

from model.preprocess import letterbox
from service.decode import TRANSPOSED, Decoded, decode_input, exif_orientation, open_image

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

    def __call__(
        self, data: bytes, max_pixels: int, input_size: tuple[int, int], fill: tuple[float, float, float]
    ) -> Decoded:
        img = open_image(data, max_pixels)  # the header only; refuses oversized images before any decoding
        if not isinstance(img, JpegImagePlugin.JpegImageFile) or img.mode not in GPU_MODES:
            return decode_input(data, max_pixels, input_size, fill)
        orientation = exif_orientation(img)
        w, h = img.size
        orig = (w, h) if orientation in TRANSPOSED else (h, w)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            try:
                image = self.decode_jpeg(raw, mode=self.rgb, device=self.device)
            except (RuntimeError, ValueError):
                # corrupt data, or a JPEG variant nvjpeg does not decode: the host path decodes what it can
                # and refuses the rest with its own 400
                return decode_input(data, max_pixels, input_size, fill)
            boxed, inner = letterbox(orient(image, orientation), input_size, fill)
        if self.stream is not None:
            self.stream.synchronize()
        return Decoded(boxed, inner, orig)

    def warmup(self, input_size: tuple[int, int], fill: tuple[float, float, float]) -> None:
        buf = io.BytesIO()
        Image.new("RGB", (2 * input_size[1], 2 * input_size[0])).save(buf, format="JPEG")
        self(buf.getvalue(), 4 * input_size[0] * input_size[1], input_size, fill)


def uses_gpu_decoder(device: torch.device, backend: str, enabled: bool) -> bool:
    """JPEGs are decoded on the GPU for backends that take CUDA input tensors (torch, TensorRT), unless the
    setting turns it off. ONNX Runtime is fed from host memory."""
    return enabled and device.type == "cuda" and backend in ("torch", "tensorrt")
