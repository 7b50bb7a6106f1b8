"""Peak RSS of each candidate, in a fresh process, as a function of input size, under the session
options that measure lowest, and the largest micro-batch (tokens per session run) that keeps it within
the model's budget share.

A candidate that meets the fidelity gates is measured at its worst-case input (max_batch ×
max_seq_len) under each session-option variant; the lowest peak picks the variant (the configured one
on a tie), or, when no variant fits the share at the worst case, the lowest peak at one row (the
service will then run small micro-batches, where the base counts). A few more batch sizes fit the
memory curve. If the worst case does not fit the share, the curve gives `max_tokens_per_run`,
verified by a real measurement (and stepped down until the measurement fits); the service then runs
every request in micro-batches of at most that many tokens, so the proven peak holds for any accepted
request. A candidate that misses a fidelity gate cannot be approved: it is measured once, at the worst
case, for the report. Probe results are cached, each keyed by what its process is given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipeline.cache import cache_key
from pipeline.config import SESSION_VARIANTS, Gates, SessionVariant
from pipeline.gates import RSS_TIE, evaluation_failures
from pipeline.memory.curve import MemoryCurve, curve_batches
from pipeline.memory.probe import ProbeError, run_probe
from pipeline.progress import bar
from pipeline.stages import StageError
from pipeline.state import BuildContext, BuildState, Candidate, Evaluation, Measurement
from serve.artifacts import sha256_file
from serve.config import SessionSettings
from serve.runtime import MODEL_FILE

SESSION_SLOWDOWN = 0.25
# What the same variant's timings moved by between builds on this machine (MiniLM 8-bit weights with
# int8 compute, configured: one short text 2.0 ms and the worst case 1.37 s timed by medians in one
# build, 4.5 ms and 1.55 s timed by fastest runs in another).
TIMING_NOISE = {"worst_case_s": 0.25, "one_text_ms": 3.0}
MEASUREMENT_VERSION = 11  # bump when probing changes: cached probes keyed on it are then redone


def request_path_figures(probe: dict[str, Any]) -> dict[str, Any] | None:
    """What a proof probe's request path covered: the limits it proved, and its answers."""
    if probe["request_path"] is None:
        return None
    return {
        **probe["request_path"],
        "peak_before_mb": probe["vmhwm_before_request_path_mb"],
        "allocator_pinned": probe["allocator_pinned"],
        "max_input_chars": probe["max_input_chars"][0],
        "max_request_chars": probe["max_request_chars"][0],
    }


def timings(probe: dict[str, Any]) -> dict[str, float]:
    """A one-model probe's speed: seconds of its fastest worst-case run, ms of its fastest one-text run."""
    return {"worst_case_s": float(probe["run_s"][0]), "one_text_ms": float(probe["one_text_ms"][0])}


def quick_variants(timed: dict[SessionVariant, dict[str, float]]) -> list[SessionVariant]:
    """The variants within SESSION_SLOWDOWN of the fastest on both the worst case and one short text,
    plus TIMING_NOISE.
    When none is (one variant fastest on the worst case, another on one short text, each too slow on
    the other), the one least over its allowance competes alone."""
    fastest = {key: min(t[key] for t in timed.values()) for key in TIMING_NOISE}

    def over_allowance(t: dict[str, float]) -> float:
        return max(t[k] / (fastest[k] * (1 + SESSION_SLOWDOWN) + TIMING_NOISE[k]) for k in TIMING_NOISE)

    quick = [v for v, t in timed.items() if over_allowance(t) <= 1]
    return quick or [min(timed, key=lambda v: over_allowance(timed[v]))]


@dataclass(frozen=True)
class MeasureStage:
    session: SessionSettings
    variants: tuple[SessionVariant, ...]
    repeats: int
    gates: Gates
    name: str = "measure"

    def probe(
        self, context: BuildContext, candidate: Candidate, options: dict[str, Any], rows: int, proof: bool = False
    ) -> dict[str, Any]:
        """One probe at `rows` full-length rows per run; `proof` adds the request path's hostile bodies.
        Cached per probe, keyed by everything the probe process is given (the model by its bytes), so a
        changed budget or variant list re-runs only the probes that differ."""
        key = cache_key(
            version=MEASUREMENT_VERSION,
            model=sha256_file(candidate.folder / MODEL_FILE),
            options=options,
            rows=rows,
            proof=proof,
            repeats=self.repeats,
            limits=context.service.limits.model_dump(),
            threads=context.service.threads,
        )
        found = context.results.get("probe", key)
        if found is not None:
            return found
        try:
            model = {"folder": str(candidate.folder), "session_options": options, "batch": rows}
            result = run_probe([model], context.service, repeats=self.repeats, request_path=proof)
        except ProbeError as exc:
            raise StageError(f"{context.model.name}: {candidate.variant}: {exc}") from None
        context.results.put("probe", key, result)
        return result

    def options(self, variant: SessionVariant) -> dict[str, Any]:
        return {**self.session.model_dump(), **SESSION_VARIANTS[variant]}

    def pick_variant(
        self, context: BuildContext, candidate: Candidate, full: bool
    ) -> tuple[SessionVariant, dict[int, dict[str, Any]], dict[SessionVariant, dict[str, Any]]]:
        """The session variant to measure further, its probes so far (by rows) and every variant's
        worst-case probe. Only variants at most SESSION_SLOWDOWN slower than the fastest may compete on
        memory (prepacking off can save memory by repacking weights on every run: a cost a large run
        amortizes and a one-text request does not, so both are timed).
        When even the best worst case misses the share, the service will run small micro-batches, so the
        variants are compared again at one row: the lowest base fits the most rows."""
        worst = context.service.limits.max_batch
        variants = self.variants if full else ("configured",)
        trials = {v: self.probe(context, candidate, self.options(v), worst) for v in variants}
        quick = quick_variants({v: timings(r) for v, r in trials.items()})
        compared = trials
        if full and min(trials[v]["vmhwm_mb"] for v in quick) > context.share_mb:
            compared = {v: self.probe(context, candidate, self.options(v), 1) for v in quick}
        floor = min(compared[v]["vmhwm_mb"] for v in quick)
        variant = next(v for v in quick if compared[v]["vmhwm_mb"] <= floor * (1 + RSS_TIE))
        probes = {worst: trials[variant]} | ({1: compared[variant]} if compared is not trials else {})
        return variant, probes, trials

    def measure(self, context: BuildContext, candidate: Candidate, full: bool) -> Measurement:
        limits = context.service.limits
        share = context.share_mb
        worst = limits.max_batch
        variant, results, trials = self.pick_variant(context, candidate, full)
        options = self.options(variant)
        curve = None
        rows = worst
        if full:
            for batch in curve_batches(worst):
                results[batch] = results.get(batch) or self.probe(context, candidate, options, batch)
            curve = MemoryCurve.fit(sorted((r * limits.max_seq_len, res["vmhwm_mb"]) for r, res in results.items()))
            if results[worst]["vmhwm_mb"] > share:
                rows = max(1, curve.rows_within(share, limits.max_seq_len, worst))
                results[rows] = results.get(rows) or self.probe(context, candidate, options, rows)
                while rows > 1 and results[rows]["vmhwm_mb"] > share:  # the fit was optimistic: measure less
                    rows -= 1
                    results[rows] = results.get(rows) or self.probe(context, candidate, options, rows)
        chosen = results[rows]
        if full:  # the proof: the chosen micro-batch, then the largest bodies the service accepts
            chosen = self.probe(context, candidate, options, rows, proof=True)
            while chosen["vmhwm_mb"] > share and rows > 1 and curve is not None:  # fewer rows until it fits
                request_path_mb = chosen["vmhwm_mb"] - results[rows]["vmhwm_mb"]
                rows = max(1, curve.rows_within(share - request_path_mb, limits.max_seq_len, rows - 1))
                results[rows] = results.get(rows) or self.probe(context, candidate, options, rows)
                chosen = self.probe(context, candidate, options, rows, proof=True)
        return Measurement(
            peak_rss_mb=chosen["vmhwm_mb"],
            model_run_peak_mb=results[rows]["vmhwm_mb"],
            request_path=request_path_figures(chosen),
            ru_maxrss_mb=chosen["ru_maxrss_mb"],
            rss_after_imports_mb=chosen["rss_after_imports_mb"],
            rss_after_load_mb=chosen["rss_after_load_mb"],
            batch=rows,
            seq_len=limits.max_seq_len,
            worst_case_peak_mb=results[worst]["vmhwm_mb"],
            predicted_peak_mb=None if curve is None else round(curve.predict(rows * limits.max_seq_len), 1),
            curve=curve,
            session_variant=variant,
            session_options=options,
            session_trials={v: r["vmhwm_mb"] for v, r in trials.items()},
            session_timings={v: timings(r) for v, r in trials.items()},
        )

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        candidates: tuple[Candidate, ...] = state.require("candidates")
        evaluations: dict[str, Evaluation] = state.require("evaluations")
        label = f"{context.model.name}: measure peak RSS"
        measurements = {
            c.variant: self.measure(context, c, full=not evaluation_failures(evaluations[c.variant], self.gates))
            for c in bar(candidates, label)
        }
        return replace(state, measurements=measurements)
