"""The demo page at GET /, end to end: Debian's Chromium, driven by Playwright, loads it from a live server,
uploads a shapes image, and the canvas must hold the palette's colours where the segments are."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import distance_transform_edt

from model.data.shapes import VAL_SEED, generate
from service import overlay
from service.client import Client
from service.encode import rle_counts_from_map
from service.settings import ServeSettings
from tests.live_server import live_server

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download is never used
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SEED = VAL_SEED + 3


@pytest.fixture
def browser(tmp_path):
    """Debian's Chromium through Playwright, with a fresh profile; skips where either is missing."""
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").sync_playwright
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (./scripts/setup.sh --tests does, as root with apt)")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        try:
            yield context
        finally:
            context.close()


def sample_png(tmp_path):
    """The shapes scene the tests upload, and its PNG file."""
    sample = generate(SEED)
    image_path = tmp_path / "shapes.png"
    Image.fromarray(sample.image).save(image_path)
    return sample, image_path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = ServeSettings(backend="torch", cache_dir=tmp_path_factory.mktemp("cache"), max_batch_size=1)
    with live_server(settings) as (url, _):
        yield url


def test_page_is_served_offline_without_the_api_key(tmp_path):
    settings = ServeSettings(backend="torch", cache_dir=tmp_path, api_key="k", max_batch_size=1, warmup=False)
    with live_server(settings) as (url, _):
        r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script src" not in page and "<link" not in page and "http" not in page.split("<script>")[1]


def interior_points(segment_map: np.ndarray) -> dict[int, tuple[int, int]]:
    """Segment id -> its most interior pixel (y, x), far from any boundary the model might blur."""
    points = {}
    for sid in np.unique(segment_map[segment_map > 0]):
        depth = distance_transform_edt(np.pad(segment_map == sid, 1))[1:-1, 1:-1]
        if depth.max() >= 6:
            points[int(sid)] = tuple(int(v) for v in np.unravel_index(depth.argmax(), depth.shape))
    return points


def test_upload_draws_the_overlay_in_the_browser(server, browser, tmp_path):
    sample, image_path = sample_png(tmp_path)
    page = browser.new_page()
    page.goto(f"{server}/")
    page.select_option("#task", "semantic")
    page.set_input_files("#file", str(image_path))
    semantic = canvas_when_done(page, sample.image.shape[:2])

    # Hovering a segment names it.
    points = interior_points(sample.segment_map)
    y, x = points[1]  # sky
    box = page.locator("canvas").bounding_box()
    assert box is not None
    scale = box["width"] / sample.image.shape[1]
    page.mouse.move(box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale)
    assert page.inner_text("#tip").startswith("sky ")

    page.select_option("#task", "panoptic")  # segments again, now with instance outlines
    panoptic = canvas_when_done(page, sample.image.shape[:2])
    page.select_option("#task", "instance")  # overlapping masks; the page proposes threshold 0.5
    instance = canvas_when_done(page, sample.image.shape[:2])

    # Counts far beyond a 256x256 image's (more 5-bit groups, large negative deltas) decode too.
    big = np.zeros((3000, 4000), np.uint8)
    big[5:2990, 7:3990] = 1
    big[1000:1001, 100:3000] = 0
    big[2999, 3999] = 1
    counts = mask_utils.encode(np.asfortranarray(big))["counts"].decode()
    assert page.evaluate(f"rleCounts({json.dumps(counts)})") == rle_counts_from_map(big, [1])[0]

    # Where the shapes generator put a segment, the canvas shows that class's palette colour blended in.
    category = {s["id"]: s["category_id"] for s in sample.segments}
    for sid, (y, x) in points.items():
        expected = overlay.blend(sample.image[y, x], overlay.color(category[sid] - 1))
        assert semantic[y, x].tolist() == expected.tolist(), (sid, (y, x))
    # And everywhere the page equals service/overlay.py on the same JSON, pixel for pixel.
    with Client(server) as client:
        for task, canvas, threshold in (
            ("semantic", semantic, None),
            ("panoptic", panoptic, None),
            ("instance", instance, 0.5),
        ):
            prediction = client.segment(image_path, task=task, threshold=threshold)
            assert any(s.isthing for s in prediction.segments) or task == "semantic"
            np.testing.assert_array_equal(canvas, np.asarray(prediction.overlay(sample.image, labels=False)), task)


# The page's next POST /segment answer is held back 1.5 s (the fetch still runs; only its answer is late).
DELAY_NEXT_ANSWER = """() => {
  const real = window.fetch;
  let held = false;
  window.fetch = (url, options) => {
    const answer = real(url, options);
    if (held || !String(url).startsWith("segment")) return answer;
    held = true;
    return answer.then((r) => new Promise((resolve) => setTimeout(() => resolve(r), 1500)));
  };
}"""


def test_only_the_latest_request_draws(server, browser, tmp_path):
    # Changing the task while a request is in flight: the older answer, arriving last, must not draw.
    sample, image_path = sample_png(tmp_path)
    page = browser.new_page()
    page.goto(f"{server}/")
    page.set_input_files("#file", str(image_path))
    canvas_when_done(page, sample.image.shape[:2])
    page.evaluate(DELAY_NEXT_ANSWER)
    page.select_option("#task", "instance")  # its answer comes late
    page.select_option("#task", "semantic")
    semantic = canvas_when_done(page, sample.image.shape[:2])
    assert "(semantic, " in page.inner_text("#status")
    page.wait_for_timeout(2500)  # the instance answer has arrived by now
    assert "(semantic, " in page.inner_text("#status"), page.inner_text("#status")
    assert page.get_attribute("body", "data-state") == "done"
    np.testing.assert_array_equal(canvas_when_done(page, sample.image.shape[:2]), semantic)
    rows = page.locator("#segments tbody tr").count()
    with Client(server) as client:
        prediction = client.segment(image_path, task="semantic", threshold=0.5)
    assert rows == len(prediction.segments)
    np.testing.assert_array_equal(semantic, np.asarray(prediction.overlay(sample.image, labels=False)))


def canvas_when_done(page, size: tuple[int, int]) -> np.ndarray:
    """The canvas's RGB pixels once the page has drawn the overlay."""
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=30_000)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")
    h, w = size
    script = f"Array.from(document.getElementById('canvas').getContext('2d').getImageData(0, 0, {w}, {h}).data)"
    return np.array(page.evaluate(script), np.uint8).reshape(h, w, 4)[..., :3]
