"""The README's serving examples run as written against a live server, and its settings table is complete."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_model
from model.maskformer import ModelInfo, build_model
from service.settings import ServeSettings
from tests.conftest import tiny_config
from tests.images import encode, rgb
from tests.live_server import live_server

README = (Path(__file__).parents[1] / "README.md").read_text()
SERVING = README[README.index("## Serving") :]


def block(lang: str, containing: str) -> str:
    for code in re.findall(rf"```{lang}\n(.*?)```", SERVING, re.S):
        if containing in code:
            return code
    raise AssertionError(f"no {lang} block with {containing!r} in the README's serving section")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("readme")
    weights = tmp / "tiny.safetensors"
    names, things = ["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True]
    save_model(build_model(tiny_config(128), ModelInfo("tiny", names, things)), weights)
    (tmp / "street.jpg").write_bytes(encode(rgb(90, 120), "JPEG"))
    with live_server(ServeSettings(weights=weights, backend="torch", cache_dir=tmp, max_batch_size=2)) as (url, _):
        yield url, tmp


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example(server):
    url, tmp = server
    cmd = block("sh", "curl").replace("http://localhost:8000", url)
    out = subprocess.run(cmd, shell=True, cwd=tmp, capture_output=True, text=True, check=True).stdout
    body = json.loads(out)
    assert body["task"] == "panoptic" and (body["width"], body["height"]) == (120, 90)


def test_python_example(server, capsys, monkeypatch):
    url, tmp = server
    monkeypatch.chdir(tmp)
    exec(block("python", "httpx.post").replace("http://localhost:8000", url), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.endswith("(90, 120)") for line in lines)


def test_every_setting_is_documented():
    table = README[README.index("### Settings") :]
    for name in ServeSettings.model_fields:
        assert f"`{name}`" in table, f"README's settings table lacks {name}"
