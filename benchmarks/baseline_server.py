"""The naive alternative a user would write: transformers' MaskFormer + its image processor + pycocotools.

One request is one forward pass (no batching); post-processing is the processor's own, and each segment's
mask is encoded with its own pycocotools call. `maskformer bench server --baseline DIR` starts it; by hand:

    python benchmarks/baseline_server.py --model /tmp/r50-hf --port 8001

It answers `POST /segment?task=semantic|panoptic|instance` (multipart field `image`) with the same JSON
shape as our service, `GET /readyz` and `GET /healthz`, so the load generator can drive both.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import torch
import transformers
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from pycocotools import mask as mask_utils


def create_app(model_dir: str) -> FastAPI:
    processor = transformers.MaskFormerImageProcessor.from_pretrained(model_dir)
    model = transformers.MaskFormerForInstanceSegmentation.from_pretrained(model_dir).eval()
    names = model.config.id2label
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/segment")
    def segment(image: UploadFile = File(...), task: str = "semantic") -> dict:  # noqa: B008
        img = Image.open(io.BytesIO(image.file.read())).convert("RGB")
        size = [(img.height, img.width)]
        with torch.inference_mode():
            outputs = model(**processor(images=img, return_tensors="pt"))
        segments = []
        if task == "semantic":
            label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=size)[0].numpy()
            for label in np.unique(label_map):
                segments.append(encode(label_map == label, int(label), names, 1.0))
        else:
            post = (
                processor.post_process_panoptic_segmentation
                if task == "panoptic"
                else processor.post_process_instance_segmentation
            )
            result = post(outputs, target_sizes=size)[0]
            seg_map = result["segmentation"].numpy()
            for info in result["segments_info"]:
                segments.append(encode(seg_map == info["id"], info["label_id"], names, info["score"]))
        return {"task": task, "width": img.width, "height": img.height, "segments": segments}

    return app


def encode(mask: np.ndarray, label: int, names: dict, score: float) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "label_id": label,
        "label": names[label],
        "score": score,
        "area": int(mask_utils.area(rle)),
        "bbox": mask_utils.toBbox(rle).tolist(),
        "rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a transformers MaskFormer save_pretrained directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
