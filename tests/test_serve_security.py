"""Security properties of the service: nothing from a request reaches the filesystem, no pickle is loaded,
error bodies and headers give nothing away, and every dependency is pinned to the version CI tests.

The API key (401 without, 200 with, probes open) is tested by
tests/test_serve_api.py::test_api_key_protects_everything_but_health.
pip-audit needs PyPI's JSON API or OSV online; the pin check below is what runs offline.
"""

from __future__ import annotations

import pickle
import re
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import tomllib
import torch
from packaging.requirements import Requirement

from model.checkpoint import save_model
from model.maskformer import ModelInfo, build_model
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.settings import ServeSettings
from tests.conftest import tiny_config
from tests.images import encode, rgb
from tests.live_server import live_server

ROOT = Path(__file__).resolve().parents[1]
NAMES, THINGS = ["sky", "ground", "circle", "square", "triangle"], [False, False, True, True, True]
# What an error body must never show: a stack, our source paths, the interpreter's, object addresses.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/work/|/home/|/usr/|/tmp/|\b0x[0-9a-f]{6,}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.manual_seed(0)
    weights = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model(build_model(tiny_config(128), ModelInfo("tiny", NAMES, THINGS)), weights)
    settings = ServeSettings(
        weights=weights, backend="torch", cache_dir=tmp_path_factory.mktemp("cache"), max_batch_size=2, warmup=False
    )
    with live_server(settings) as (url, app):
        yield url, app


def test_no_route_takes_a_path_parameter(server):
    _, app = server
    spec = app.openapi()
    assert not [p for p in spec["paths"] if "{" in p]
    assert not [r.path for r in app.routes if "{" in getattr(r, "path", "")]  # nor any hidden route


@pytest.mark.parametrize(
    "path",
    ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../app.py", "/static/index.html", "//etc/passwd"],
)
def test_paths_outside_the_routes_read_no_file(server, path):
    url, _ = server
    r = httpx.get(url + path)
    assert r.status_code == 404 and "root:" not in r.text and "import" not in r.text


def test_an_upload_filename_is_never_used_as_a_path(server, tmp_path):
    url, _ = server
    target = tmp_path / "planted.png"
    name = "../" * 12 + str(target).lstrip("/")
    r = httpx.post(f"{url}/segment", files={"image": (name, encode(rgb(), "PNG"), "image/png")})
    assert r.status_code == 200 and not target.exists()


def test_error_bodies_carry_no_stack_or_paths(server):
    url, app = server
    bad = [
        dict(content=b"\x89PNG\r\n\x1a\n" + b"\0" * 40, headers={"Content-Type": "image/png"}),
        dict(content=b"II*\0" + b"\xff" * 60, headers={"Content-Type": "image/tiff"}),
        dict(content=b"x", headers={"Content-Type": "application/x-python-pickle"}),
        dict(files={"image": ("x", b"")}),
        dict(params={"task": "<script>", "threshold": "1e999"}, content=b"x", headers={"Content-Type": "image/png"}),
        dict(content=b"--b\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=b"}),
    ]
    responses = [httpx.post(f"{url}/segment", **kw) for kw in bad]
    pipeline = app.state.pipeline
    original = pipeline.run_batch

    def crash(batch):  # an unexpected bug below the request handler, its message full of internals
        raise KeyError(f"{__file__}: object at 0x7f00deadbeef")

    pipeline.batcher.run_batch = crash
    try:
        responses.append(httpx.post(f"{url}/segment", files={"image": ("x", encode(rgb(), "PNG"))}))
    finally:
        pipeline.batcher.run_batch = original
    assert responses[-1].status_code == 500
    for r in responses:
        assert 400 <= r.status_code < 600 and r.headers["content-type"] == "application/json", r.text
        assert set(r.json()) == {"error"} and not LEAKS.search(r.text), r.text


def test_responses_tell_browsers_not_to_sniff(server):
    url, _ = server
    for r in [httpx.get(f"{url}/healthz"), httpx.post(f"{url}/segment", content=b"x")]:
        assert r.headers["x-content-type-options"] == "nosniff"


class Planted:
    """Unpickling this creates `marker`: the proof that a loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors", "model.bin"])
def test_a_pickled_checkpoint_is_refused_without_being_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    weights = tmp_path / name
    weights.write_bytes(pickle.dumps({"state_dict": Planted(marker)}))
    settings = ServeSettings(weights=weights, backend="torch", cache_dir=tmp_path)
    with pytest.raises(Exception) as err:
        Pipeline(settings, Metrics(1)).load()
    assert not marker.exists(), "a checkpoint was unpickled"
    assert str(err.value)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}; every line must be an exact pin."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_normal(name)] = version
    return pins


def off_pin(pins: dict[str, str]) -> list[str]:
    """Installed packages at other versions than their pins (absent ones, e.g. GPU-only packages, are fine)."""
    off = []
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            off.append(f"{name} {installed} is installed, constraints.txt pins {version}")
    return off


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    pins = constraint_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate():
            continue
        assert _normal(req.name) in pins, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pins[_normal(req.name)]), f"the pin of {req.name} breaks {text!r}"
    assert not off_pin(pins)
