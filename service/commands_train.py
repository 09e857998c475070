"""`maskformer data`, `train` and `eval`: the commands that make and measure models."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from model.data.shapes import TRAIN_SEED, VAL_SEED, write_split

    if not (args.train or args.val):
        raise ValueError("--train 0 --val 0: there is nothing to write")
    for split, count, seed in (("train", args.train, TRAIN_SEED), ("val", args.val, VAL_SEED)):
        if count:
            print(f"wrote {write_split(args.out, split, count, seed)}")
    return 0


# The official configs' optimiser settings per backbone kind; each flag given overrides its entry.
RECIPES = {
    "resnet": {"lr": 1e-4, "weight_decay": 1e-4, "backbone_lr_mult": 0.1, "warmup_steps": 0},
    "swin": {"lr": 6e-5, "weight_decay": 0.01, "backbone_lr_mult": 1.0, "warmup_steps": 1500},
}


def recipe(args: argparse.Namespace, backbone: str) -> dict:
    return {k: default if getattr(args, k) is None else getattr(args, k) for k, default in RECIPES[backbone].items()}


# the default (train, validation) split names of each --format
SPLITS = {"coco-panoptic": ("train", "val"), "ade20k": ("training", "validation")}


def _dataset(fmt: str, root: Path, split: str):
    """coco-panoptic: images/<split>, panoptic_<split>.json, panoptic_<split>/ under root (the layout
    `data shapes` writes). ade20k: the ADEChallengeData2016 folder (splits training, validation)."""
    from model.data.ade20k import ADE20K
    from model.data.coco_panoptic import CocoPanoptic

    dataset = ADE20K(root, split) if fmt == "ade20k" else CocoPanoptic.from_root(root, split)
    if not len(dataset):
        raise ValueError(f"the split {split!r} of {root} has no images")
    return dataset


def cmd_train(args: argparse.Namespace) -> int:
    from model import ModelInfo, build_model, get_preset, load_model
    from model.data.coco_panoptic import collate
    from model.data.transforms import train_transforms
    from model.train import TrainConfig, train

    if not (args.preset or args.init):
        raise ValueError("train needs --preset (a new model) or --init (a checkpoint to start from)")
    train_set = _dataset(args.format, args.data, args.train_split or SPLITS[args.format][0])
    if args.init:
        model = load_model(args.init).train()
    else:
        info = ModelInfo(name=args.name or args.preset, class_names=train_set.class_names, isthing=train_set.isthing)
        model = build_model(get_preset(args.preset).config, info)
    names = model.info.class_names if model.info else []
    if train_set.class_names != names:
        raise ValueError(f"the data's classes {train_set.class_names} are not the model's {names}")
    crop = model.cfg.input_size if args.crop is None else (args.crop, args.crop)
    train_set.transforms = train_transforms(crop, args.min_scale, args.max_scale)
    if args.backbone_weights:
        from model.backbone_weights import load_backbone_weights

        load_backbone_weights(model, args.backbone_weights)
    evaluate = None
    if args.val_split:
        from model.evaluation import evaluate_panoptic_dataset

        val_set = _dataset(args.format, args.data, args.val_split)

        def evaluate(m):  # noqa: F811 - rebinds the optional callback
            return evaluate_panoptic_dataset(m, val_set, limit=args.eval_images)["summary"]

    tc = TrainConfig(
        out_dir=str(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        **recipe(args, model.cfg.backbone.kind),
        clip_grad_norm=args.clip_grad_norm,
        ce_weight=args.ce_weight,
        amp=args.amp,
        num_workers=args.workers,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        overwrite=args.overwrite,
        dist_timeout_min=args.dist_timeout,
    )
    last = train(model, train_set, tc, collate, evaluate=evaluate, resume=args.resume)
    print(json.dumps(last))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from model import load_model
    from model.evaluation import evaluate_panoptic_dataset
    from model.inference import prepare_for_inference

    model = load_model(args.weights)
    names = model.info.class_names if model.info else []
    split = args.split or SPLITS[args.format][1]
    dataset = _dataset(args.format, args.data, split)
    if dataset.class_names != names:
        raise ValueError(f"the data's classes {dataset.class_names} are not the model's {names}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = prepare_for_inference(model, device, args.precision)
    report = evaluate_panoptic_dataset(model, dataset, args.limit, args.batch_size, args.precision)
    digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()
    report = {"weights": args.weights.name, "weights_sha256": digest, "split": split, **report}
    report["precision"], report["device"] = args.precision, device.type
    report["per_class_iou"] = dict(zip(names, report["per_class_iou"]))
    s = report["summary"]
    print(f"{'':8}{'PQ':>7}{'SQ':>7}{'RQ':>7}{'N':>4}")
    for name, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st")):
        print(f"{name:8}{s['PQ' + suffix]:7.2f}{s['SQ' + suffix]:7.2f}{s['RQ' + suffix]:7.2f}{s['N' + suffix]:4d}")
    print(f"mIoU {s['mIoU']:.2f}  pixel accuracy {s['pixel_accuracy']:.2f}  ({s['images']} images)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0
