"""`maskformer convert`: transformers or official (detectron2) weights, or one of our checkpoints, to a
checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import save_model

    if args.classes and args.source != "hf":
        print("error: --classes is for --from hf (a preset or checkpoint has its class list)", file=sys.stderr)
        return 2
    read = [p for p in convert_inputs(args) if p.resolve() == args.out.resolve()]
    if read:
        print(f"error: --out {args.out} is {read[0]}, which the conversion reads; write elsewhere", file=sys.stderr)
        return 2
    if args.source == "hf":
        from model.convert.hf import convert_hf

        model = convert_hf(args.src, name=args.name, classes=args.classes)
    elif args.source == "maskformer":
        from model import load_model

        model = load_model(args.src)  # re-save one of ours, e.g. in float16 or under a new name
        if args.name and model.info:
            model.info.name = args.name
    else:
        from model.convert.detectron2 import convert_detectron2

        if not args.preset:
            why = "the checkpoint does not store its architecture"
            print(f"error: --from detectron2 needs --preset ({why})", file=sys.stderr)
            return 2
        model = convert_detectron2(args.src, args.preset, name=args.name)
    out = save_model(model, args.out, dtype=torch.float16 if args.fp16 else None)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.2f} M parameters, {model.cfg.num_classes} classes)")
    return 0


def convert_inputs(args: argparse.Namespace) -> list[Path]:
    """The files a convert reads, which --out must not replace. `--from maskformer` reads its checkpoint whole
    before writing, so it may re-save one in place (e.g. as --fp16)."""
    if args.source == "hf":
        from model.convert.hf import SOURCE_FILES

        return [args.src / name for name in SOURCE_FILES]
    return [args.src] if args.source == "detectron2" else []


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert transformers or official (detectron2) weights to a checkpoint")
    p.add_argument("--from", dest="source", choices=["hf", "detectron2", "maskformer"], required=True)
    p.add_argument(
        "src", type=Path, help="transformers directory, detectron2 model_final.pkl (or .pth), or one of our checkpoints"
    )
    p.add_argument("--out", type=Path, required=True, help="destination .safetensors")
    p.add_argument("--preset", help="architecture of a detectron2 checkpoint (see `maskformer presets`)")
    p.add_argument("--name", help="model name stored in the checkpoint (default: the source's name)")
    p.add_argument(
        "--classes",
        help="--from hf: thing/stuff flags from this shipped class list, e.g. ade20k-150, coco-panoptic-133, shapes "
        "(default: the list whose names match; else every class is a thing)",
    )
    p.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    p.set_defaults(func=cmd_convert)
