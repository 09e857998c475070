"""Class lists shipped as data: name, thing/stuff flag and the dataset's own id for each class."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class ClassList:
    name: str
    names: tuple[str, ...]
    isthing: tuple[bool, ...]
    dataset_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)


def available() -> list[str]:
    return sorted(
        p.name[:-5].replace("_", "-") for p in resources.files(__package__).iterdir() if p.name.endswith(".json")
    )


def load_classes(name: str) -> ClassList:
    """Load a shipped class list by name, e.g. "ade20k-150", "coco-panoptic-133" or "shapes"."""
    file = name.replace("-", "_") + ".json"
    path = resources.files(__package__) / file
    if not path.is_file():
        raise KeyError(f"no class list {name!r}; shipped: {', '.join(available())}")
    data = json.loads(path.read_text())
    entries = data["classes"]
    return ClassList(
        name=data["name"],
        names=tuple(c["name"] for c in entries),
        isthing=tuple(bool(c["isthing"]) for c in entries),
        dataset_ids=tuple(int(c["dataset_id"]) for c in entries),
    )
