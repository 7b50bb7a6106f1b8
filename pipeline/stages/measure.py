"""Peak RSS of each candidate, in a fresh process, as a function of input size, and the largest
micro-batch (tokens per session run) that keeps it within the model's budget share.

A candidate whose worst-case input (max_batch × max_seq_len) fits is measured there. One that does
not fit gets `max_tokens_per_run` from its fitted memory curve, verified by a real measurement (and
stepped down until the measurement fits); the service then runs every request in micro-batches of
at most that many tokens, so the proven peak holds for any accepted request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import SessionConfig
from pipeline.measure import ProbeError, run_probe
from pipeline.memory_curve import MemoryCurve, curve_batches
from pipeline.progress import bar
from pipeline.stages import StageError
from pipeline.state import BuildContext, BuildState, Candidate, Measurement


@dataclass(frozen=True)
class MeasureStage:
    session: SessionConfig
    repeats: int
    name: str = "measure"

    def probe(self, context: BuildContext, candidate: Candidate, rows: int) -> dict[str, Any]:
        try:
            model = {"folder": str(candidate.folder), "session_options": self.session.model_dump(), "batch": rows}
            return run_probe([model], seq_len=context.service.limits.max_seq_len, repeats=self.repeats)
        except ProbeError as exc:
            raise StageError(f"{context.model.name}: {candidate.variant}: {exc}") from None

    def measure(self, context: BuildContext, candidate: Candidate) -> Measurement:
        limits = context.service.limits
        share = context.service.model_share_mb
        results = {rows: self.probe(context, candidate, rows) for rows in curve_batches(limits.max_batch)}
        curve = MemoryCurve.fit([(rows * limits.max_seq_len, r["vmhwm_mb"]) for rows, r in results.items()])
        rows = limits.max_batch
        if results[rows]["vmhwm_mb"] > share:
            rows = max(1, curve.rows_within(share, limits.max_seq_len, limits.max_batch))
            results[rows] = results.get(rows) or self.probe(context, candidate, rows)
            while rows > 1 and results[rows]["vmhwm_mb"] > share:  # the fit was optimistic: measure less
                rows -= 1
                results[rows] = results.get(rows) or self.probe(context, candidate, rows)
        chosen = results[rows]
        return Measurement(
            peak_rss_mb=chosen["vmhwm_mb"],
            ru_maxrss_mb=chosen["ru_maxrss_mb"],
            rss_after_imports_mb=chosen["rss_after_imports_mb"],
            rss_after_load_mb=chosen["rss_after_load_mb"],
            batch=rows,
            seq_len=limits.max_seq_len,
            worst_case_peak_mb=results[limits.max_batch]["vmhwm_mb"],
            predicted_peak_mb=round(curve.predict(rows * limits.max_seq_len), 1),
            curve=curve,
        )

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        candidates: tuple[Candidate, ...] = state.require("candidates")
        label = f"{context.model.name}: measure peak RSS"
        measurements = {c.variant: self.measure(context, c) for c in bar(candidates, label)}
        return replace(state, measurements=measurements)
