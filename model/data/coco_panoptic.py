"""COCO panoptic format: a JSON with images, segments_info and categories, plus a folder of PNGs whose
pixels encode segment ids as R + 256*G + 256^2*B (0 = VOID). Used for COCO and for the shapes dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from model.data.transforms import make_sample


def rgb_to_id(png: np.ndarray) -> np.ndarray:
    png = png.astype(np.int64)
    return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


class CocoPanoptic(Dataset):
    """Items are (image [3, H, W] float 0..255, target) with target keys
    labels [N] (contiguous class index), masks [N, H, W] bool, and image_id."""

    def __init__(
        self,
        image_dir: str | Path,
        panoptic_json: str | Path,
        panoptic_dir: str | Path,
        transforms: v2.Transform | None = None,
    ) -> None:
        self.image_dir, self.panoptic_dir = Path(image_dir), Path(panoptic_dir)
        doc = json.loads(Path(panoptic_json).read_text())
        self.categories = doc["categories"]
        self.contiguous = {c["id"]: i for i, c in enumerate(self.categories)}
        images = {im["id"]: im for im in doc["images"]}
        self.items = [(images[a["image_id"]], a) for a in doc["annotations"]]
        self.transforms = transforms

    @classmethod
    def from_root(cls, root: str | Path, split: str, transforms: v2.Transform | None = None) -> CocoPanoptic:
        """The layout `data shapes` writes: images/<split>/, panoptic_<split>.json, panoptic_<split>/."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found")
        if not (root / f"panoptic_{split}.json").is_file():
            found = ", ".join(sorted(p.stem.removeprefix("panoptic_") for p in root.glob("panoptic_*.json")))
            raise FileNotFoundError(
                f"{root} has no split {split!r} (no panoptic_{split}.json); the splits there: {found or 'none'}"
            )
        return cls(root / "images" / split, root / f"panoptic_{split}.json", root / f"panoptic_{split}", transforms)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    @property
    def isthing(self) -> list[bool]:
        return [bool(c["isthing"]) for c in self.categories]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Raw (RGB image, segment-id map, segments_info) of one item."""
        image_info, ann = self.items[index]
        image = np.array(Image.open(self.image_dir / image_info["file_name"]).convert("RGB"))
        ids = rgb_to_id(np.asarray(Image.open(self.panoptic_dir / ann["file_name"]).convert("RGB")))
        return image, ids, ann["segments_info"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, ids, segments = self.load(index)
        segments = [s for s in segments if not s.get("iscrowd", 0)]
        labels = [self.contiguous[s["category_id"]] for s in segments]
        x, target = make_sample(image, ids, [s["id"] for s in segments], labels, self.transforms)
        target["image_id"] = torch.tensor(self.items[index][0]["id"])
        return x, target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
