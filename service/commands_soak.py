"""`maskformer soak`: the bounded load test of service/soak.py, against a fresh `maskformer serve`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.cli_types import at_least_0, positive


def cmd_soak(args: argparse.Namespace) -> int:
    from service.soak import soak

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    if args.seconds < args.warmup + 2 * args.sample_every:
        raise ValueError(
            f"--seconds {args.seconds:g} leaves under two RSS samples after the {args.warmup:g} s warm-up "
            f"(--sample-every {args.sample_every:g}): run at least {args.warmup + 2 * args.sample_every:g} s"
        )
    result, problems = soak(
        args.out,
        seconds=args.seconds,
        concurrency=args.concurrency,
        sample_s=args.sample_every,
        warmup_s=args.warmup,
        max_rss_growth=args.max_rss_growth,
        image_size=args.image_size,
        port=args.port,
        serve_args=serve_args,
    )
    lat = result["latency_ms_200"]
    print(f"{result['requests']} requests, status mix {result['status_mix']}")
    print(f"200 latency p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms; RSS growth {result['rss_growth']:.1%}")
    if args.out:
        print(f"figures in {args.out}/soak.json, {args.out}/README.md and {args.out}/rss.png")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soak",
        help="load-test a fresh `maskformer serve` with valid and hostile requests; fails on any unexpected answer",
        description="Arguments after `--` go to `maskformer serve` (e.g. -- --backend torch --threads 2).",
    )
    p.add_argument("--seconds", type=positive(float), default=300)
    p.add_argument("--concurrency", type=positive(int), default=32)
    p.add_argument("--sample-every", type=positive(float), default=10, help="seconds between RSS samples")
    p.add_argument("--warmup", type=at_least_0(float), default=60, help="seconds before RSS growth is measured")
    p.add_argument("--max-rss-growth", type=positive(float), default=0.10, help="allowed RSS growth after warm-up")
    p.add_argument("--image-size", type=positive(int), default=256, help="side of the valid images sent")
    p.add_argument("--port", type=int, default=8766, help="port for the server it starts (bench uses 8765)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"), help="where the figures go")
    p.add_argument("serve_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_soak)
