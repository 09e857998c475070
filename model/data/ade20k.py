"""ADE20K scene parsing (ADEChallengeData2016 layout): images/<split>/*.jpg with annotations/<split>/*.png,
pixel value 0 = ignore and 1..150 = the classes. Semantic training gives one mask per class present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from model.classes import load_classes
from model.data.transforms import make_sample


def _missing(root: Path, split: str) -> str:
    """What is wrong with root for this split, and which splits it has."""
    layout = "expected the ADEChallengeData2016 layout: images/<split>/, annotations/<split>/"
    if not root.is_dir():
        return f"{root} not found ({layout})"
    if (root / "annotations" / split).is_dir():
        return f"{root} has annotations/{split}/ but no images/{split}/ ({layout})"
    ann = root / "annotations"
    found = sorted(p.name for p in ann.iterdir() if p.is_dir()) if ann.is_dir() else []
    return f"{root} has no split {split!r}: the folders in annotations/ are {', '.join(found) or 'none'} ({layout})"


class ADE20K(Dataset):
    """Items are (image [3, H, W] float 0..255, target) like CocoPanoptic's; `load` gives the raw
    (image, id map, segments) the evaluator reads, with one segment per class present (id = class + 1)."""

    def __init__(self, root: str | Path, split: str = "training", transforms: v2.Transform | None = None) -> None:
        root = Path(root)
        self.image_dir, self.ann_dir = root / "images" / split, root / "annotations" / split
        if not (self.image_dir.is_dir() and self.ann_dir.is_dir()):
            raise FileNotFoundError(_missing(root, split))
        self.names = sorted(p.stem for p in self.ann_dir.glob("*.png"))
        classes = load_classes("ade20k-150")
        self.class_names, self.isthing = list(classes.names), list(classes.isthing)
        self.contiguous = {i + 1: i for i in range(len(self.class_names))}
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        name = self.names[index]
        image = np.array(Image.open(self.image_dir / f"{name}.jpg").convert("RGB"))
        ids = np.array(Image.open(self.ann_dir / f"{name}.png"), dtype=np.int64)
        present = [int(v) for v in np.unique(ids) if v != 0]
        return image, ids, [{"id": v, "category_id": v, "iscrowd": 0} for v in present]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, ids, segments = self.load(index)
        ids_list = [s["id"] for s in segments]
        x, target = make_sample(image, ids, ids_list, [i - 1 for i in ids_list], self.transforms)
        target["image_id"] = torch.tensor(index)
        return x, target
