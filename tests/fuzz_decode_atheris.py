"""Coverage-guided fuzzing of service.decode.decode with atheris (libFuzzer): any exception other than our
ApiError is a crash, and libFuzzer's -timeout bounds each input.

    python -m tests.fuzz_decode_atheris CORPUS_DIR -max_total_time=300 -timeout=10 -rss_limit_mb=4096

CORPUS_DIR may start empty; --seed writes small valid JPEG/PNG/WebP/BMP/TIFF files into it first.
tests/test_fuzz_atheris.py runs it briefly in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris
import torch  # noqa: F401 - imported uninstrumented first: only Pillow and our code get coverage feedback

with atheris.instrument_imports(include=["PIL", "service"]):
    from service.decode import decode, decode_input
    from service.errors import ApiError

MAX_PIXELS = 4_000_000


def test_one_input(data: bytes) -> None:
    try:
        decode(data, MAX_PIXELS)
        decode_input(data, MAX_PIXELS, (32, 32), (0.0, 0.0, 0.0))  # the server's path: reduced-scale JPEGs too
    except ApiError:
        pass


def seed(corpus: Path) -> None:
    from PIL import Image

    from tests.images import encode, rgb

    corpus.mkdir(parents=True, exist_ok=True)
    for fmt in ["JPEG", "PNG", "WEBP", "BMP", "TIFF"]:
        (corpus / f"seed.{fmt.lower()}").write_bytes(encode(rgb(12, 16), fmt))
    (corpus / "seed-gray.png").write_bytes(encode(Image.new("L", (5, 3)), "PNG"))


if __name__ == "__main__":
    args = sys.argv[:]
    if "--seed" in args:
        args.remove("--seed")
        seed(Path(next(a for a in args[1:] if not a.startswith("-"))))
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
