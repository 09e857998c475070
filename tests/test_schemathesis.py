"""Schemathesis against the service's own OpenAPI schema, on a live server on loopback: every operation,
the raw-body image routes included, with tests/schemathesis_hooks.py supplying hostile and valid images.
Zero server errors (5xx) and zero responses that break the documented status codes, types, headers or
schemas are allowed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_model
from model.maskformer import ModelInfo, build_model
from service.settings import ServeSettings
from tests.conftest import tiny_config
from tests.live_server import live_server

pytest.importorskip("schemathesis")

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",  # invalid requests get a 4xx
]


def test_every_operation_conforms_to_the_schema(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    names, things = ["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True]
    save_model(build_model(tiny_config(128), ModelInfo("tiny", names, things, version="1")), weights)
    settings = ServeSettings(
        weights=weights,
        backend="torch",
        cache_dir=tmp_path / "cache",
        max_batch_size=4,
        max_queue_delay_ms=5,
        max_body_bytes=2_000_000,
        max_image_pixels=4_000_000,
    )
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    with live_server(settings) as (url, _):
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", ",".join(CHECKS)]
            + ["--max-examples", "25", "--workers", "1", "--max-time", "30", "--continue-on-failure"]
            + ["--seed", "9", "--no-color"],
            cwd=tmp_path,  # its .schemathesis/ cache stays out of the repository
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    selected = re.search(r"Operations:\s+(\d+) selected / (\d+) total", result.stdout)
    assert selected and selected[1] == selected[2], result.stdout[:2000]  # every operation was tested
