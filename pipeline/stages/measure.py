"""Peak RSS of each candidate, in a fresh process, at the worst-case input the service accepts."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.config import SessionConfig
from pipeline.measure import ProbeError, run_probe
from pipeline.progress import bar
from pipeline.stages import StageError
from pipeline.state import BuildContext, BuildState, Candidate, Measurement


@dataclass(frozen=True)
class MeasureStage:
    session: SessionConfig
    repeats: int
    name: str = "measure"

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        candidates: tuple[Candidate, ...] = state.require("candidates")
        limits = context.service.limits
        measurements = {}
        for candidate in bar(candidates, f"{context.model.name}: measure peak RSS"):
            try:
                result = run_probe(
                    [{"folder": str(candidate.folder), "session_options": self.session.model_dump()}],
                    batch=limits.max_batch,
                    seq_len=limits.max_seq_len,
                    max_tokens_per_run=context.max_tokens_per_run,
                    repeats=self.repeats,
                )
            except ProbeError as exc:
                raise StageError(f"{context.model.name}: {candidate.variant}: {exc}") from None
            measurements[candidate.variant] = Measurement(
                peak_rss_mb=result["vmhwm_mb"],
                ru_maxrss_mb=result["ru_maxrss_mb"],
                rss_after_imports_mb=result["rss_after_imports_mb"],
                rss_after_load_mb=result["rss_after_load_mb"],
                batch=limits.max_batch,
                seq_len=limits.max_seq_len,
            )
        return replace(state, measurements=measurements)
