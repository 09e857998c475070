"""The shipped default model: registered, small, loadable without a path, and it segments for real."""

import hashlib
import json

import pytest

from model import load_model
from model.checkpoint import WEIGHTS_DIR, default_weights
from model.data.coco_panoptic import CocoPanoptic
from model.data.shapes import VAL_SEED, write_split
from model.evaluation import evaluate_panoptic_dataset

REGISTRY = json.loads((WEIGHTS_DIR / "registry.json").read_text())
ENTRY = REGISTRY["models"][REGISTRY["default"]]


def test_registry_names_an_existing_small_checkpoint():
    path = default_weights()
    assert path.is_file() and path.stat().st_size <= 25 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ENTRY["sha256"]


def test_loads_without_a_path():
    model = load_model()
    assert model.info.class_names == ["sky", "ground", "circle", "square", "triangle"]
    assert model.info.isthing == [False, False, True, True, True]
    assert not model.training


def test_committed_eval_report_meets_the_bar():
    report = json.loads((WEIGHTS_DIR / ENTRY["eval_report"]).read_text())
    assert report["weights_sha256"] == ENTRY["sha256"]
    assert report["summary"]["images"] == 500
    assert report["summary"]["PQ"] >= 80 and report["summary"]["mIoU"] >= 92


@pytest.mark.parametrize("first", [VAL_SEED + 500])  # images beyond the committed report's 500
def test_segments_fresh_validation_images(tmp_path, first):
    write_split(tmp_path, "val", 24, first)
    data = CocoPanoptic(tmp_path / "images" / "val", tmp_path / "panoptic_val.json", tmp_path / "panoptic_val")
    summary = evaluate_panoptic_dataset(load_model(), data)["summary"]
    assert summary["mIoU"] >= 85 and summary["PQ"] >= 70, summary
