"""`maskformer predict`: overlay pictures (and the service's JSON) for images, folders and globs.

In-process it runs the service's own Pipeline (decode -> batcher -> backend -> post-process -> encode), so
`--json` prints exactly what POST /segment answers; `--server URL` asks a running service instead.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from service.cli_types import unit_interval

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
Segmenter = Callable[[bytes], Awaitable[dict[str, Any]]]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="overlay PNGs (or --json) for images, folders and globs")
    p.add_argument("images", nargs="+", help="image files, folders (their images, recursively) or globs")
    p.add_argument("--task", choices=["semantic", "panoptic", "instance"], default="panoptic")
    p.add_argument("--out", type=Path, help="folder for the overlay PNGs (default: overlays/, none with --json)")
    p.add_argument("--json", action="store_true", help="print the service's JSON ({'results': [...]} for several)")
    p.add_argument("--server", help="send the images to this running service (e.g. http://localhost:8000)")
    p.add_argument("--api-key", help="with --server: the service's API key")
    p.add_argument("--weights", type=Path, help="in-process: checkpoint (default: the shipped default model)")
    p.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="in-process: images per forward pass")
    p.add_argument("--threshold", type=unit_interval, help="panoptic object-mask / instance score threshold (0..1)")
    p.add_argument("--overlap-threshold", type=unit_interval, help="panoptic: least kept fraction of a mask (0..1)")
    p.add_argument(
        "--min-score",
        type=unit_interval,
        help="draw only segments scoring at least this, 0..1 (default: 0.5 for instance, else 0); --json is unaffected",
    )
    p.add_argument("--no-labels", action="store_true", help="draw masks and legend without text on the picture")
    p.set_defaults(func=cmd_predict)


def expand_inputs(patterns: list[str], skip: Path | None = None) -> list[Path]:
    """Files as given, folders' images (recursively, sorted), glob matches (sorted); each file once, however
    its path is spelled. A folder or glob leaves out what lies under `skip` where `skip` is a folder inside
    the one it walks: the overlays an earlier run wrote there (`predict .` twice)."""
    files: dict[Path, Path] = {}  # resolved -> as given
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found = _outside(found, skip, path)
        elif path.is_file():
            found = [path]
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            root = Path(*[part for part in itertools.takewhile(lambda x: not glob.has_magic(x), path.parts)])
            found = _outside(found, skip, root)
        else:
            raise FileNotFoundError(f"{pattern}: no such file or folder")
        if not found:
            raise FileNotFoundError(f"{pattern}: no images there")
        for f in found:
            files.setdefault(f.resolve(), f)
    return list(files.values())


def _outside(found: list[Path], skip: Path | None, root: Path) -> list[Path]:
    """`found` less what lies under `skip`, where `skip` is strictly inside `root`."""
    if skip is None:
        return found
    skip_at, root_at = skip.resolve(), root.resolve()
    if skip_at == root_at or not skip_at.is_relative_to(root_at):
        return found
    return [f for f in found if not f.resolve().is_relative_to(skip_at)]


def overlay_names(files: list[Path]) -> list[str]:
    """`stem.png` per input; a name taken before gets `-2`, `-3`, ... so nothing is overwritten."""
    taken: set[str] = set()
    names = []
    for f in files:
        name, n = f"{f.stem}.png", 1
        while name in taken:
            n += 1
            name = f"{f.stem}-{n}.png"
        taken.add(name)
        names.append(name)
    return names


async def _run(files: list[Path], segment: Segmenter, on_done: Callable[[int, bytes, Any], None], jobs: int) -> None:
    """Segment every file, `jobs` at a time (so the batcher can fill batches), calling on_done as each ends."""
    from service.errors import ApiError

    limit = asyncio.Semaphore(jobs)

    async def one(i: int, path: Path) -> None:
        async with limit:
            data = b""
            result: Any
            try:
                data = await asyncio.to_thread(path.read_bytes)
                result = await segment(data)
            except ApiError as err:
                result = err.message
            except OSError as err:
                result = f"could not read it: {err.strerror or err}"
            except Exception as err:  # ServiceError, httpx's transport errors: their text says what failed
                result = str(err)
            await asyncio.to_thread(on_done, i, data, result)

    await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))


async def _in_process(args: argparse.Namespace, files: list[Path], on_done: Callable) -> None:
    from service.metrics import Metrics
    from service.pipeline import Options, Pipeline
    from service.settings import ServeSettings

    settings = ServeSettings(
        weights=args.weights,
        backend=args.backend,
        device=args.device,
        max_batch_size=args.batch_size,
        max_queue_size=max(64, 2 * args.batch_size),
        warmup=False,
    )  # type: ignore[call-arg]
    pipeline = Pipeline(settings, Metrics(settings.max_batch_size))
    await asyncio.to_thread(pipeline.load)
    pipeline.start()
    overlap = settings.overlap_threshold if args.overlap_threshold is None else args.overlap_threshold
    options = Options(args.task, args.threshold, overlap, None)

    async def segment(data: bytes) -> dict[str, Any]:
        return await pipeline.segment(data, options, deadline=time.monotonic() + 3600)

    try:
        await _run(files, segment, on_done, jobs=2 * args.batch_size)
    finally:
        await pipeline.drain()


async def _remote(args: argparse.Namespace, files: list[Path], on_done: Callable) -> None:
    from service.client import AsyncClient

    async with AsyncClient(args.server, api_key=args.api_key, timeout=120) as client:

        async def segment(data: bytes) -> dict[str, Any]:
            return await client.segment_json(data, args.task, args.threshold, args.overlap_threshold)

        await _run(files, segment, on_done, jobs=4)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.atomic_write import replace_atomically
    from service.client import Prediction, load_rgb

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    out = args.out or (None if args.json else Path("overlays"))
    files = expand_inputs(args.images, skip=out or Path("overlays"))  # never a run's overlays as inputs
    names = overlay_names(files)
    if out:
        inputs = {f.resolve() for f in files}
        for name in names:
            if (out / name).resolve() in inputs:
                raise ValueError(f"the overlay {out / name} would overwrite an input image; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    # Instance results keep every query by default; most are faint duplicates that would bury the picture.
    min_score = args.min_score if args.min_score is not None else (0.5 if args.task == "instance" else 0.0)
    results: list[dict[str, Any] | None] = [None] * len(files)
    failures = []
    progress = tqdm(total=len(files), unit="img", desc=args.task, file=sys.stderr)

    def on_done(i: int, data: bytes, result: dict[str, Any] | str) -> None:
        if isinstance(result, str):
            failures.append(f"{files[i]}: {result}")
        else:
            results[i] = result
            if out:
                try:
                    draw(data, result, out / names[i])
                except Exception as err:  # one picture that cannot be drawn or written stops no other
                    failures.append(f"{files[i]}: no overlay written to {out / names[i]}: {err}")
        progress.update()

    def draw(data: bytes, result: dict[str, Any], path: Path) -> None:
        prediction = Prediction.from_json(result)
        prediction.segments = [s for s in prediction.segments if s.score >= min_score]
        picture = prediction.render(load_rgb(data), labels=not args.no_labels)
        replace_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))  # never a truncated PNG

    try:
        runner = _remote if args.server else _in_process
        asyncio.run(runner(args, files, on_done))
    finally:
        progress.close()
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if args.json:
        if len(files) > 1:
            print(json.dumps({"results": results}))  # null where an image failed
        elif results[0] is not None:
            print(json.dumps(results[0]))
    if out:
        print(f"wrote {len(files) - len(failures)} overlays to {out}", file=sys.stderr)
    return 1 if failures else 0
