"""Peak RSS of each candidate, in a fresh process, as a function of input size, under the session
options that measure lowest, at the micro-batch (tokens per session run) the service will run: the
fewest full-length rows the whole batch is not measurably faster than (pipeline/micro_batch.py; the
config's `micro_batch: largest_that_fits` keeps the whole batch), lowered while it does not fit the
model's budget share.

A candidate that meets the fidelity gates is measured at its worst-case input (max_batch ×
max_seq_len) under each listed session-option variant, and the lowest peak picks the variant (the first
listed on a tie). The variants are also timed side by side (pipeline/ranking.py), for the report, but
only for the candidates the prove stage proves: the timings decide nothing, because the variants that
cost speed cost it by amounts that sit either side of any threshold from one build to the next (see
`pick_variant`), and they take 4-5 s per MiniLM candidate, 26 s per mpnet one on an idle machine. If
the micro-batch does not fit the share, a few more batch sizes fit the memory curve, which gives
`max_tokens_per_run`, verified by a real measurement (and stepped down until the measurement fits); the
service then runs every request in micro-batches of at most that many tokens. A candidate that misses
a fidelity gate cannot be approved: it is measured once, at the worst case, for the report.

The proof (`prove`: the micro-batch's model runs, then the service's largest bodies through its request
path) is the costliest probe; pipeline/stages/prove.py asks for it only for the candidates the choice
depends on. Probe results are cached, each keyed by what its process is given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipeline.cache import cache_key
from pipeline.config import SESSION_VARIANTS, Gates, MicroBatch, SessionVariant
from pipeline.gates import RSS_TIE, evaluation_failures
from pipeline.memory.curve import MemoryCurve, curve_batches
from pipeline.memory.probe import ProbeError, run_probe
from pipeline.micro_batch import (
    MICRO_BATCH_SLOWDOWN,
    MICRO_BATCH_VERSION,
    fewest_rows_at_full_speed,
    row_timings_from_json,
    row_timings_json,
    time_micro_batches,
)
from pipeline.progress import bar, step
from pipeline.ranking import (
    ROUNDS,
    WORST_CASE_ROUNDS,
    SessionTimings,
    time_sessions,
    timings_from_json,
    timings_json,
)
from pipeline.stages import StageError
from pipeline.state import BuildContext, BuildState, Candidate, Evaluation, Measurement
from serve.artifacts import sha256_file
from serve.config import SessionSettings
from serve.runtime import MODEL_FILE

SESSION_TIMING_VERSION = 1  # bump when session timing changes: cached timings keyed on it are then redone
MEASUREMENT_VERSION = 13  # bump when probing changes: cached probes keyed on it are then redone


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


@dataclass(frozen=True)
class MeasureStage:
    session: SessionSettings
    variants: tuple[SessionVariant, ...]
    repeats: int
    gates: Gates
    micro_batch: MicroBatch = "fewest_at_full_speed"
    name: str = "measure"

    def probe(
        self, context: BuildContext, candidate: Candidate, options: dict[str, Any], rows: int, proof: bool = False
    ) -> dict[str, Any]:
        """One probe at `rows` full-length rows per run; `proof` adds the request path's hostile bodies.
        Cached per probe, keyed by everything the probe process is given (the model by its bytes), so a
        changed budget or variant list re-runs only the probes that differ."""
        key = self.probe_key(context, candidate, options, rows, proof)
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

    def probe_key(
        self, context: BuildContext, candidate: Candidate, options: dict[str, Any], rows: int, proof: bool
    ) -> str:
        return cache_key(
            version=MEASUREMENT_VERSION,
            model=sha256_file(candidate.folder / MODEL_FILE),
            options=options,
            rows=rows,
            proof=proof,
            repeats=self.repeats,
            limits=context.service.limits.model_dump(),
            threads=context.service.threads,
        )

    def proven_before(self, context: BuildContext, candidate: Candidate, measured: Measurement) -> bool:
        """Whether the proof at the measured micro-batch is cached: a rerun then proves nothing anew."""
        key = self.probe_key(context, candidate, measured.session_options, measured.batch, proof=True)
        return context.results.get("probe", key) is not None

    def options(self, variant: SessionVariant) -> dict[str, Any]:
        return {**self.session.model_dump(), **SESSION_VARIANTS[variant]}

    def with_session_timings(self, context: BuildContext, candidate: Candidate, measured: Measurement) -> Measurement:
        """`measured` with its session variants' timings, for the report: a candidate measured under more
        than one variant (it meets the fidelity gates)."""
        if len(measured.session_trials) < 2:
            return measured
        return replace(measured, session_timings=timings_json(self.session_timings(context, candidate)))

    def session_timings(self, context: BuildContext, candidate: Candidate) -> SessionTimings:
        """Every session variant of one candidate timed side by side (pipeline/ranking.py); cached on
        the model's bytes and the variants' options."""
        sessions = {v: self.options(v) for v in self.variants}
        key = cache_key(
            version=SESSION_TIMING_VERSION,
            model=sha256_file(candidate.folder / MODEL_FILE),
            sessions=sessions,
            limits=context.service.limits.model_dump(),
            rounds=[WORST_CASE_ROUNDS, ROUNDS],
        )
        found = context.results.get("session-timing", key)
        if found is None:
            settings: dict[str, SessionSettings] = {v: SessionSettings(**options) for v, options in sessions.items()}
            with step(f"{context.model.name}: time {candidate.variant}'s session variants side by side"):
                found = timings_json(time_sessions(candidate.folder, settings, context.service.limits))
            context.results.put("session-timing", key, found)
        return timings_from_json(found)

    def pick_variant(
        self, context: BuildContext, candidate: Candidate, full: bool
    ) -> tuple[SessionVariant, dict[SessionVariant, dict[str, Any]]]:
        """The session variant with the lowest worst-case peak (the first listed within RSS_TIE of it) and
        every listed variant's worst-case probe; a candidate that misses a fidelity gate gets the first
        listed only.
        Speed decides nothing here. Timed side by side on MiniLM (benchmarks/results/optimize-minilm-
        2026-12-06*.md), memory pattern on took 0.93-1.16x configured's time on the worst case and
        0.96-1.43x on one text, and peaked 20-34% higher. Arena off and prepacking off trade speed for
        memory, by amounts that vary with the candidate and the machine's load: arena off 1.15-1.71x on
        the worst case, prepacking off up to 34x on one text. A threshold on such ratios picked another
        session in each build whose ratio fell on its other side, and moved the approval's memory figures
        by 12-17%. So the model config lists the variants it accepts, and the default list holds the two
        that are not meant to trade speed for memory.
        """
        variants = self.variants if full else self.variants[:1]
        worst = context.service.limits.max_batch
        trials = {v: self.probe(context, candidate, self.options(v), worst) for v in variants}
        floor = min(t["vmhwm_mb"] for t in trials.values())
        variant = next(v for v in variants if trials[v]["vmhwm_mb"] <= floor * (1 + RSS_TIE))
        return variant, trials

    def micro_batch_rows(
        self, context: BuildContext, candidate: Candidate, options: dict[str, Any]
    ) -> tuple[int, dict[str, dict[str, Any]]]:
        """Rows per run by speed (pipeline/micro_batch.py) and the worst-case timings behind them, cached
        on the model's bytes and the session options; the whole batch, untimed, under
        `largest_that_fits`."""
        limits = context.service.limits
        if self.micro_batch == "largest_that_fits" or limits.max_batch == 1:
            return limits.max_batch, {}
        key = cache_key(
            version=MICRO_BATCH_VERSION,
            model=sha256_file(candidate.folder / MODEL_FILE),
            options=options,
            limits=limits.model_dump(),
            slowdown=MICRO_BATCH_SLOWDOWN,
        )
        found = context.results.get("micro-batch-timing", key)
        if found is None:
            with step(f"{context.model.name}: time {candidate.variant} at fewer rows per run"):
                found = row_timings_json(time_micro_batches(candidate.folder, SessionSettings(**options), limits))
            context.results.put("micro-batch-timing", key, found)
        return fewest_rows_at_full_speed(row_timings_from_json(found), limits.max_batch), found

    def curve(self, context: BuildContext, candidate: Candidate, options: dict[str, Any]) -> MemoryCurve:
        """Peaks at a few batch sizes of full-length rows, fitted as a line (pipeline/memory/curve.py)."""
        seq_len = context.service.limits.max_seq_len
        rows = curve_batches(context.service.limits.max_batch)
        points = [(r * seq_len, self.probe(context, candidate, options, r)["vmhwm_mb"]) for r in rows]
        return MemoryCurve.fit(points)

    def measure(self, context: BuildContext, candidate: Candidate, full: bool) -> Measurement:
        """The session variant, the worst case, the micro-batch by speed and, where that is over the
        share, the curve and the largest micro-batch whose model runs fit it (stepped down while a
        measurement is over). No proof: `prove` adds it for the candidates the choice depends on
        (pipeline/stages/prove.py)."""
        limits = context.service.limits
        share = context.share_mb
        variant, trials = self.pick_variant(context, candidate, full)
        options = self.options(variant)
        rows, timings = self.micro_batch_rows(context, candidate, options) if full else (limits.max_batch, {})
        curve = None
        if full and self.probe(context, candidate, options, rows)["vmhwm_mb"] > share:
            curve = self.curve(context, candidate, options)
            rows = max(1, curve.rows_within(share, limits.max_seq_len, rows))
            while rows > 1 and self.probe(context, candidate, options, rows)["vmhwm_mb"] > share:
                rows -= 1  # the fit was optimistic: measure less
        model_runs = self.probe(context, candidate, options, rows)
        return Measurement(
            peak_rss_mb=model_runs["vmhwm_mb"],
            model_run_peak_mb=model_runs["vmhwm_mb"],
            request_path=None,
            ru_maxrss_mb=model_runs["ru_maxrss_mb"],
            rss_after_imports_mb=model_runs["rss_after_imports_mb"],
            rss_after_load_mb=model_runs["rss_after_load_mb"],
            batch=rows,
            seq_len=limits.max_seq_len,
            worst_case_peak_mb=trials[variant]["vmhwm_mb"],
            predicted_peak_mb=None if curve is None else round(curve.predict(rows * limits.max_seq_len), 1),
            curve=curve,
            session_variant=variant,
            session_options=options,
            session_trials={v: r["vmhwm_mb"] for v, r in trials.items()},
            session_timings={},  # timed for the proven candidates only (with_session_timings)
            micro_batch_timings=timings,
        )

    def prove(self, context: BuildContext, candidate: Candidate, measured: Measurement) -> Measurement:
        """The proof: the micro-batch's model runs, then the largest bodies the service accepts; while it
        is over the share, fewer rows (the curve less the request path's part as measured) and again."""
        limits = context.service.limits
        share = context.share_mb
        options = measured.session_options
        curve = measured.curve or self.curve(context, candidate, options)
        rows = measured.batch
        proof = self.probe(context, candidate, options, rows, proof=True)
        while proof["vmhwm_mb"] > share and rows > 1:
            request_path_mb = proof["vmhwm_mb"] - self.probe(context, candidate, options, rows)["vmhwm_mb"]
            rows = max(1, curve.rows_within(share - request_path_mb, limits.max_seq_len, rows - 1))
            proof = self.probe(context, candidate, options, rows, proof=True)
        return replace(
            measured,
            peak_rss_mb=proof["vmhwm_mb"],
            model_run_peak_mb=self.probe(context, candidate, options, rows)["vmhwm_mb"],
            request_path=request_path_figures(proof),
            ru_maxrss_mb=proof["ru_maxrss_mb"],
            rss_after_imports_mb=proof["rss_after_imports_mb"],
            rss_after_load_mb=proof["rss_after_load_mb"],
            batch=rows,
            predicted_peak_mb=round(curve.predict(rows * limits.max_seq_len), 1),
            curve=curve,
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
