"""artifacts/report.{json,md,png}: every candidate of every model, with its figures and verdict."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.atomic import json_bytes, write_bytes_atomic
from pipeline.gates import RSS_TIE
from pipeline.provenance import machine
from pipeline.ranking import ROUNDS, WORST_CASE_ROUNDS, timings_from_json
from serve.config import ServiceConfig

if TYPE_CHECKING:
    from pipeline.run import ModelRun


def candidate_rows(run: ModelRun) -> list[dict[str, Any]]:
    state = run.state
    verdicts = {v.variant: v for v in state.verdicts}
    rows = []
    for candidate in state.candidates:
        evaluation = state.evaluations[candidate.variant]
        metric = evaluation.accuracy or {}
        measurement = state.measurements[candidate.variant]
        verdict = verdicts.get(candidate.variant)
        if verdict is None:
            status, reason = "reference", "fp32 reference (not listed as a candidate)"
        elif verdict.chosen:
            status, reason = "approved", verdict.note
        elif verdict.passed:
            status, reason = "passed", f"passes every gate; {verdict.note}"
        else:
            status, reason = "rejected", "; ".join(verdict.failures)
        rows.append(
            {
                "variant": candidate.variant,
                "file_mb": candidate.file_mb,
                "peak_rss_mb": measurement.peak_rss_mb,
                "model_run_peak_mb": measurement.model_run_peak_mb,
                "request_path": measurement.request_path,
                "worst_case_peak_mb": measurement.worst_case_peak_mb,
                "max_tokens_per_run": measurement.max_tokens_per_run,
                "predicted_peak_mb": measurement.predicted_peak_mb,
                "rss_after_load_mb": measurement.rss_after_load_mb,
                "session_variant": measurement.session_variant,
                "session_trials_mb": measurement.session_trials,
                "session_timings": measurement.session_timings,
                "micro_batch_timings": measurement.micro_batch_timings,
                "search": candidate.search,
                "settings": candidate.settings,
                "p50_ms": evaluation.latency_ms["p50"],
                "p95_ms": evaluation.latency_ms["p95"],
                "throughput_per_s": evaluation.throughput,
                "metric": metric.get("metric"),
                "value": metric.get("value"),
                "delta_pt": metric.get("delta"),
                "cosine_mean": evaluation.cosine["mean"] if evaluation.cosine else None,
                "cosine_min": evaluation.cosine["min"] if evaluation.cosine else None,
                "overlap_at_10": evaluation.neighbours["overlap_at_10"] if evaluation.neighbours else None,
                "agreement": evaluation.agreement,
                "verdict": status,
                "reason": reason,
            }
        )
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def accuracy_lines(model: dict[str, Any]) -> list[str]:
    """The task metric of fp32 and of the approved variant on the test split, side by side; or, without
    labels, that the gates were fidelity to fp32 alone."""
    if not model["labelled"]:
        measures = "mean cosine and overlap@10" if model["task"] == "feature-extraction" else "top-1 agreement"
        return [
            f"Fidelity only: {model['eval_data']} has no labels, so every candidate is gated on its {measures} "
            f"with fp32 on {model['n_test']} test texts, and no task metric is measured.",
            "",
        ]
    approved = next((r for r in model["candidates"] if r["verdict"] == "approved"), None)
    fp32 = next((r for r in model["candidates"] if r["variant"] == "fp32"), None)
    if approved is None or fp32 is None:
        return []
    agreement = "" if approved["agreement"] is None else f", top-1 agreement with fp32 {approved['agreement']:.4f}"
    return [
        f"Test-split {fp32['metric']} ({model['n_test']} examples): fp32 {fp32['value']:.4f}, approved "
        f"{approved['variant']} {approved['value']:.4f} (Δ {approved['delta_pt']:+.2f} pt){agreement}.",
        "",
    ]


FIDELITY_MEASURES = ("cosine_mean", "overlap_at_10", "agreement")


def closer_lines(model: dict[str, Any]) -> list[str]:
    """The candidates that stay at least as close to fp32 as the approved one on every fidelity measure,
    with the measured reason each was not chosen: the price the approval paid in fidelity, and for what."""
    approved = next((r for r in model["candidates"] if r["verdict"] == "approved"), None)
    if approved is None:
        return []
    measures = [m for m in FIDELITY_MEASURES if approved[m] is not None]
    closer = [
        r
        for r in model["candidates"]
        if r is not approved and all(r[m] is not None and r[m] >= approved[m] for m in measures)
    ]
    if not closer:
        return [f"No candidate is closer to fp32 than {approved['variant']} on every fidelity measure.", ""]
    lines = [
        f"At least as close to fp32 as the approved variant on every fidelity measure, and why not chosen "
        f"(objective: {model['objective'].replace('_', ' ')}):",
        "",
        "| variant | cos mean | overlap@10 | agreement | p50 ms | worst-case peak MB | why not chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [approved, *closer]:
        why = "(approved)" if row is approved else row["reason"]
        lines.append(
            f"| {row['variant']} | {_fmt(row['cosine_mean'], 4)} | {_fmt(row['overlap_at_10'], 3)} | "
            f"{_fmt(row['agreement'], 4)} | {_fmt(row['p50_ms'], 2)} | {_fmt(row['worst_case_peak_mb'], 1)} | {why} |"
        )
    return [*lines, ""]


def session_cell(row: dict[str, Any], variant: str) -> str:
    if variant not in row["session_trials_mb"]:
        return "–"
    peak = f"{row['session_trials_mb'][variant]:.1f}"
    timed = timings_from_json(row["session_timings"]).get(variant)
    if timed is None:  # not proven: its variants are not timed
        return peak
    return f"{peak}: {timed['worst_case'].describe()}, {timed['one_text'].describe()}"


def session_lines(model: dict[str, Any]) -> list[str]:
    """Worst-case peak and run times of each candidate measured under each session-option variant."""
    measured = [r for r in model["candidates"] if len(r["session_trials_mb"]) > 1]
    if not measured:
        return []
    variants = list(measured[0]["session_trials_mb"])
    lines = [
        "Session options, per variant: worst-case peak RSS MB, for the candidates that meet the fidelity gates; "
        f"for the proven ones, also the median ms of the worst-case input and of one short text (over "
        f"{WORST_CASE_ROUNDS} and {ROUNDS} rounds timed side by side, with their range). The lowest peak picks "
        f"the session (the first listed within {RSS_TIE:.0%}); the timings show what each variant costs, and "
        "decide nothing:",
        "",
        "| variant | " + " | ".join(variants) + " | chosen |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for row in measured:
        peaks = " | ".join(session_cell(row, v) for v in variants)
        lines.append(f"| {row['variant']} | {peaks} | {row['session_variant']} |")
    return [*lines, ""]


def settings_lines(model: dict[str, Any]) -> list[str]:
    """How each candidate was built: its settings, which also key its cached folder."""
    lines = ["How each candidate was built:", ""]
    for row in model["candidates"]:
        flat = {name: value for name, value in row["settings"].items() if not isinstance(value, dict)}
        lines.append(f"- {row['variant']}: " + ", ".join(f"{name} {json.dumps(value)}" for name, value in flat.items()))
    return [*lines, ""]


def search_lines(model: dict[str, Any]) -> list[str]:
    """Every trial of each calibrated search: how many nodes were kept fp32 and what that bought."""
    lines = []
    for row in model["candidates"]:
        search = row["search"]
        if not search:
            continue
        worst = ", ".join(f"{r['node']} ({r['relative_error']:.3f})" for r in search["ranking"][:3])
        targets = ", ".join(f"{name} {value}" for name, value in search["targets"].items())
        lines += [
            f"Search for {row['variant']}: {len(search['ranking'])} nodes ranked by the model-output error when each "
            f"alone is int8 (worst: {worst}); trials on {search['calibration_texts']} train-split texts against "
            f"fp32, aiming at {targets}:",
            "",
            "| nodes kept fp32 | cos mean | cos min | overlap@10 | agreement | meets gates |",
            "|---|---|---|---|---|---|",
        ]
        for trial in search["trials"]:
            lines.append(
                f"| {trial['kept_fp32']} | {_fmt(trial['cosine_mean'], 4)} | {_fmt(trial['cosine_min'], 4)} | "
                f"{_fmt(trial['overlap_at_10'], 3)} | {_fmt(trial['agreement'], 4)} | "
                f"{'yes' if trial['meets_gates'] else 'no'} |"
            )
        lines += ["", f"Kept fp32: {len(search['kept_fp32'])} of {len(search['ranking'])} nodes.", ""]
    return lines


def markdown(report: dict[str, Any]) -> str:
    service = report["service"]
    lines = [
        "# memfit report",
        "",
        f"Created {report['created_at']}. Budget {service['budget_mb']:.0f} MB; worst-case input "
        f"{service['max_batch']} x {service['max_seq_len']} tokens. A model's share is the peak RSS it may reach "
        "measured alone; the whole-service fit below measures all of them together.",
        "Peak RSS is VmHWM of a fresh process that imports what a service worker imports. Worst-case peak: "
        "the whole worst-case input in one run; tokens/run: the micro-batch the service runs, the largest "
        "that fits the share (model runs measured there, the fitted curve's prediction in brackets). "
        "Proven peak: that micro-batch, then the largest bodies the service accepts in their nastiest forms "
        "through the service's request path, TRUNCATE off and on (measured for the approved candidate, "
        "the candidates the ranking measured others against, and any ranked above it whose proof missed "
        "the share).",
        f"Machine: {report['machine']['cpus']} x {report['machine']['cpu']}; its int8 products "
        + (
            "saturate at 8 bits (no VNNI): int8 weights are built with 7."
            if report["machine"]["int8_products_saturate"]
            else "are exact at 8 bits."
        ),
        "",
    ]
    for model in report["models"]:
        lines += [
            f"## {model['model']} ({model['task']})",
            "",
            f"Approved: **{model['approved'] or 'nothing (no candidate passed)'}**. Share {model['share_mb']:.0f} MB. "
            f"Test examples: {model['n_test']}.",
            "",
            "| variant | file MB | worst-case peak MB | session | tokens/run | model runs MB (predicted) "
            "| proven peak MB | p50 ms | p95 ms | metric | Δ pt | cos mean | cos min | overlap@10 | agreement "
            "| verdict | why |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in model["candidates"]:
            lines.append(
                f"| {row['variant']} | {_fmt(row['file_mb'], 1)} | {_fmt(row['worst_case_peak_mb'], 1)} | "
                f"{row['session_variant']} | {row['max_tokens_per_run']} | "
                f"{_fmt(row['model_run_peak_mb'], 1)} ({_fmt(row['predicted_peak_mb'], 1)}) | "
                f"{_fmt(row['peak_rss_mb'] if row['request_path'] else None, 1)} | {_fmt(row['p50_ms'], 2)} | "
                f"{_fmt(row['p95_ms'], 2)} | {_fmt(row['value'], 4)} | "
                f"{_fmt(row['delta_pt'], 2)} | {_fmt(row['cosine_mean'], 4)} | {_fmt(row['cosine_min'], 4)} | "
                f"{_fmt(row['overlap_at_10'], 3)} | {_fmt(row['agreement'], 4)} | {row['verdict']} | {row['reason']} |"
            )
        lines += ["", *accuracy_lines(model), *closer_lines(model), *session_lines(model), *settings_lines(model)]
        lines += search_lines(model)
        lines += [time_line(model["stage_seconds"]), ""]
    fit = report.get("service_fit")
    if fit:
        lines += service_fit_lines(fit)
    lines += ["![accuracy vs peak RSS](report.png)", ""]
    return "\n".join(lines)


def time_line(seconds: dict[str, float]) -> str:
    """Where this run's time went, stage by stage (a stage whose results were cached takes little)."""
    stages = ", ".join(f"{name} {duration:,.1f} s" for name, duration in seconds.items())
    return f"Time: {sum(seconds.values()):,.1f} s ({stages})."


def service_fit_lines(fit: dict[str, Any]) -> list[str]:
    """The real service per worker count, and how one worker's memory divides by model."""
    verdict = "fits" if fit["fits"] else "DOES NOT FIT"
    counted = {
        "pss": "PSS sum of master and workers",
        "own pages": "own pages of master and workers",
        "max(cgroup, pss)": "larger of the container's peak (cgroup peak plus uncharged) and PSS sum",
    }.get(fit["counted_by"], "larger of the container's peak (cgroup peak plus uncharged) and own pages")
    one = fit["one_process"]
    lines = [
        "## Whole service (the real gunicorn service, every worker at every model's worst case at once)",
        "",
        f"Every worker held {fit.get('held_requests', 1)} of each round of requests: one running, the rest "
        "waiting for the inference lock with their bodies read.",
        "",
        f"One worker: {fit['total_mb']:.1f} MB of {fit['budget_mb']:.0f} MB ({counted}, plus "
        f"{fit['held_bodies_mb']:.0f} MB for the other bodies a worker's threads can hold): **{verdict}**. "
        f"At full tokens per run, W workers cost {fit['base_mb']:.1f} + W × ({fit['per_worker_mb']:.1f} + "
        f"{fit['held_bodies_mb']:.0f}) MB; more workers were measured at fewer tokens per run, up to "
        f"{fit['max_workers_measured']} within the budget (planned: the measured peak plus the waiting bodies)."
        + (f" Measured in {fit['seconds']:,.1f} s" if "seconds" in fit else "")
        + (" by an earlier run of the same approved files and settings, reused." if fit.get("reused") else "."),
        "",
        "Own pages: every page master and workers map, counted once (a PSS sum gives away the share of pages "
        "that processes outside the service map too). Before each count every file the service may read was "
        "dropped from the page cache; uncharged: the pages the service mapped that stayed cached because "
        "another process maps them (charged to it; a fresh container pays them), added to the cgroup peak. "
        "Line: the counted peak the line through the runs predicts for that run, and its error; cgroup line: "
        "the same through the cgroup peaks (plus uncharged) alone; own line: through the own pages alone.",
        "",
        "| workers | tokens/run | cgroup peak MB | uncharged MB | failcnt | OOM kills | PSS sum MB | own pages MB "
        "| RSS sum MB | line MB (error) | cgroup line MB (error) | own line MB (error) | planned MB "
        "| worker VmHWM MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in fit["runs"]:
        group = run["cgroup"] or {}
        cgroup_line = f"{run['cgroup_line_mb']:.1f} ({run['cgroup_line_error']:+.1%})" if group else "-"
        own_line = f"{run['own_line_mb']:.1f} ({run['own_line_error']:+.1%})" if "own_line_mb" in run else "-"
        lines.append(
            f"| {run['workers']} | {run['tokens_per_run']} | {_fmt(group.get('peak_mb'), 1)} | "
            f"{_fmt(run.get('uncharged_mb'), 1)} | {group.get('failcnt', '-')} | {group.get('oom_kills', '-')} | "
            f"{run['pss_peak_mb']:.1f} | "
            f"{_fmt(run.get('own_peak_mb'), 1)} | {run['rss_sum_peak_mb']:.1f} | "
            f"{run['line_mb']:.1f} ({run['line_error']:+.1%}) | {cgroup_line} | {own_line} | "
            f"{run['planned_mb']:.1f}{'' if run['fits'] else ' (over)'} | "
            f"{', '.join(map(str, run['worker_vmhwm_mb']))} |"
        )
    lines += [
        "",
        f"One process, every model loaded together: worker {one['worker_peak_mb']:.1f} MB (runtime floor "
        f"{one['runtime_floor_mb']:.1f} MB), idle master {one['master_rss_mb']:.1f} MB RSS.",
        "",
        "| model | variant | tokens/run | weights MB | activation peak MB (alone) | peak alone MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in fit["models"]:
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['tokens_per_run']} | {row['weights_mb']:.1f} | "
            f"{row['activation_peak_mb']:.1f} | {row['alone_peak_mb']:.1f} |"
        )
    return [*lines, ""]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    markers = {"approved": "*", "rejected": "x", "passed": "o", "reference": "s"}
    placed: list[tuple[float, float]] = []
    for index, model in enumerate(report["models"]):
        colour = f"C{index}"
        for row in model["candidates"]:
            fidelity = row["cosine_mean"] if row["cosine_mean"] is not None else row["agreement"]
            x, y = row["worst_case_peak_mb"], row["value"] if row["value"] is not None else fidelity
            axes.scatter(
                [x], [y], color=colour, marker=markers[row["verdict"]], s=120 if row["verdict"] == "approved" else 40
            )
            # Stack labels of points that sit on top of each other instead of overprinting them.
            crowd = sum(1 for px, py in placed if abs(px - x) < 15 and abs(py - y) < 0.004)
            placed.append((x, y))
            axes.annotate(
                f"{model['model']}/{row['variant']}",
                (x, y),
                fontsize=7,
                color=colour,
                xytext=(6, 4 - 10 * crowd),
                textcoords="offset points",
            )
    for verdict, marker in markers.items():
        axes.scatter([], [], color="grey", marker=marker, label=verdict)
    service = report["service"]
    axes.axvline(service["budget_mb"], color="red", linestyle="--", label=f"budget {service['budget_mb']:.0f} MB")
    for index, model in enumerate(report["models"]):
        share = model["share_mb"]
        axes.axvline(share, color=f"C{index}", linestyle=":", label=f"{model['model']} share {share:.0f} MB")
    worst = f"{service['max_batch']} x {service['max_seq_len']} tokens"
    axes.set_xlabel(f"worst-case peak RSS, MB (fresh process, {worst})")
    axes.set_ylabel("task metric (probe accuracy / accuracy); without labels, fidelity to fp32")
    axes.set_title("memfit candidates: accuracy vs peak RSS")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(figure, path)


def save_figure(figure: Any, path: Path, dpi: int = 120) -> None:
    """Write a matplotlib figure as PNG beside `path`, then rename it into place."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    figure.savefig(tmp, dpi=dpi, format="png")
    plt.close(figure)
    tmp.replace(path)


def write_report(
    runs: list[ModelRun], artifacts_root: Path, service: ServiceConfig, fit: dict[str, Any] | None
) -> dict[str, Any]:
    report = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "service": {
            "budget_mb": service.budget_mb,
            "max_batch": service.limits.max_batch,
            "max_seq_len": service.limits.max_seq_len,
        },
        "models": [
            {
                "model": run.context.model.name,
                "task": run.context.model.task,
                "share_mb": run.context.share_mb,
                "objective": run.context.model.objective,
                "approved": run.state.approved.name if run.state.approved else None,
                "n_test": len(run.state.dataset.test.texts) if run.state.dataset else 0,
                "eval_data": run.state.dataset.source if run.state.dataset else None,
                "labelled": run.context.model.eval.labelled,
                "export_validation": run.state.exported.validation if run.state.exported else None,
                "candidates": candidate_rows(run),
                "stage_seconds": run.seconds,
            }
            for run in runs
        ],
        "service_fit": fit,
    }
    artifacts_root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(artifacts_root / "report.json", json_bytes(report))
    write_bytes_atomic(artifacts_root / "report.md", markdown(report).encode())
    plot(report, artifacts_root / "report.png")
    return report
