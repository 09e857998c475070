"""The bench report: one JSON file, a markdown table and a PNG plot (matplotlib, when installed)."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Literal

import torch

from service.metrics import STAGES


def machine() -> dict:
    versions = {}
    for package in ("torch", "onnxruntime", "tensorrt", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        # the widest vector instructions torch's kernels use here (AVX2, AVX512, ...): results move with it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": versions,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


BASELINE = "transformers-baseline"


def ratios(servers: list[dict]) -> list[dict]:
    """Each of our servers' img/s over the baseline's, at each concurrency both ran."""
    base = next((s for s in servers if s["name"] == BASELINE), None)
    if base is None:
        return []
    base_rows = {r["concurrency"]: r for r in base["rows"]}
    out = []
    for s in servers:
        if s is base:
            continue
        for r in s["rows"]:
            b = base_rows.get(r["concurrency"])
            if b and b["img_per_s"] > 0:
                ratio = round(r["img_per_s"] / b["img_per_s"], 3)
                out.append({"server": s["name"], "concurrency": r["concurrency"], "throughput_ratio": ratio})
    return out


def ceiling_ratios(servers: list[dict], model: dict | None) -> list[dict]:
    """The forward pass's img/s at the measured matmul rates over the baseline's img/s at each concurrency.

    Near or below 2 in fp32, doubling the baseline on this machine takes less arithmetic (or another
    precision), not a faster fp32 server.
    """
    base = next((s for s in servers if s["name"] == BASELINE), None)
    if base is None or not model or not model.get("ceiling_img_per_s"):
        return []
    return [
        {"ceiling": key, "concurrency": r["concurrency"], "ratio": round(value / r["img_per_s"], 3)}
        for key, value in model["ceiling_img_per_s"].items()
        for r in base["rows"]
        if r["img_per_s"] > 0
    ]


def efficiency(servers: list[dict], model: dict | None) -> list[dict]:
    """Each of our servers' img/s over its own backend's raw img/s at the server's max batch size, from the
    model-level rows of the same variant (backend, precision, compile, CUDA graphs, folded mask head) on the
    same device.

    At high concurrency the server's batches are full, so the ratio is what decoding, batching,
    post-processing, encoding and HTTP cost end to end.
    """
    from service.bench.model_bench import parse_variant

    if not model:
        return []
    out = []
    for s in servers:
        b = s.get("backend")
        if not b or not b.get("backend"):  # the baseline, or a server that could not say what it runs
            continue
        if (b.get("model"), b.get("input_size")) != (model["model"], model["input_size"]):
            continue  # a --url server with another model than the model level measured
        for row in model["rows"]:
            v = parse_variant(row["variant"])
            same = (v.backend, v.precision, v.compile, v.graphs, bool(row.get("fold_mask_conv")), row["device"]) == (
                b["backend"],
                b.get("precision"),
                bool(b.get("torch_compile")),
                bool(b.get("cuda_graphs")),
                bool(b.get("fold_mask_conv")),
                b.get("device"),
            )
            if not same or row["batch"] != b.get("max_batch_size"):
                continue
            for r in s["rows"]:
                out.append(
                    {
                        "server": s["name"],
                        "concurrency": r["concurrency"],
                        "variant": row["variant"],
                        "batch": row["batch"],
                        "raw_img_per_s": row["img_per_s"],
                        "server_img_per_s": r["img_per_s"],
                        "ratio": round(r["img_per_s"] / row["img_per_s"], 3),
                    }
                )
            break
    return out


def markdown(report: dict) -> str:
    lines = [f"# maskformer bench: {report['created']}", "", f"`{report['command']}`", ""]
    m = report["machine"]
    cpu = f"{m['cpu']} ({m['cpu_capability']}), {m['cpu_count']} CPUs"
    lines += [f"Machine: {m['platform']}, {cpu}, GPU: {m['gpu'] or 'none'}, {m['versions']}", ""]
    model = report.get("model")
    if model:
        h, w = model["input_size"]
        lines += [
            f"## Model level: {model['model']} at {h}x{w}, {model['threads']} threads",
            "",
            "| variant | device | batch | img/s | p50 ms | p90 ms | p99 ms | peak MiB | agreement | of matmul rate |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in model["rows"]:
            agree = "-" if r.get("semantic_agreement") is None else f"{100 * r['semantic_agreement']:.3f} %"
            lines.append(
                f"| {r['variant']} | {r['device']} | {r['batch']} | {r['img_per_s']} | {r['p50_ms']} | "
                f"{r['p90_ms']} | {r['p99_ms']} | {r['peak_mib']} ({r['memory']}) | {agree} | "
                f"{_percent(r.get('of_matmul_rate'))} |"
            )
        lines += [f"| {s['variant']} | skipped: {s['reason']} | | | | | | | | |" for s in model["skipped"]]
        lines += [
            "",
            f"Agreement: semantic pixels with torch fp32 on the CPU, worst of {model.get('fidelity_images', '?')} "
            "shapes validation images, run once per variant at its largest batch size (a random-init model may "
            "give one class everywhere: 100 % there says little).",
        ]
        if model.get("matmul_gflops"):
            samples = model.get("matmul_samples", {})
            rates = ", ".join(
                f"{k} {v} GFLOP/s, best of {samples.get(k, 1)} samples" for k, v in model["matmul_gflops"].items()
            )
            ceilings = ", ".join(f"{k} {v} img/s" for k, v in model["ceiling_img_per_s"].items())
            total = model["gflop_per_image"]
            shares = ", ".join(f"{op} {100 * n / total:.1f} %" for op, n in model.get("gflop_by_op", {}).items())
            unfolded = model.get("gflop_per_image_unfolded", total)
            folding = (
                f" with the mask head folded into the last conv, as the CPU backends run it ({unfolded:.4g} "
                "unfolded, which the rows of `+unfolded` variants use)"
                if model.get("fold_mask_conv")
                else ""
            )
            lines += [
                "",
                f"Of matmul rate: the forward pass's {total:.4g} GFLOP per image{folding} ({shares}) times its "
                f"img/s, over a large square matmul's rate in the same precision, sampled next to each variant "
                f"and at the end ({rates}). At those rates the forward pass alone would serve {ceilings}.",
            ]
        lines.append("")
    server = report.get("server")
    if server:
        lines += [
            f"## Server level: task {server['task']}, {server['image_size']}x{server['image_size']} JPEGs, "
            f"at most {server['max_requests']} requests or {server['max_seconds']} s per level",
            "",
            "| server | concurrency | requests | errors | cut off | img/s | p50 ms | p90 ms | p99 ms | avg batch "
            "| decode / queue / infer / postprocess / encode ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in server["servers"]:
            for r in s["rows"]:
                stages = r.get("stage_ms") or {}
                lines.append(
                    f"| {s['name']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r.get('cut_off', 0)} | "
                    f"{r['img_per_s']} | "
                    f"{r.get('p50_ms', '-')} | {r.get('p90_ms', '-')} | {r.get('p99_ms', '-')} | "
                    f"{r['avg_batch'] if r['avg_batch'] is not None else '-'} | "
                    f"{' / '.join(str(stages.get(k, '-')) for k in STAGES) if stages else '-'} |"
                )
        lines += ["", "Cut off: requests still in flight when the level's seconds ran out (not errors)."]
        if any(r.get("stage_ms") for s in server["servers"] for r in s["rows"]):
            lines += [
                "",
                "Stages: each image's mean time in each stage of `maskformer serve`, from its "
                "`maskformer_stage_seconds` histograms over the level; `infer` is the forward pass of the "
                "image's whole batch.",
            ]
        for name in dict.fromkeys(r["server"] for r in server["ratios"]):
            lines += ["", f"{name} / transformers baseline, img/s:"]
            lines += [
                f"- concurrency {r['concurrency']}: {r['throughput_ratio']}x"
                for r in server["ratios"]
                if r["server"] == name
            ]
        for key in dict.fromkeys(r["ceiling"] for r in server.get("ceiling_ratios", [])):
            lines += ["", f"The forward pass alone at the {key} matmul rate / transformers baseline, img/s:"]
            lines += [
                f"- concurrency {r['concurrency']}: {r['ratio']}x"
                for r in server["ceiling_ratios"]
                if r["ceiling"] == key
            ]
        for name in dict.fromkeys(r["server"] for r in server.get("efficiency", [])):
            rows = [r for r in server["efficiency"] if r["server"] == name]
            lines += ["", f"{name} / its raw backend ({rows[0]['variant']} at batch {rows[0]['batch']}), img/s:"]
            lines += [f"- concurrency {r['concurrency']}: {r['ratio']}" for r in rows]
        lines.append("")
    return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f} %"


# the latency percentiles plotted, and their line styles (literals: matplotlib types them)
LATENCY_STYLES: tuple[tuple[str, Literal["-", "--"]], ...] = (("p50", "-"), ("p99", "--"))


def plot(report: dict, path: Path) -> bool:
    """Throughput and latency percentiles against concurrency, one colour per server, in one legend below
    both plots (inside either, it hid their lines)."""
    server = report.get("server")
    if not server:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    labels, shared = plot_labels([s["name"] for s in server["servers"]])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    for i, (s, label) in enumerate(zip(server["servers"], labels)):
        rows = [r for r in s["rows"] if r["ok"]]  # a level where every request failed has no latencies
        if not rows:
            continue
        cs = [r["concurrency"] for r in rows]
        color = f"C{i}"
        ax1.plot(cs, [r["img_per_s"] for r in rows], marker="o", color=color, label=label)
        for q, style in LATENCY_STYLES:
            ax2.plot(cs, [r[f"{q}_ms"] for r in rows], style, marker="o", color=color)
    ax1.set_ylim(bottom=0)
    for ax, ylabel in ((ax1, "images / s"), (ax2, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(server_levels(server), [str(c) for c in server_levels(server)])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if ax2.lines:
        ax2.set_yscale("log")
        key = [Line2D([], [], color="0.3", linestyle=style, label=q) for q, style in LATENCY_STYLES]
        ax2.legend(handles=key, fontsize=8, loc="upper left")
    handles, names = ax1.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 2) or 1, fontsize=8, frameon=False)
    title = f"POST /segment?task={server['task']}, {server['image_size']}px"
    fig.suptitle(title + (f"; every maskformer server with {shared}" if shared else ""))
    rows_of_legend = -(-len(names) // 2)
    fig.tight_layout(rect=(0, 0.045 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_labels(names: list[str]) -> tuple[list[str], str]:
    """The servers' names less the trailing arguments every one of our servers has (said once in the title,
    where two or more of ours share some), and those arguments."""
    ours = [n for n in names if n.startswith("maskformer")]
    args = [n.split(" --")[1:] for n in ours]  # each argument with its values
    k = 0
    while len(ours) >= 2 and all(len(a) > k for a in args) and len({tuple(a[len(a) - k - 1 :]) for a in args}) == 1:
        k += 1
    if k == 0:
        return names, ""
    shared = "--" + " --".join(args[0][-k:])
    return [n[: -len(shared) - 1] if n in ours else n for n in names], shared


def server_levels(server: dict) -> list[int]:
    return sorted({r["concurrency"] for s in server["servers"] for r in s["rows"]})


def write(report: dict, out: Path, stem: str = "bench") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    if plot(report, out / f"{stem}.png"):
        paths.append(out / f"{stem}.png")
    return paths
