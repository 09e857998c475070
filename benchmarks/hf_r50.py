"""A random-init transformers MaskFormer R50 (ADE20K's 150 classes, 512x512) for the baseline comparison.

No pretrained weights can be downloaded here, so both servers serve these same random weights: the
transformers directory for the baseline, and its `maskformer convert --from hf` conversion for ours.

    python benchmarks/hf_r50.py --out /tmp/r50-hf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from model.classes import load_classes


def write(out: Path, size: int = 512, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    ade = load_classes("ade20k-150")
    backbone = transformers.ResNetConfig(  # torchvision's ResNet-50 layout
        layer_type="bottleneck",
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = transformers.MaskFormerConfig(
        backbone_config=backbone,
        id2label=dict(enumerate(ade.names)),
        label2id={n: i for i, n in enumerate(ade.names)},
    )
    model = transformers.MaskFormerForInstanceSegmentation(cfg).eval()
    model.save_pretrained(out)
    image_processor(size).save_pretrained(out)
    return out


def image_processor(size: int = 512) -> transformers.MaskFormerImageProcessor:
    """The baseline's processor: images fit in size x size, as our server's letterbox fits them."""
    return transformers.MaskFormerImageProcessor(
        size={"shortest_edge": size, "longest_edge": size}, size_divisor=32, ignore_index=255
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"wrote {write(args.out, args.size, args.seed)}")


if __name__ == "__main__":
    main()
