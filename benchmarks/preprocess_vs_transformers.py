"""Preprocessing per image, JPEG bytes to the model's input: ours against transformers' image processor.

Ours is the server's decode thread, `service.decode.decode_input`: allow-listed formats, the pixel limit,
EXIF orientation, a JPEG at least twice the input size decoded at libjpeg's reduced DCT scale, and the
letterbox to 512x512 in uint8. "full decode" is `prepare(decode(...))`, the same without the reduced scale;
"float resize" also resizes through float, as the server did before its uint8 path. Theirs is what
benchmarks/baseline_server.py does: PIL open + convert("RGB") + MaskFormerImageProcessor (fit in 512x512,
pad to a multiple of 32, normalise). Per size, one JPEG (the shapes validation image scaled up, quality
90); the four alternate, one thread, process CPU time, median over repeats. The pixel columns compare our
input with the full decode's.

    python benchmarks/preprocess_vs_transformers.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hf_r50 import image_processor  # this script's directory is on sys.path
from PIL import Image

from model.config import IMAGENET_MEAN
from model.data.shapes import VAL_SEED, generate
from model.preprocess import letterbox
from service.decode import decode, decode_input, prepare

SIZES = [(512, 512), (480, 640), (1080, 1920), (3000, 4000)]  # (h, w)
INPUT = (512, 512)
MAX_PIXELS = 40_000_000  # the server's default limit


def jpeg(size: tuple[int, int]) -> bytes:
    img = Image.fromarray(generate(VAL_SEED).image).resize(size[::-1], Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ours(data: bytes) -> torch.Tensor:
    return decode_input(data, MAX_PIXELS, INPUT, IMAGENET_MEAN).input


def ours_full(data: bytes) -> torch.Tensor:
    return prepare(decode(data, MAX_PIXELS), INPUT, IMAGENET_MEAN).input


def ours_float(data: bytes) -> torch.Tensor:
    image = torch.from_numpy(decode(data, MAX_PIXELS)).permute(2, 0, 1).float()
    boxed, _ = letterbox(image, INPUT, IMAGENET_MEAN)
    return boxed.round_().clamp_(0, 255).to(torch.uint8)


def run(repeats: int) -> dict:
    processor = image_processor(INPUT[0])
    sides = {
        "ours": ours,
        "ours_full_decode": ours_full,
        "ours_float_resize": ours_float,
        "transformers": lambda data: processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt"),
    }
    rows = []
    for size in SIZES:
        data = jpeg(size)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(repeats):
            for name, side in sides.items():
                t0 = time.process_time()
                side(data)
                times[name].append(time.process_time() - t0)
        ms = {name: round(1000 * float(np.median(t)), 2) for name, t in times.items()}
        diff = (ours(data).int() - ours_full(data).int()).abs().float()
        rows.append(
            {
                "size": list(size),
                "jpeg_bytes": len(data),
                **{f"{name}_ms": v for name, v in ms.items()},
                "ours_over_transformers": round(ms["ours"] / ms["transformers"], 3),
                "ours_over_float_resize": round(ms["ours"] / ms["ours_float_resize"], 3),
                "mean_abs_diff_vs_full_decode": round(diff.mean().item(), 3),
                "max_abs_diff_vs_full_decode": int(diff.max().item()),
            }
        )
        print(rows[-1], flush=True)
    return {"threads": torch.get_num_threads(), "repeats": repeats, "input": list(INPUT), "rows": rows}


def markdown(report: dict) -> str:
    lines = [
        f"Preprocessing per image, JPEG bytes to a {report['input'][0]}x{report['input'][1]} input, "
        f"{report['threads']} thread(s), CPU time, median of {report['repeats']}.",
        "",
        "| image (h x w) | ours (ms) | ours, full decode (ms) | ours, full decode, float resize (ms) "
        "| transformers (ms) | ours / transformers | ours / float resize | pixels vs full decode: mean, max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['size'][0]}x{r['size'][1]} | {r['ours_ms']} | {r['ours_full_decode_ms']} | "
            f"{r['ours_float_resize_ms']} | {r['transformers_ms']} | {r['ours_over_transformers']} | "
            f"{r['ours_over_float_resize']} | {r['mean_abs_diff_vs_full_decode']}, {r['max_abs_diff_vs_full_decode']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    report = run(args.repeats)
    report["command"] = " ".join(["python", *sys.argv])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "preprocess.md").write_text(markdown(report))
    print(f"wrote {args.out / 'preprocess.md'}")


if __name__ == "__main__":
    main()
