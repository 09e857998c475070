"""`maskformer bench`: the model-level sweep, then the server-level sweep, into one report."""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from model.checkpoint import default_weights
from service.cli_types import at_least_0, positive


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def masked(argv: list[str]) -> list[str]:
    """The command line as the report records it: API keys (ours, or in --serve-args) as REDACTED."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("REDACTED")
        elif arg.startswith("--api-key="):
            out.append("--api-key=REDACTED")
        elif "--api-key" in arg and arg != "--api-key":  # inside a --serve-args string
            out.append(re.sub(r"(--api-key[= ])\S+", r"\1REDACTED", arg))
        else:
            out.append(arg)
        hide = arg == "--api-key"
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark backends (model level) and servers under load (server level)",
        description="Writes OUT/bench.json, OUT/bench.md and OUT/bench.png. No timing is asserted.",
    )
    p.add_argument("--weights", type=Path, help="checkpoint (default: the shipped model)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "maskformer")
    g = p.add_argument_group("model level")
    g.add_argument("--skip-model", action="store_true")
    g.add_argument(
        "--variants", help="comma-separated backend[:precision][+compile][+graphs][+unfolded] (default: per device)"
    )
    g.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8])
    g.add_argument("--iters", type=positive(int), default=10, help="timed forward passes per batch size")
    g.add_argument("--warmup", type=at_least_0(int), default=2)
    g = p.add_argument_group("server level")
    g.add_argument("--skip-server", action="store_true")
    g.add_argument("--url", help="measure this running server instead of starting `maskformer serve`")
    g.add_argument("--api-key", help="bearer token for the servers measured (a --url one, or ours started with it)")
    g.add_argument(
        "--serve-args",
        action="append",
        help="extra `maskformer serve` flags, e.g. '--backend torch'; repeat it to measure several configurations",
    )
    g.add_argument("--baseline", type=Path, help="transformers model directory: also measure the naive baseline")
    g.add_argument("--port", type=int, default=8765, help="first port of the servers this command starts (one each)")
    g.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64])
    g.add_argument("--requests", type=positive(int), default=128, help="most requests per concurrency level")
    g.add_argument("--seconds", type=positive(float), default=60, help="most seconds per concurrency level")
    g.add_argument("--task", choices=["semantic", "panoptic", "instance"], default="semantic")
    g.add_argument("--image-size", type=positive(int), default=512, help="side of the square JPEGs sent")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from service.bench import load, report
    from service.bench.model_bench import bench_models, default_variants, parse_variant

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    weights = args.weights or default_weights()
    variants = args.variants.split(",") if args.variants else default_variants()
    try:
        for v in variants:
            parse_variant(v)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result: dict = {
        "kind": "maskformer-bench",
        "version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "maskformer " + " ".join(shlex.quote(a) for a in masked(args.argv)),
        "machine": report.machine(),
    }
    if not args.skip_model:
        print(f"model level: {weights}")
        result["model"] = bench_models(weights, variants, args.batch_sizes, args.iters, args.warmup, args.cache_dir)
        if not args.skip_server:  # kept if the server level is cut short (a time-limited GPU lease, say)
            report.write(result, args.out)
    if not args.skip_server:
        images = load.sample_images(8, args.image_size)
        servers = []
        level = (args.task, args.concurrency, args.requests, args.seconds)
        if args.url:
            print(f"server level: {args.url}")
            backend = load.server_backend(args.url, args.api_key)
            if backend is None:
                print(f"warning: {args.url}/v1/model did not say what it runs; no comparison with its raw backend")
            rows = load.sweep(args.url, images, *level, api_key=args.api_key)
            servers.append({"name": "maskformer", "url": args.url, "backend": backend, "rows": rows})
        else:
            servers = _interleaved_servers(args, weights, images, level)
        result["server"] = {
            "task": args.task,
            "image_size": args.image_size,
            "max_requests": args.requests,
            "max_seconds": args.seconds,
            "servers": servers,
            "ratios": report.ratios(servers),
            "efficiency": report.efficiency(servers, result.get("model")),
            "ceiling_ratios": report.ceiling_ratios(servers, result.get("model")),
        }
    paths = report.write(result, args.out)
    for path in paths:
        print(f"wrote {path}")
    if "server" in result and not any(p.suffix == ".png" for p in paths):
        print("no plot: matplotlib is not installed (pip install 'maskformer-serving[bench]')")
    return 0


def _interleaved_servers(args: argparse.Namespace, weights: Path, images: list[bytes], level: tuple) -> list[dict]:
    """Every server up at once on its own port, measured in turn at each concurrency level.

    Shared machines speed up and slow down over minutes; taking each level from all servers back to back
    lets that drift hit them alike, instead of favouring whichever server happened to run first.
    """
    from service.bench import load, report

    task, concurrency, max_requests, max_seconds = level
    servers: list[dict] = []
    commands: list[list[str]] = []
    for i, serve_args in enumerate(args.serve_args or [""]):
        extra = ["--cache-dir", str(args.cache_dir), *shlex.split(serve_args)]
        servers.append({"name": f"maskformer {serve_args}".strip(), "command": extra, "rows": []})
        commands.append(load.serve_command(weights, args.port + i, extra))
    if args.baseline:
        servers.append({"name": report.BASELINE, "model": str(args.baseline), "rows": []})
        commands.append(load.baseline_command(args.baseline, args.port + len(commands)))
    with ExitStack() as stack:
        for i, (server, command) in enumerate(zip(servers, commands)):
            print(f"server level: starting {server['name']} on port {args.port + i}")
            log = args.out / f"server-{i}.log"
            stack.enter_context(load.ServerProcess(command, f"http://127.0.0.1:{args.port + i}", log))
            if server["name"] != report.BASELINE:
                server["backend"] = load.server_backend(f"http://127.0.0.1:{args.port + i}", args.api_key)
                if server["backend"] is None:
                    print(f"warning: {server['name']} did not say what it runs (GET /v1/model); see {log}")
        for c in concurrency:
            for i, server in enumerate(servers):
                url = f"http://127.0.0.1:{args.port + i}"

                def progress(line: str, name: str = server["name"]) -> None:
                    print(f"{name}: {line.strip()}")

                server["rows"] += load.sweep(
                    url, images, task, [c], max_requests, max_seconds, api_key=args.api_key, progress=progress
                )
    return servers
