"""service.client against a live server with the shipped model: every image type, sync and async, batch,
decoded masks, overlays and errors."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from model.data.shapes import VAL_SEED, generate
from service.client import AsyncClient, Client, ServiceError
from service.settings import ServeSettings
from tests.images import encode
from tests.live_server import live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = ServeSettings(backend="torch", cache_dir=tmp_path_factory.mktemp("cache"), max_batch_size=2)
    with live_server(settings) as (url, _):
        yield url


@pytest.fixture(scope="module")
def image():
    return generate(VAL_SEED + 5).image


def test_every_image_type_gives_the_same_masks(server, image, tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    with Client(server) as client:
        results = [
            client.segment(x, task="panoptic") for x in (path, str(path), path.read_bytes(), Image.open(path), image)
        ]
        assert client.model()["name"] == "shapes-r10"
    first = results[0]
    assert first.segments and (first.width, first.height) == (256, 256)
    for r in results[1:]:
        assert [s.label for s in r.segments] == [s.label for s in first.segments]
        for a, b in zip(r.segments, first.segments):
            np.testing.assert_array_equal(a.mask, b.mask)
    for seg, raw in zip(first.segments, first.raw["segments"]):
        rle = {"size": raw["rle"]["size"], "counts": raw["rle"]["counts"].encode()}
        np.testing.assert_array_equal(seg.mask, mask_utils.decode(rle).astype(bool))
        assert seg.mask.dtype == bool and seg.mask.sum() == seg.area
    assert first.render(path).size[0] > 256 and first.overlay(image).size == (256, 256)


def test_async_client_and_batch(server, image):
    async def run():
        async with AsyncClient(server) as client:
            one = await client.segment(image, task="semantic")
            batch = await client.segment_batch([image, encode(Image.fromarray(image), "JPEG")], task="semantic")
            return one, batch

    one, batch = asyncio.run(run())
    assert len(batch) == 2 and [s.label for s in batch[0].segments] == [s.label for s in one.segments]
    with Client(server) as client:
        assert [s.label for s in client.segment_batch([image], task="semantic")[0].segments] == [
            s.label for s in one.segments
        ]


def test_readme_example(server, image, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "service.client import" in c]
    Image.fromarray(image).save(tmp_path / "street.jpg")
    monkeypatch.chdir(tmp_path)
    exec(code.replace("http://localhost:8000", server), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.endswith("(256, 256)") for line in lines)
    assert Image.open(tmp_path / "street-overlay.png").width > 256


def test_errors(server):
    with Client(server) as client:
        with pytest.raises(ServiceError) as err:
            client.segment(b"not an image")
        assert (err.value.status, err.value.code) == (400, "invalid_image")
        with pytest.raises(ServiceError, match="invalid_parameter"):
            client.segment(np.zeros((8, 8, 3), np.uint8), task="depth")
        with pytest.raises(TypeError, match="path, bytes, a PIL image or a numpy array"):
            client.segment(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="uint8 RGB"):
            client.segment(np.zeros((8, 8), np.float32))


def test_error_answers_keep_retry_after_and_a_non_json_success_is_an_error():
    import httpx

    from service.client import ServiceError, _json

    busy = httpx.Response(503, json={"error": {"code": "queue_full", "message": "busy"}}, headers={"Retry-After": "3"})
    with pytest.raises(ServiceError) as info:
        _json(busy)
    assert (info.value.status, info.value.code, info.value.retry_after) == (503, "queue_full", 3.0)
    with pytest.raises(ServiceError) as info:
        _json(httpx.Response(400, json={"error": {"code": "bad_image", "message": "no"}}))
    assert info.value.retry_after is None
    for body in (b"<html>proxy</html>", b"[1, 2]"):
        with pytest.raises(ServiceError) as info:
            _json(httpx.Response(200, content=body))
        assert (info.value.status, info.value.code) == (200, "not_json")
    assert _json(httpx.Response(200, json={"task": "semantic"})) == {"task": "semantic"}
