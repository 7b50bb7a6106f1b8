"""Results of `make bench`: the JSON of every round, a Markdown table of medians (min–max) with ratios
against memfit, and a plot of peak RSS vs accuracy (one point per contender, the budget line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import json_bytes, write_bytes_atomic
from pipeline.report import save_figure

SUMMARY = (
    "peak_total_rss_mb",
    "peak_total_pss_mb",
    "idle_total_rss_mb",
    "worker_vmhwm_mb",
    "cold_start_s",
    "single_p50_ms",
    "single_p95_ms",
    "batch32_p50_ms",
    "batch32_p95_ms",
    "requests_per_s",
    "max_sample_gap_ms",
)


def summarize(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median and min–max of every figure over the rounds."""
    return {
        key: {
            "median": round(float(np.median([r[key] for r in rounds])), 2),
            "min": round(min(r[key] for r in rounds), 2),
            "max": round(max(r[key] for r in rounds), 2),
        }
        for key in SUMMARY
    }


def ratios(summary: dict[str, dict[str, dict[str, float]]], quality: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each contender against memfit: memory ×, latency × (above 1: memfit uses less / answers faster),
    throughput × (above 1: memfit serves more) and accuracy Δ (contender − memfit, points)."""
    mine = summary["memfit"]
    result = {}
    for name, figures in summary.items():
        result[name] = {
            "memory_x": round(figures["peak_total_rss_mb"]["median"] / mine["peak_total_rss_mb"]["median"], 2),
            "pss_x": round(figures["peak_total_pss_mb"]["median"] / mine["peak_total_pss_mb"]["median"], 2),
            "single_latency_x": round(figures["single_p50_ms"]["median"] / mine["single_p50_ms"]["median"], 2),
            "batch32_latency_x": round(figures["batch32_p50_ms"]["median"] / mine["batch32_p50_ms"]["median"], 2),
            "throughput_x": round(mine["requests_per_s"]["median"] / figures["requests_per_s"]["median"], 2),
            "accuracy_delta_pt": round(
                (quality[name]["probe_accuracy"] - quality["memfit"]["probe_accuracy"]) * 100, 2
            ),
        }
    return result


def spread(figure: dict[str, float], digits: int = 0) -> str:
    return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}–{figure['max']:.{digits}f})"


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"# memfit benchmark, {results['created_at'][:10]}",
        "",
        f"{machine['cpus']} CPUs ({machine['cpu']}), {machine['platform']}; {results['rounds']} interleaved rounds, "
        f"medians (min–max); run took {results['minutes']} min. Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v)
        + ".",
        "Memory: master + worker from /proc/<pid>/smaps_rollup, sampled every 10 ms (longest gap in the table). "
        "Ratios: contender ÷ memfit for memory and latency, memfit ÷ contender for throughput, "
        "accuracy Δ = contender − memfit (probe fit on torch-fp32 vectors).",
        "",
    ]
    for model in results["models"]:
        summary, quality, ratio = model["summary"], model["quality"], model["ratios"]
        floor = model["physical_floor"]
        memfit_peak = summary["memfit"]["peak_total_rss_mb"]["median"]
        fp32_peak = summary["torch-fp32"]["peak_total_rss_mb"]["median"]
        lines += [
            f"## {model['model']} (max_seq_len {model['max_seq_len']}; memfit variant {model['memfit_variant']})",
            "",
            f"memfit's peak service RSS is **{memfit_peak / fp32_peak:.0%} of the torch-fp32 service** "
            f"({memfit_peak:.0f} vs {fp32_peak:.0f} MB), and **{memfit_peak / floor['floor_mb']:.2f}× the physical "
            f"floor** of {floor['floor_mb']:.0f} MB (runtime imports {floor['runtime_imports_mb']:.0f} + approved "
            f"weights {floor['weights_mb']:.0f} + idle gunicorn master {floor['gunicorn_master_mb']:.0f}).",
            "",
            "| contender | peak RSS MB | peak PSS MB | idle RSS MB | worker VmHWM MB | cold start s | 1-text p50 ms "
            "| 1-text p95 ms | 32-text p50 ms | req/s (4 clients) | probe acc | cos mean / min | overlap@10 "
            "| memory × | latency × (1 / 32) | throughput × | acc Δ pt | max gap ms |",
            "|---|" + "---|" * 17,
        ]
        for name, figures in summary.items():
            q, r = quality[name], ratio[name]
            lines.append(
                f"| {name}: {model['contenders'][name]['label']} | {spread(figures['peak_total_rss_mb'])} | "
                f"{spread(figures['peak_total_pss_mb'])} | {spread(figures['idle_total_rss_mb'])} | "
                f"{spread(figures['worker_vmhwm_mb'])} | {spread(figures['cold_start_s'], 1)} | "
                f"{spread(figures['single_p50_ms'], 1)} | {spread(figures['single_p95_ms'], 1)} | "
                f"{spread(figures['batch32_p50_ms'])} | {spread(figures['requests_per_s'], 2)} | "
                f"{q['probe_accuracy']:.4f} | {q['cosine_mean']:.4f} / {q['cosine_min']:.4f} | "
                f"{q['overlap_at_10']:.3f} | {r['memory_x']:.2f} | {r['single_latency_x']:.2f} / "
                f"{r['batch32_latency_x']:.2f} | {r['throughput_x']:.2f} | {r['accuracy_delta_pt']:+.2f} | "
                f"{figures['max_sample_gap_ms']['max']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    figure, axes_list = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for axes, model in zip(axes_list[0], models, strict=True):
        for index, (name, figures) in enumerate(model["summary"].items()):
            x = figures["peak_total_rss_mb"]["median"]
            y = model["quality"][name]["probe_accuracy"]
            marker = "*" if name == "memfit" else "o"
            axes.scatter([x], [y], color=f"C{index}", marker=marker, s=160 if name == "memfit" else 60, label=name)
        axes.axvline(results["budget_mb"], color="red", linestyle="--", label=f"budget {results['budget_mb']:.0f} MB")
        axes.set_title(f"{model['model']}: peak service RSS vs probe accuracy")
        axes.set_xlabel("peak RSS of master + worker, MB (median of rounds)")
        axes.set_ylabel("probe accuracy (head fit on torch-fp32 vectors)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    save_figure(figure, path, dpi=110)


def write_results(results: dict[str, Any], folder: Path) -> list[Path]:
    """benchmarks/results/<date>.{json,md,png}; figures are summarized here from the rounds, never typed."""
    for model in results["models"]:
        model["summary"] = {name: summarize(c["rounds"]) for name, c in model["contenders"].items()}
        model["quality"] = {name: c["quality"] for name, c in model["contenders"].items()}
        model["ratios"] = ratios(model["summary"], model["quality"])
    folder.mkdir(parents=True, exist_ok=True)
    stem = results["created_at"][:10]
    paths = [folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}.png"]
    write_bytes_atomic(paths[0], json_bytes(results))
    write_bytes_atomic(paths[1], markdown(results).encode())
    plot(results, paths[2])
    return paths
