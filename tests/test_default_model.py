"""The shipped default model: registry, size, digest, its committed eval report, and end to end over HTTP."""

from __future__ import annotations

import hashlib
import json

import httpx
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from model.checkpoint import WEIGHTS_DIR, default_weights, load_model
from model.data.shapes import VAL_SEED, generate
from model.evaluation import PQStat
from service.settings import ServeSettings
from tests.images import encode
from tests.live_server import live_server

REGISTRY = json.loads((WEIGHTS_DIR / "registry.json").read_text())
ENTRY = REGISTRY["models"][REGISTRY["default"]]
SHAPES = ["sky", "ground", "circle", "square", "triangle"]
THINGS = [False, False, True, True, True]


def test_registry_names_a_small_checkpoint_with_its_digest():
    path = default_weights()
    assert path == WEIGHTS_DIR / ENTRY["file"] and path.is_file()
    assert path.stat().st_size <= 25 * 1024 * 1024
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ENTRY["sha256"]


def test_load_model_without_a_path_loads_the_default():
    model = load_model()
    assert model.info.class_names == SHAPES and model.info.isthing == THINGS
    assert model.info.name == REGISTRY["default"]


def test_committed_eval_report_meets_the_bar_on_500_unseen_images():
    report = json.loads((WEIGHTS_DIR / ENTRY["eval_report"]).read_text())
    assert report["weights_sha256"] == ENTRY["sha256"]
    summary = report["summary"]
    assert summary["images"] == 500
    assert summary["PQ"] >= 80 and summary["mIoU"] >= 92, summary


def test_served_default_model_segments_fresh_validation_images(tmp_path):
    """`serve`'s own path (backend auto) on the default model, results decoded with pycocotools."""
    pq = PQStat.zeros(len(SHAPES))
    with live_server(ServeSettings(cache_dir=tmp_path, max_batch_size=4)) as (url, _):
        for seed in range(VAL_SEED + 500, VAL_SEED + 540):  # not in the committed report either
            sample = generate(seed)
            data = encode(Image.fromarray(sample.image), "PNG")
            r = httpx.post(f"{url}/segment?task=panoptic", content=data, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            pred_map = np.zeros(sample.segment_map.shape, np.int64)
            for s in r.json()["segments"]:
                pred_map[mask_utils.decode(s["rle"]) == 1] = s["id"]
            pred = [{"id": s["id"], "category": s["label_id"]} for s in r.json()["segments"]]
            gt = [
                {"id": s["id"], "category": s["category_id"] - 1, "iscrowd": s.get("iscrowd", 0)}
                for s in sample.segments
            ]
            pq.add_image(sample.segment_map, gt, pred_map, pred)
    summary = pq.summary(THINGS)
    assert summary["PQ"] >= 80, summary  # measured when shipped: 83.45 (offline eval on the 500: 83.51)


def test_semantic_and_instance_on_the_default_model(tmp_path):
    """Semantic maps agree with the ground truth pixel by pixel; instance masks recall the things."""
    correct = total = recalled = things = 0
    with live_server(ServeSettings(backend="torch", cache_dir=tmp_path, max_batch_size=2)) as (url, _):
        for seed in range(VAL_SEED + 600, VAL_SEED + 610):
            sample = generate(seed)
            data = encode(Image.fromarray(sample.image), "PNG")
            semantic = httpx.post(f"{url}/segment?task=semantic", files={"image": ("s.png", data)}).json()
            gt_labels = np.full(sample.segment_map.shape, -1)
            for s in sample.segments:
                gt_labels[sample.segment_map == s["id"]] = s["category_id"] - 1
            pred_labels = np.full(sample.segment_map.shape, -2)
            for s in semantic["segments"]:
                pred_labels[mask_utils.decode(s["rle"]) == 1] = s["label_id"]
            correct += int((pred_labels == gt_labels)[gt_labels >= 0].sum())
            total += int((gt_labels >= 0).sum())

            params = {"task": "instance", "threshold": 0.5}
            instances = httpx.post(f"{url}/segment", params=params, files={"image": ("s.png", data)}).json()
            masks = [(s["label_id"], mask_utils.decode(s["rle"]).astype(bool)) for s in instances["segments"]]
            assert all(THINGS[label] for label, _ in masks)  # instance output holds things only
            for s in sample.segments:
                if not THINGS[s["category_id"] - 1]:
                    continue
                gt = sample.segment_map == s["id"]
                things += 1
                recalled += any(
                    label == s["category_id"] - 1 and (m & gt).sum() / (m | gt).sum() > 0.5 for label, m in masks
                )
    # Measured when the model was shipped: 98.99 % of pixels and 32 of 41 things (78 %).
    assert correct / total >= 0.97, correct / total
    assert recalled / things >= 0.7, (recalled, things)


def test_default_model_exports_to_onnx_within_tolerance(tmp_path):
    from service.cli import main as cli

    out = tmp_path / "shapes.onnx"
    assert cli(["export", "onnx", "--weights", str(default_weights()), "--out", str(out), "--max-batch", "4"]) == 0
    report = json.loads((tmp_path / "shapes.onnx.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-3
    assert all(r["semantic_agreement"] >= 0.999 for r in report["batches"].values())
