"""`maskformer`: one command line for everything. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from service.cli_types import at_least_0, positive
from service.commands_bench import add_parser as add_bench_parser
from service.commands_convert import add_parser as add_convert_parser
from service.commands_predict import add_parser as add_predict_parser
from service.commands_soak import add_parser as add_soak_parser
from service.commands_train import cmd_data_shapes, cmd_eval, cmd_train


def cmd_doctor(args: argparse.Namespace) -> int:
    from service.runtime import choose_backend, driver_requirement, probe

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
        ("CUDA build", driver_requirement(caps.cuda_build) or "none (a CPU-only torch)"),
        ("CPU bf16", "yes (AMX or AVX512-BF16: --backend torch --precision bf16)" if caps.cpu_bf16 else "no"),
        ("onnxruntime", f"{caps.onnxruntime} ({', '.join(caps.ort_providers)})" if caps.onnxruntime else "absent"),
        ("tensorrt", caps.tensorrt or "absent (GPU nodes: pip install '.[gpu]'; export tensorrt needs it)"),
    ]
    backend, reason = choose_backend(caps)
    rows.append(("serve backend", f"{backend}: {reason}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for problem in caps.problems:
        print(f"problem: {problem}")
    return 0 if caps.torch and not caps.problems else 1


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


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from export.onnx import export_onnx, parity_report, write_report
    from model import load_model
    from model.atomic_write import temporary_beside

    out: Path = args.out
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the .onnx file to write")
    out.parent.mkdir(parents=True, exist_ok=True)  # before the export, so a bad folder fails at once
    model = load_model(args.weights)
    height, width = model.cfg.input_size
    size = (height if args.height is None else args.height, width if args.width is None else args.width)
    # Written beside OUT and moved over it only once parity passes: OUT and OUT.json never disagree, and a
    # failing or interrupted re-export leaves the previous model in place.
    with temporary_beside(out) as tmp:
        export_onnx(
            model,
            tmp,
            size,
            args.max_batch,
            args.opset,
            simplify=not args.no_simplify,
            fp16=args.fp16,
            fold_mask_conv=args.fold_mask_conv,
        )
        report = parity_report(model, tmp, batches=tuple(sorted({1, args.max_batch})))
        target = out if report.passed else out.with_name(f"{out.stem}.failed{out.suffix}")
        Path(f"{target}.json").unlink(missing_ok=True)  # no moment where an old report sits beside a new model
        os.replace(tmp, target)
    sidecar = write_report(report, target)
    for batch, r in report.batches.items():
        print(
            f"batch {batch:>3}: max |diff| logits {r['max_abs_diff_pred_logits']:.2e}, "
            f"masks {r['max_abs_diff_pred_masks']:.2e}; semantic agreement {100 * r['semantic_agreement']:.3f} %"
        )
    print(f"wrote {target} and {sidecar}")
    if not report.passed:
        kept = f"; {out} is unchanged" if out.exists() else ""
        print(f"FAILED: the {report.precision} graph misses {report.pass_rule}{kept}", file=sys.stderr)
        return 1
    return 0


def cmd_export_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt import TensorRTUnavailable, build_engine

    try:
        sidecar = build_engine(
            args.onnx,
            args.out,
            args.min_batch,
            args.opt_batch,
            args.max_batch,
            args.fp16,
            args.workspace_gib,
            args.timing_cache,
        )
    except TensorRTUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({sidecar.precision}, {sidecar.gpu_name}, TensorRT {sidecar.tensorrt_version})")
    if args.verify:
        from export.tensorrt import verify_engine

        results = verify_engine(args.out, args.onnx, tuple(sorted({1, args.max_batch})))
        Path(str(args.out) + ".verify.json").write_text(json.dumps(results, indent=2) + "\n")
        for batch, r in results.items():
            print(
                f"verify batch {batch:>3}: max |diff| logits {r['max_abs_diff_pred_logits']:.2e}; "
                f"semantic agreement {100 * r['semantic_agreement']:.3f} %"
            )
        target = 0.99 if sidecar.precision == "fp16" else 0.999
        if min(r["semantic_agreement"] for r in results.values()) < target:
            print(f"FAILED: semantic agreement below {target:.1%}", file=sys.stderr)
            return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve
    from service.settings import serve_settings

    serve(serve_settings(args.settings))
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    from export.triton import write_repository

    config = write_repository(
        args.onnx,
        args.repo,
        args.name,
        args.engine,
        args.max_batch,
        args.max_queue_delay_us,
        args.instances,
        gpu=not args.cpu,
    )
    print(f"wrote {config}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="what this machine can run, and which backend `serve` would choose")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    add_convert_parser(sub)

    p = sub.add_parser("data", help="generate datasets")
    data = p.add_subparsers(dest="dataset", required=True)
    d = data.add_parser("shapes", help="the synthetic shapes dataset (spec v1) in COCO panoptic format")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--train", type=at_least_0(int), default=4000, help="training images (seeds 0..N-1)")
    d.add_argument("--val", type=at_least_0(int), default=500, help="validation images (seeds 1000000..)")
    d.set_defaults(func=cmd_data_shapes)

    p = sub.add_parser("train", help="train a model (single process, or multi-GPU/multi-node under torchrun)")
    p.add_argument("--preset", help="architecture of a new model (see `maskformer presets`); or --init")
    p.add_argument("--data", type=Path, required=True, help="dataset root (see --format)")
    p.add_argument(
        "--format",
        choices=["coco-panoptic", "ade20k"],
        default="coco-panoptic",
        help="coco-panoptic: the layout `data shapes` writes; ade20k: ADEChallengeData2016",
    )
    p.add_argument("--train-split", help="default: train (coco-panoptic), training (ade20k)")
    p.add_argument("--val-split", help="evaluate on this split during and after training")
    p.add_argument("--eval-images", type=positive(int), help="evaluate on the first N validation images only")
    p.add_argument("--out", type=Path, required=True, help="output folder: model.safetensors, last.pt, metrics.jsonl")
    p.add_argument("--name", help="model name stored in the checkpoint")
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights")
    p.add_argument("--resume", type=Path, help="resume from a last.pt training state")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds another run, deleting its metrics.jsonl, tensorboard/ and last.pt",
    )
    p.add_argument("--backbone-weights", type=Path, help="local ImageNet weights (torchvision or timm state dict)")
    p.add_argument("--steps", type=positive(int), default=160_000)
    p.add_argument("--batch-size", type=positive(int), default=16, help="global batch size")
    p.add_argument("--lr", type=positive(float), help="default: 1e-4, or 6e-5 for Swin (the official configs)")
    p.add_argument("--weight-decay", type=at_least_0(float), help="default: 1e-4, or 0.01 for Swin")
    p.add_argument("--backbone-lr-mult", type=at_least_0(float), help="default: 0.1, or 1.0 for Swin")
    p.add_argument(
        "--warmup-steps",
        type=at_least_0(int),
        help="linear lr warm-up from lr x 1e-6 over this many steps; default: 0, or 1500 for Swin",
    )
    p.add_argument("--clip-grad-norm", type=positive(float), default=0.01)
    p.add_argument("--ce-weight", type=at_least_0(float), default=1.0, help="classification loss weight (official: 1)")
    p.add_argument("--crop", type=positive(int), help="square training crop (default: the preset's input size)")
    p.add_argument("--min-scale", type=positive(float), default=0.5)
    p.add_argument("--max-scale", type=positive(float), default=2.0)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto")
    p.add_argument("--workers", type=at_least_0(int), default=2)
    p.add_argument("--seed", type=at_least_0(int), default=0)
    p.add_argument("--eval-every", type=at_least_0(int), default=0, help="steps; 0: at the end only")
    p.add_argument("--checkpoint-every", type=positive(int), default=1000)
    p.add_argument(
        "--dist-timeout",
        type=positive(float),
        default=180.0,
        metavar="MIN",
        help="DDP: minutes a process waits for the others, e.g. for rank 0's evaluation (default: 180)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="PQ/SQ/RQ and mIoU of a checkpoint on a COCO-panoptic-format split")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset root (see --format)")
    p.add_argument("--format", choices=["coco-panoptic", "ade20k"], default="coco-panoptic")
    p.add_argument("--split", help="default: val (coco-panoptic), validation (ade20k)")
    p.add_argument("--limit", type=positive(int), help="only the first N images")
    p.add_argument("--batch-size", type=positive(int), default=8)
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="forward pass precision, as `serve --backend torch` runs it (post-processing stays fp32)",
    )
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint for deployment")
    targets = p.add_subparsers(dest="target", required=True)
    e = targets.add_parser("onnx", help="ONNX (dynamic batch, uint8 input) plus a parity report against PyTorch")
    e.add_argument("--weights", type=Path, help="checkpoint (default: the shipped default model)")
    e.add_argument("--out", type=Path, required=True, help="destination .onnx; the report goes to OUT.json")
    e.add_argument("--height", type=int, help="static input height (default: the checkpoint's input size)")
    e.add_argument("--width", type=int, help="static input width (default: the checkpoint's input size)")
    e.add_argument("--max-batch", type=int, default=8, help="largest batch the graph is checked at")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17 keeps LayerNorm one node)")
    e.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    e.add_argument(
        "--fp16", action="store_true", help="FP16 graph for TensorRT's strongly typed networks (norms etc. in FP32)"
    )
    e.add_argument(
        "--fold-mask-conv",
        action="store_true",
        help="fold the mask head into the last conv: fewer FLOPs for ONNX Runtime on the CPU (not for TensorRT)",
    )

    e.set_defaults(func=cmd_export_onnx)
    e = targets.add_parser("tensorrt", help="a TensorRT engine from the ONNX (GPU nodes with TensorRT only)")
    e.add_argument("--onnx", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True, help="destination .engine; the sidecar goes to OUT.json")
    e.add_argument("--min-batch", type=int, default=1)
    e.add_argument("--opt-batch", type=int, default=4)
    e.add_argument("--max-batch", type=int, default=8)
    e.add_argument(
        "--fp16",
        action="store_true",
        help="FP16 with LayerNorm, softmax and the mask product in FP32 (TensorRT 10); needed for an FP16 ONNX",
    )
    e.add_argument("--workspace-gib", type=float, default=4.0)
    e.add_argument("--timing-cache", type=Path, help="read and update this timing cache file")
    e.add_argument(
        "--verify", action="store_true", help="compare the engine with ONNX Runtime (report in OUT.verify.json)"
    )
    e.set_defaults(func=cmd_export_tensorrt)
    e = targets.add_parser("triton", help="a Triton model repository (config.pbtxt) for the ONNX or its engine")
    e.add_argument("--onnx", type=Path, required=True, help="the exported ONNX (shapes and metadata come from it)")
    e.add_argument("--out", "--repo", dest="repo", type=Path, required=True, help="model repository folder")
    e.add_argument("--name", default="maskformer")
    e.add_argument("--engine", type=Path, help="serve this TensorRT engine (tensorrt_plan) instead of the ONNX")
    e.add_argument("--max-batch", type=int, default=8)
    e.add_argument("--max-queue-delay-us", type=int, default=5000)
    e.add_argument("--instances", type=int, default=1)
    e.add_argument("--cpu", action="store_true", help="KIND_CPU instances (ONNX only)")
    e.set_defaults(func=cmd_export_triton)

    p = sub.add_parser(
        "serve", add_help=False, help="serve POST /segment over HTTP (flags or MASKFORMER_* env; serve --help)"
    )
    p.add_argument("settings", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_serve)

    add_predict_parser(sub)
    add_bench_parser(sub)
    add_soak_parser(sub)

    p = sub.add_parser("info", help="print a checkpoint's metadata")
    p.add_argument("weights", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("presets", help="list the model presets")
    p.add_argument("--params", action="store_true", help="also build each preset and count its parameters")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # pydantic-settings parses serve's flags (argparse would eat --help)
        return _reporting_errors(cmd_serve, argparse.Namespace(settings=argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    return _reporting_errors(args.func, args)


def _reporting_errors(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return int(command(args))
    except (OSError, ValueError, KeyError) as err:
        # Our loaders and converters raise these with a message meant for the user; OSError's name the path.
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2


def _message(err: Exception) -> str:
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if "\nOriginal Traceback" in message:
        # re-raised from a DataLoader worker with the worker's traceback: its last line is the error itself
        logging.debug("%s", message)
        return message.rstrip().splitlines()[-1]
    return message


if __name__ == "__main__":
    sys.exit(main())
