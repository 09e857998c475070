"""Post-processing + RLE per image: ours against transformers' post_process_* + per-mask pycocotools.

Both run on the same logits, one image at a time, alternating so machine noise hits both, and timed in
process CPU time. Two models: the random-init R50 the server benchmark uses and the shipped shapes model
(trained, so its outputs look like a real model's), its logits post-processed at --size x --size and at a
1920x1080 photo's size.
Thresholds are transformers' defaults for both sides (panoptic 0.8, instance 0.5). The R50's class scores
nearly tie everywhere, so nothing passes those: it is also run at threshold 0, where every query's mask is
resized and scored (the most work either side can be given), and its semantic map is also made at a
photo's 480x640 from the whole 512x512 input (our second resize, which the server runs for every upload
whose size is not the input size; transformers resizes all its class scores to that size). Also reports
how often the semantic maps agree with the official order (all mask logits resized first) and with
transformers' order.

    python benchmarks/postprocess_vs_transformers.py --hf /tmp/r50-hf --out benchmarks/results/cpu
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

from model import load_model
from model.data.shapes import VAL_SEED, generate
from model.postprocess import postprocess
from model.semantic_map import semantic_map_reference
from service.encode import encode_result

DEFAULTS = [("semantic", None), ("panoptic", 0.8), ("instance", 0.5)]  # transformers' default thresholds
EVERY_QUERY = [("panoptic", 0.0), ("instance", 0.0)]
PHOTO = (480, 640)  # a 640x480 upload's result size
HD = (1080, 1920)  # a 1920x1080 upload's: many times the shapes model's 256x256 input


def theirs(
    processor, outputs: SimpleNamespace, task: str, threshold: float | None, size: tuple[int, int], names: list[str]
) -> list[dict]:
    """What benchmarks/baseline_server.py does per image."""
    if task == "semantic":
        label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0].numpy()
        pieces = [(label_map == c, int(c)) for c in np.unique(label_map)]
    else:
        post = getattr(processor, f"post_process_{task}_segmentation")
        res = post(outputs, threshold=threshold, target_sizes=[size])[0]
        seg = res["segmentation"].numpy()
        pieces = [(seg == s["id"], s["label_id"]) for s in res["segments_info"]]
    out = []
    for mask, label in pieces:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        out.append({"label": names[label], "area": int(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist()})
    return out


def compare(logits, masks, names: list[str], isthing: list[bool], cases: list, repeats: int) -> dict:
    """cases: (task, threshold, (H, W) result size)."""
    processor = transformers.MaskFormerImageProcessor()
    input_size = (4 * masks.shape[-2], 4 * masks.shape[-1])
    report: dict = {"images": len(logits), "queries": logits.shape[1], "classes": len(names)}
    report["rows"] = rows = []
    for task, threshold, target in cases:
        ours_s, theirs_s, agree_official, agree_hf, counts = [], [], [], [], []
        for i in range(len(logits)):
            one = SimpleNamespace(class_queries_logits=logits[i : i + 1], masks_queries_logits=masks[i : i + 1])
            ours_in = {"pred_logits": logits[i : i + 1], "pred_masks": masks[i : i + 1]}
            for _ in range(repeats):
                t0 = time.process_time()
                res = postprocess(ours_in, task, isthing, orig_sizes=[target], threshold=threshold)[0]
                encode_result(res, names)
                t1 = time.process_time()
                counts.append((len(res.segments), len(theirs(processor, one, task, threshold, target, names))))
                t2 = time.process_time()
                ours_s.append(t1 - t0)
                theirs_s.append(t2 - t1)
            if task == "semantic":
                ref = semantic_map_reference(logits[i], masks[i], input_size, input_size, target)
                hf_map = processor.post_process_semantic_segmentation(one, target_sizes=[target])[0]
                agree_official.append((res.label_map() == ref).float().mean().item())
                agree_hf.append((res.label_map() == hf_map).float().mean().item())
        row = {
            "task": task,
            "threshold": threshold,
            "size": list(target),
            "ours_ms": round(1000 * float(np.median(ours_s)), 2),
            "transformers_ms": round(1000 * float(np.median(theirs_s)), 2),
            "segments_ours_theirs": [float(np.mean([c[0] for c in counts])), float(np.mean([c[1] for c in counts]))],
        }
        row["ratio"] = round(row["ours_ms"] / row["transformers_ms"], 3)
        if agree_official:
            row["agreement_with_official_order"] = min(agree_official)
            row["agreement_with_transformers"] = min(agree_hf)
        rows.append(row)
    return report


def r50_outputs(hf_dir: Path, num_images: int) -> tuple:
    processor = transformers.MaskFormerImageProcessor.from_pretrained(hf_dir)
    model = transformers.MaskFormerForInstanceSegmentation.from_pretrained(hf_dir).eval()
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    with torch.inference_mode():
        pixels = processor(images=[generate(VAL_SEED + i).image for i in range(num_images)], return_tensors="pt")
        out = model(pixel_values=pixels["pixel_values"])
    # every class a thing: neither side merges stuff segments (transformers fuses none unless told which)
    return out.class_queries_logits, out.masks_queries_logits, names, [True] * len(names)


def shapes_outputs(num_images: int) -> tuple:
    model = load_model().eval()
    images = torch.stack([torch.from_numpy(generate(VAL_SEED + i).image).permute(2, 0, 1) for i in range(num_images)])
    with torch.inference_mode():
        out = model(F.interpolate(images.float(), size=model.cfg.input_size, mode="bilinear"))
    return out["pred_logits"], out["pred_masks"], model.info.class_names, model.info.isthing


def markdown(report: dict) -> str:
    lines = [
        f"Post-processing + RLE per image, {report['threads']} thread(s), CPU time, median over images x repeats;",
        "the same logits for both sides.",
        "",
        "| model | task | threshold | output | ours (ms) | transformers + pycocotools (ms) | ours / theirs "
        "| segments (ours, theirs) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for name in ("r50_random", "shapes_trained"):
        m = report[name]
        for r in m["rows"]:
            threshold = "-" if r["threshold"] is None else r["threshold"]
            lines.append(
                f"| {name} ({m['queries']} queries, {m['classes']} classes) | {r['task']} | {threshold} | "
                f"{r['size'][0]}x{r['size'][1]} | {r['ours_ms']} | {r['transformers_ms']} | {r['ratio']} | "
                f"{r['segments_ours_theirs']} |"
            )
    lines.append("")
    for name in ("r50_random", "shapes_trained"):
        for r in report[name]["rows"]:
            if r["task"] == "semantic":
                lines.append(
                    f"Semantic pixel agreement, {name} at {r['size'][0]}x{r['size'][1]} (worst image): with the "
                    f"official order {100 * r['agreement_with_official_order']:.3f} %, with transformers' order "
                    f"{100 * r['agreement_with_transformers']:.3f} %."
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", type=Path, required=True, help="transformers MaskFormer directory (benchmarks/hf_r50.py)")
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=512, help="output size for the shapes model")
    p.add_argument("--tasks", default="semantic,panoptic,instance")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    defaults = [case for case in DEFAULTS if case[0] in tasks]
    report: dict = {"threads": args.threads}
    logits, masks, names, isthing = r50_outputs(args.hf, args.images)
    r50_cases = [(task, t, (512, 512)) for task, t in defaults + [c for c in EVERY_QUERY if c[0] in tasks]]
    r50_cases += [("semantic", None, PHOTO)] if "semantic" in tasks else []
    report["r50_random"] = compare(logits, masks, names, isthing, r50_cases, args.repeats)
    logits, masks, names, isthing = shapes_outputs(args.images)
    shapes_cases = [(task, t, size) for size in [(args.size, args.size), HD] for task, t in defaults]
    report["shapes_trained"] = compare(logits, masks, names, isthing, shapes_cases, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "postprocess.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "postprocess.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
