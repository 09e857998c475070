"""Post-processing + RLE per image: ours against transformers' post_process_* + per-mask pycocotools.

Both run on the same logits (the transformers model's own outputs for the same images), on this process's
CPU threads, alternating image by image so machine noise hits both. Also reports how often our semantic
maps agree with the official order (all mask logits resized first) and with transformers'.

    python benchmarks/postprocess_vs_transformers.py --hf /tmp/r50-hf --images 8 --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from pycocotools import mask as mask_utils

from model.data.shapes import VAL_SEED, generate
from model.mask_resize import resize_mask_logits
from model.postprocess import postprocess
from model.semantic_map import semantic_map_reference
from service.encode import encode_result


def theirs(processor, outputs: SimpleNamespace, task: str, size: tuple[int, int], names: dict) -> list[dict]:
    """What benchmarks/baseline_server.py does per image."""
    if task == "semantic":
        label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0].numpy()
        pieces = [(label_map == c, int(c)) for c in np.unique(label_map)]
    else:
        post = getattr(processor, f"post_process_{task}_segmentation")
        res = post(outputs, target_sizes=[size])[0]
        seg = res["segmentation"].numpy()
        pieces = [(seg == s["id"], s["label_id"]) for s in res["segments_info"]]
    out = []
    for mask, label in pieces:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        out.append({"label": names[label], "area": int(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist()})
    return out


def run(hf_dir: Path, num_images: int, tasks: list[str], repeats: int) -> dict:
    processor = transformers.MaskFormerImageProcessor.from_pretrained(hf_dir)
    model = transformers.MaskFormerForInstanceSegmentation.from_pretrained(hf_dir).eval()
    names = model.config.id2label
    class_names = [names[i] for i in range(len(names))]
    isthing = [True] * len(names)  # thing flags only change panoptic stuff merging; timing is what counts here
    size = (processor.size["shortest_edge"],) * 2
    report: dict = {"model": str(hf_dir), "images": num_images, "size": list(size), "threads": torch.get_num_threads()}
    with torch.inference_mode():
        batch = [generate(VAL_SEED + i).image for i in range(num_images)]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixels)
        logits, masks = out.class_queries_logits, out.masks_queries_logits
        for task in tasks:
            ours_s, theirs_s, agree_official, agree_hf = [], [], [], []
            for i in range(num_images):
                one = SimpleNamespace(class_queries_logits=logits[i : i + 1], masks_queries_logits=masks[i : i + 1])
                ours_args = ({"pred_logits": logits[i : i + 1], "pred_masks": masks[i : i + 1]}, task, isthing)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    res = postprocess(*ours_args)[0]
                    encode_result(res, class_names)
                    t1 = time.perf_counter()
                    theirs(processor, one, task, size, names)
                    t2 = time.perf_counter()
                    ours_s.append(t1 - t0)
                    theirs_s.append(t2 - t1)
                if task == "semantic":
                    full = resize_mask_logits(masks[i], size, size, size)
                    ref = semantic_map_reference(logits[i], full)
                    hf_map = processor.post_process_semantic_segmentation(one, target_sizes=[size])[0]
                    agree_official.append((res.label_map() == ref).float().mean().item())
                    agree_hf.append((res.label_map() == hf_map).float().mean().item())
            row = {
                "ours_ms": 1000 * float(np.median(ours_s)),
                "transformers_ms": 1000 * float(np.median(theirs_s)),
            }
            row["ratio"] = row["ours_ms"] / row["transformers_ms"]
            if agree_official:
                row["agreement_with_official_order"] = min(agree_official)
                row["agreement_with_transformers"] = min(agree_hf)
            report[task] = row
    return report


def agreement_on_default_model(num_images: int) -> float:
    """The same agreement on the shipped, trained model, whose maps have real boundaries."""
    from model import load_model

    model = load_model().eval()
    size = model.cfg.input_size
    worst = 1.0
    with torch.inference_mode():
        for i in range(num_images):
            image = torch.from_numpy(generate(VAL_SEED + i).image).permute(2, 0, 1).float()[None]
            out = model(F.interpolate(image, size=size, mode="bilinear"))
            (res,) = postprocess(out, "semantic", model.info.isthing)
            ref = semantic_map_reference(
                out["pred_logits"][0], resize_mask_logits(out["pred_masks"][0], size, size, size)
            )
            worst = min(worst, (res.label_map() == ref).float().mean().item())
    return worst


def markdown(report: dict) -> str:
    lines = [
        f"Post-processing + RLE per image, {report['size'][0]}x{report['size'][1]}, median of "
        f"{report['images']} images, {report['threads']} threads (same logits for both)",
        "",
        "| task | ours (ms) | transformers + pycocotools (ms) | ours / theirs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for task in ("semantic", "panoptic", "instance"):
        if task in report:
            r = report[task]
            lines.append(f"| {task} | {r['ours_ms']:.1f} | {r['transformers_ms']:.1f} | {r['ratio']:.3f} |")
    if "semantic" in report:
        r = report["semantic"]
        lines += [
            "",
            "Semantic pixel agreement (worst image): "
            f"with the official order {100 * r['agreement_with_official_order']:.2f} %, "
            f"with transformers' order {100 * r['agreement_with_transformers']:.2f} %; with the official order on the "
            f"shipped shapes model {100 * report['agreement_default_model']:.2f} %.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", type=Path, required=True, help="transformers MaskFormer directory (benchmarks/hf_r50.py)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", default="semantic,panoptic,instance")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    report = run(args.hf, args.images, args.tasks.split(","), args.repeats)
    report["agreement_default_model"] = agreement_on_default_model(args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "postprocess.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "postprocess.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
