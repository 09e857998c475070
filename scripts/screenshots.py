"""Regenerates the README's pictures: the demo page in Chromium (through Playwright) and a predict overlay.

Run `.venv/bin/python scripts/screenshots.py`; it needs /usr/bin/chromium (`./scripts/setup.sh --tests`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.data.shapes import VAL_SEED, generate  # noqa: E402
from service.cli import main as cli  # noqa: E402
from service.settings import ServeSettings  # noqa: E402
from tests.live_server import live_server  # noqa: E402

OUT = ROOT / "docs" / "images"
SEED = VAL_SEED + 1


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / f"shapes-{SEED}.png"
        Image.fromarray(generate(SEED).image).save(image)
        cli(["predict", str(image), "--task", "panoptic", "--backend", "torch", "--out", f"{tmp}/overlays"])
        Image.open(Path(tmp) / "overlays" / image.name).save(OUT / "overlay-panoptic.png", optimize=True)

        settings = ServeSettings(backend="torch", cache_dir=Path(tmp), max_batch_size=1)  # type: ignore[call-arg]
        with live_server(settings) as (url, _), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1040, "height": 820})
            page.goto(f"{url}/")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.body.dataset.state === 'done'")
            box = page.locator("canvas").bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] * 0.62, box["y"] + box["height"] * 0.72)  # hover a circle
            page.screenshot(path=str(OUT / "demo-page.png"))
            browser.close()
    print(f"wrote {OUT / 'overlay-panoptic.png'} and {OUT / 'demo-page.png'}")


if __name__ == "__main__":
    main()
