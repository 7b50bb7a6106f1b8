"""The accuracy-aware search: node ranking, the bisection for the fewest fp32 nodes, session-option
variants and per-candidate result caching (tiny models for plumbing; real figures come from e2e runs)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.candidates import CANDIDATES, PassJob
from pipeline.candidates.mixed_precision import (
    SEARCH_FILE,
    Calibration,
    MixedPrecision,
    MixedPrecisionConfig,
    fewest_passing,
    first_output,
    quantized_alone,
    rank_nodes,
)
from pipeline.candidates.quantize import DynamicInt8Config
from pipeline.config import DEFAULT_SESSION_VARIANTS, SESSION_VARIANTS, Gates
from pipeline.gates import RSS_TIE
from pipeline.ranking import ROUNDS, WORST_CASE_ROUNDS, timings_from_json
from pipeline.stages.measure import MeasureStage
from serve.artifacts import APPROVED_FILE
from serve.config import Limits, SessionSettings
from serve.runtime import MODEL_FILE, ModelRuntime
from tests.conftest import TinyRun
from tests.helpers import memfit

TEXTS = tuple(
    f"review number {i}: {'good' if i % 2 else 'dull'} film, {'great' if i % 3 else 'weak'} cast" for i in range(96)
)
MIXED = MixedPrecisionConfig(DynamicInt8Config("QInt8", per_channel=True), ranking_texts=16)


@pytest.mark.parametrize("total", [1, 5, 72])
def test_fewest_passing_finds_the_threshold_in_few_trials(total: int) -> None:
    for threshold in range(total + 2):
        calls: list[int] = []

        def passes(k: int, threshold: int = threshold, calls: list[int] = calls) -> bool:
            calls.append(k)
            return k >= threshold

        assert fewest_passing(total, passes) == min(threshold, total)
        assert len(calls) <= 2 + math.ceil(math.log2(total)) + 1
        assert len(set(calls)) == len(calls)  # no trial is repeated


def test_search_aims_closer_to_fp32_than_the_gates() -> None:
    targets = MIXED.targets(Gates(min_mean_cosine=0.995, min_overlap_at_10=0.90, min_agreement=0.99))
    assert (targets.min_mean_cosine, targets.min_overlap_at_10, targets.min_agreement) == (0.996, 0.92, 0.992)
    assert targets.max_metric_drop_pt == Gates().max_metric_drop_pt


def optimized_model(tiny_run: TinyRun, name: str = "tiny-embed") -> Path:
    return next((tiny_run.root / "build" / name).glob("*/candidates/fp32-optimized"))


def calibration(tiny_run: TinyRun, gates: Gates) -> Calibration:
    reference = next((tiny_run.root / "build" / "tiny-embed").glob("*/candidates/fp32"))
    return Calibration(TEXTS, reference, 64, gates)


def test_quantized_alone_changes_one_node_and_restores_the_graph(tiny_run: TinyRun) -> None:
    import onnx

    model = onnx.load(str(optimized_model(tiny_run) / MODEL_FILE))
    before = model.SerializeToString()
    runtime = ModelRuntime(optimized_model(tiny_run), SessionSettings(), 64, 512)
    feeds = runtime.feeds(runtime.token_ids(list(TEXTS[:8])))
    reference = first_output(model, feeds)
    weights = {w.name: w for w in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights)
    with quantized_alone(model, node, weights[node.input[1]], MIXED):
        changed = first_output(model, feeds)
    assert 0 < np.abs(changed - reference).max() < 0.5 * np.abs(reference).max()
    assert model.SerializeToString() == before


def test_ranking_scores_every_weighted_node(tiny_run: TinyRun) -> None:
    ranking = rank_nodes(optimized_model(tiny_run) / MODEL_FILE, calibration(tiny_run, Gates()), MIXED)
    errors = [error for _, error in ranking]
    assert errors == sorted(errors, reverse=True) and all(e > 0 for e in errors)
    assert len(ranking) == 2 * 4  # per layer: fused attention + 3 MatMuls (o, intermediate, output)


def run_search(tiny_run: TinyRun, folder: Path, gates: Gates) -> dict:
    source = optimized_model(tiny_run)
    folder.mkdir()
    for name in ("tokenizer.json", "runtime.json"):
        shutil.copy2(source / name, folder / name)
    job = PassJob(source / MODEL_FILE, folder / MODEL_FILE, "bert", calibration(tiny_run, gates))
    MixedPrecision(MIXED).apply(job)
    assert (folder / MODEL_FILE).is_file() and not list(folder.glob("trial-*"))
    return json.loads((folder / SEARCH_FILE).read_text())


def test_search_stops_at_plain_int8_or_keeps_everything_fp32(tiny_run: TinyRun, tmp_path: Path) -> None:
    """Plumbing only: tiny random weights barely notice int8 (cosine 0.99998), so the real bisection is
    checked on MiniLM (tests/test_e2e_minilm.py)."""
    loose = run_search(tiny_run, tmp_path / "loose", Gates(min_mean_cosine=0.0, min_overlap_at_10=0.0))
    assert loose["kept_fp32"] == [] and [t["kept_fp32"] for t in loose["trials"]] == [0]
    impossible = run_search(tiny_run, tmp_path / "impossible", Gates(min_mean_cosine=1.0, min_overlap_at_10=0.0))
    total = len(impossible["ranking"])
    assert [t["kept_fp32"] for t in impossible["trials"]] == [0, total]
    assert not any(t["meets_gates"] for t in impossible["trials"])
    assert impossible["kept_fp32"] == [r["node"] for r in impossible["ranking"]]


def test_mixed_candidate_is_rebuilt_when_its_targets_change(tiny_run: TinyRun) -> None:
    settings = json.loads(
        (optimized_model(tiny_run).parent / "int8-mixed-qint8-per-channel" / "settings.json").read_text()
    )
    assert settings["calibration"]["targets"]["min_mean_cosine"] == 0.0  # the tiny configs' lenient gates
    assert settings["calibration"]["texts"] == 300  # the whole (tiny) train split
    assert CANDIDATES["int8-mixed-qint8-per-channel"].calibrated


def test_report_shows_session_trials_and_the_search(tiny_run: TinyRun) -> None:
    report = json.loads((tiny_run.artifacts / "report.json").read_text())
    rows = {r["variant"]: r for r in report["models"][0]["candidates"]}
    for row in rows.values():  # lenient gates: every candidate meets fidelity, so all variants are tried
        trials = row["session_trials_mb"]
        assert list(trials) == list(DEFAULT_SESSION_VARIANTS)
        assert row["session_variant"] == next(v for v in trials if trials[v] <= min(trials.values()) * (1 + RSS_TIE))
        # Timed for the report, only where the choice proved the candidate: timings decide nothing.
        proven = row["request_path"] is not None
        assert list(row["session_timings"]) == (list(DEFAULT_SESSION_VARIANTS) if proven else []), row["variant"]
        timed = timings_from_json(row["session_timings"])
        assert all(
            t["worst_case"].rounds == WORST_CASE_ROUNDS and t["one_text"].rounds == ROUNDS for t in timed.values()
        )
    assert any(row["session_timings"] for row in rows.values())
    assert not all(row["session_timings"] for row in rows.values())
    assert rows["int8-mixed-qint8-per-channel"]["search"]["trials"]
    markdown = (tiny_run.artifacts / "report.md").read_text()
    assert "Session options, per variant: worst-case peak RSS MB, for the candidates that meet" in markdown
    proven = next(r for r in rows.values() if r["session_timings"])
    timed = timings_from_json(proven["session_timings"])["configured"]
    assert f"{proven['session_trials_mb']['configured']:.1f}: {timed['worst_case'].describe()}" in markdown
    assert "Search for int8-mixed-qint8-per-channel" in markdown
    manifest = json.loads(next((tiny_run.artifacts / "tiny-embed").glob("*/manifest.json")).read_text())
    chosen = rows[manifest["variant"]["name"]]
    assert manifest["metrics"]["session_variant"] == chosen["session_variant"]


def test_rerun_reuses_cached_results_and_a_changed_setting_is_remeasured(tiny_run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "cached"
    for name in ("configs", "models", "artifacts"):
        shutil.copytree(tiny_run.root / name, root / name)
    shutil.copytree(tiny_run.root / "build", root / "build")
    service = str(root / "configs" / "service.yaml")
    results = root / "build" / "tiny-embed" / "results"
    before = {p.name for p in results.iterdir()}
    done = memfit("optimize", "--service", service, "--model", "tiny-embed", "--build-dir", str(root / "build"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in results.iterdir()} == before  # every evaluation and measurement was a cache hit
    assert "through the request path" not in done.stderr  # and no proof is said to run
    # The same files approved again: the whole-service fit is reused, for the new approvals.
    fit = json.loads((root / "artifacts" / "service-fit.json").read_text())
    pointers = {m: json.loads((root / "artifacts" / m / APPROVED_FILE).read_text()) for m in fit["approvals"]}
    assert fit["reused"] and fit["approvals"] == {m: pointer["sha256"] for m, pointer in pointers.items()}
    assert (
        "by an earlier run of the same approved files and settings, reused."
        in (root / "artifacts" / "report.md").read_text()
    )

    def optimize_with(**changes: Any) -> set[str]:
        """Rerun with the model config changed: the names of the result files it added."""
        config_path = root / "configs" / "models" / "tiny-embed.yaml"
        config_path.write_text(yaml.safe_dump(yaml.safe_load(config_path.read_text()) | changes))
        present = {p.name for p in results.iterdir()}
        done = memfit("optimize", "--service", service, "--model", "tiny-embed", "--build-dir", str(root / "build"))
        assert done.returncode == 0, done.stderr[-2000:]
        return {p.name for p in results.iterdir()} - present

    # Fewer session variants: every probe the new list needs was made before, and one variant is not timed.
    assert optimize_with(session_variants=["configured"]) == set()
    report = json.loads((root / "artifacts" / "report.json").read_text())
    assert all(set(r["session_trials_mb"]) == {"configured"} for r in report["models"][0]["candidates"])
    # Another repeat count changes what each probe runs: every probe is made again, nothing else.
    added = optimize_with(measure_repeats=3)
    assert added and all(name.startswith("probe-") for name in added)


def fake_probes(peaks: dict[tuple[str, int], float]) -> Any:
    """A MeasureStage.probe that answers from a table of (session variant, rows) -> peak MB."""
    by_options = {
        json.dumps(MeasureStage(SessionSettings(), (), 1, Gates()).options(v), sort_keys=True): v
        for v in SESSION_VARIANTS
    }

    def probe(self: MeasureStage, context: Any, candidate: Any, options: dict[str, Any], rows: int) -> dict:
        peak = peaks[(by_options[json.dumps(options, sort_keys=True)], rows)]
        return {"vmhwm_mb": peak, "ru_maxrss_mb": peak, "rss_after_imports_mb": 70.0, "rss_after_load_mb": 100.0}

    return probe


@pytest.mark.parametrize(
    ("build", "peaks", "chosen"),
    [  # worst-case peaks of the approved kind under each session, as recorded (benchmarks/results/optimize-*)
        ("MiniLM, Intel VNNI, make optimize", {"configured": 246.2, "mem-pattern-on": 328.3}, "configured"),
        ("MiniLM, Intel VNNI, bash .ci/run", {"configured": 246.4, "mem-pattern-on": 328.4}, "configured"),
        ("MiniLM, AMD AVX2, bash .ci/run", {"configured": 246.0, "mem-pattern-on": 328.2}, "configured"),
        ("mpnet, AMD AVX2", {"configured": 519.8, "mem-pattern-on": 629.2}, "configured"),
        ("mpnet, Intel VNNI", {"configured": 519.9, "mem-pattern-on": 629.5}, "configured"),
        ("within the tie, the first listed", {"configured": 250.0, "mem-pattern-on": 246.0}, "configured"),
        ("beyond the tie, the lower", {"configured": 250.0, "mem-pattern-on": 240.0}, "mem-pattern-on"),
    ],
)
def test_the_lowest_worst_case_peak_picks_the_session_and_speed_does_not(
    monkeypatch: pytest.MonkeyPatch, build: str, peaks: dict[str, float], chosen: str
) -> None:
    """The session choice is memory's alone, on figures that repeat within ~1%: each recorded build picks
    what the others did. The variants are not even timed while choosing (a busy moment once made one
    variant's one-text figure 3x as slow, and mpnet shipped another session). A candidate that misses a
    fidelity gate is measured under the first listed only."""
    context = SimpleNamespace(service=SimpleNamespace(limits=Limits(max_batch=8, max_seq_len=64)), share_mb=300.0)
    stage = MeasureStage(SessionSettings(), ("configured", "mem-pattern-on"), 1, Gates())
    monkeypatch.setattr(MeasureStage, "probe", fake_probes({(v, 8): peak for v, peak in peaks.items()}))

    def no_timing(*_: Any) -> None:
        raise AssertionError("the session choice timed its variants")

    monkeypatch.setattr(MeasureStage, "session_timings", no_timing)
    variant, trials = stage.pick_variant(context, None, full=True)  # type: ignore[arg-type]
    assert variant == chosen, build
    assert {v: t["vmhwm_mb"] for v, t in trials.items()} == peaks
    variant, trials = stage.pick_variant(context, None, full=False)  # type: ignore[arg-type]
    assert variant == "configured" and set(trials) == {"configured"}


def test_the_proof_steps_the_micro_batch_down_until_the_request_path_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request path's bodies add more than the model runs alone, and not a constant amount (the
    tokenizer's retained heap stays under smaller runs): the proof re-derives the micro-batch from the
    curve with each measured excess until the proof itself fits the share."""
    context = SimpleNamespace(service=SimpleNamespace(limits=Limits(max_batch=8, max_seq_len=64)), share_mb=150.0)
    stage = MeasureStage(SessionSettings(), ("configured",), 1, Gates(), "largest_that_fits")
    excess = {5: 30.0, 2: 40.0, 1: 40.0}
    proofs: list[int] = []

    def probe(self: MeasureStage, context: Any, candidate: Any, options: Any, rows: int, proof: bool = False) -> dict:
        peak = 100.0 + 10.0 * rows + (excess[rows] if proof else 0.0)
        if proof:
            proofs.append(rows)
        return {
            "vmhwm_mb": peak,
            "ru_maxrss_mb": peak,
            "rss_after_imports_mb": 70.0,
            "rss_after_load_mb": 100.0,
            "request_path": {"statuses": {"200": 1}} if proof else None,
            "vmhwm_before_request_path_mb": 100.0 + 10.0 * rows,
            "allocator_pinned": True,
            "max_input_chars": [512],
            "max_request_chars": [4096],
        }

    monkeypatch.setattr(MeasureStage, "probe", probe)
    measured = stage.measure(context, None, full=True)  # type: ignore[arg-type]
    assert proofs == [] and measured.batch == 5 and measured.request_path is None
    measurement = stage.prove(context, None, measured)  # type: ignore[arg-type]
    assert proofs == [5, 2, 1]
    assert measurement.batch == 1 and measurement.peak_rss_mb == 150.0 and measurement.model_run_peak_mb == 110.0


class Results:
    """The build's result cache, in memory."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, str], Any] = {}

    def get(self, kind: str, key: str) -> Any:
        return self.found.get((kind, key))

    def put(self, kind: str, key: str, value: Any) -> None:
        self.found[(kind, key)] = value


@pytest.mark.parametrize(
    ("share_mb", "medians", "rows"),
    [
        (300.0, {8: 100.0, 1: 300.0, 2: 104.0}, 2),  # by speed: the whole batch is not faster than 2 rows
        (300.0, {8: 100.0, 1: 100.0}, 1),  # flat: one row
        (120.0, {8: 100.0, 1: 300.0, 2: 200.0, 4: 100.0}, 2),  # 4 by speed; memory holds 2 (100 + 10/row)
    ],
)
def test_the_micro_batch_is_the_fewest_rows_at_full_speed_then_what_fits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, share_mb: float, medians: dict[int, float], rows: int
) -> None:
    """The measure stage runs the fewest rows per run the whole batch is not measurably faster than,
    fewer while memory needs it, records the timings, and times a candidate once (cached); under
    `largest_that_fits` it times nothing and starts from the whole batch."""
    from pipeline.micro_batch import row_timings_json
    from pipeline.ranking import Timing

    (tmp_path / MODEL_FILE).write_bytes(b"model")
    candidate = SimpleNamespace(folder=tmp_path, variant="int8")
    context = SimpleNamespace(
        service=SimpleNamespace(limits=Limits(max_batch=8, max_seq_len=64)),
        share_mb=share_mb,
        results=Results(),
        model=SimpleNamespace(name="m"),
    )
    timings = {r: Timing(m, m, m, 3) for r, m in medians.items()}
    timed: list[int] = []

    def time_micro_batches(folder: Path, settings: SessionSettings, limits: Limits) -> dict[int, Timing]:
        timed.append(limits.max_batch)
        return timings

    monkeypatch.setattr("pipeline.stages.measure.time_micro_batches", time_micro_batches)
    monkeypatch.setattr(MeasureStage, "probe", fake_probes({("configured", r): 100.0 + 10.0 * r for r in range(1, 9)}))
    stage = MeasureStage(SessionSettings(), ("configured",), 1, Gates())
    measured = stage.measure(context, candidate, full=True)  # type: ignore[arg-type]
    assert measured.batch == rows and measured.micro_batch_timings == row_timings_json(timings)
    assert stage.measure(context, candidate, full=True).batch == rows  # type: ignore[arg-type]
    assert timed == [8]
    largest = MeasureStage(SessionSettings(), ("configured",), 1, Gates(), "largest_that_fits")
    measured = largest.measure(context, candidate, full=True)  # type: ignore[arg-type]
    assert measured.micro_batch_timings == {} and timed == [8]
    assert measured.batch == (8 if share_mb >= 180.0 else 2)
