"""`maskformer`: one command line for everything. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def cmd_doctor(args: argparse.Namespace) -> int:
    from service.runtime import choose_backend, probe

    caps = probe()
    if args.json:
        backend, reason = choose_backend(caps)
        print(json.dumps({**caps.__dict__, "backend": backend, "backend_reason": reason}, indent=2))
        return 0 if caps.torch else 1
    rows = [
        ("python", caps.python),
        ("torch", caps.torch or "absent"),
        ("torchvision", caps.torchvision or "absent"),
        ("CUDA", ", ".join(caps.gpus) if caps.cuda else "not available"),
        ("onnxruntime", f"{caps.onnxruntime} ({', '.join(caps.ort_providers)})" if caps.onnxruntime else "absent"),
        ("tensorrt", caps.tensorrt or "absent"),
    ]
    backend, reason = choose_backend(caps)
    rows.append(("serve backend", f"{backend}: {reason}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for problem in caps.problems:
        print(f"problem: {problem}")
    return 0 if caps.torch and not caps.problems else 1


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import save_model

    if args.source == "hf":
        from model.convert.hf import convert_hf

        model = convert_hf(args.src, name=args.name)
    else:
        from model.convert.detectron2 import convert_detectron2

        if not args.preset:
            print("error: --from detectron2 needs --preset (the checkpoint does not store its architecture)")
            return 2
        model = convert_detectron2(args.src, args.preset, name=args.name)
    out = save_model(model, args.out, dtype=torch.float16 if args.fp16 else None)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.2f} M parameters, {model.cfg.num_classes} classes)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from model.checkpoint import read_metadata

    cfg, info = read_metadata(args.weights)
    print(json.dumps({"info": info.__dict__, "config": cfg.to_dict()}, indent=2))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from model.config import PRESETS
    from model.maskformer import build_model

    for name, preset in PRESETS.items():
        params = sum(p.numel() for p in build_model(preset.config).parameters()) if args.params else None
        extra = f"  {params / 1e6:6.1f} M" if params else ""
        print(f"{name:22s}{extra}  {preset.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="what this machine can run, and which backend `serve` would choose")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("convert", help="convert transformers or official (detectron2) weights to a checkpoint")
    p.add_argument("--from", dest="source", choices=["hf", "detectron2"], required=True)
    p.add_argument("src", type=Path, help="transformers directory, or detectron2 model_final.pkl")
    p.add_argument("--out", type=Path, required=True, help="destination .safetensors")
    p.add_argument("--preset", help="architecture of a detectron2 checkpoint (see `maskformer presets`)")
    p.add_argument("--name", help="model name stored in the checkpoint (default: the source's name)")
    p.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="print a checkpoint's metadata")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("presets", help="list the model presets")
    p.add_argument("--params", action="store_true", help="also build each preset and count its parameters")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError, KeyError) as err:
        # Our loaders and converters raise these with a message meant for the user.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
