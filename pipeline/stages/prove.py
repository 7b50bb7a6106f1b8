"""Choose the candidate to approve, proving only what the choice depends on.

A proof (the micro-batch's model runs, then the service's largest bodies in their nastiest forms through
its request path, TRUNCATE off and on) is the costliest measurement of a build: the bodies that are
truncated run the model at its micro-batch twenty times. The ranking (pipeline/gates.py: speed, worst-case
peak, fidelity) never reads a proof; a proof only decides whether a candidate fits its share. So the
candidates that pass every gate on their model runs are ranked, and the chosen one is proven together
with the deciders: the candidate each applied criterion measured the others against (the fastest sets
the 1.5× bar). A proof over the share fails that gate and the rest are ranked again. Once the chosen
candidate and every decider fit, the others' absence could not change which candidates clear each bar,
so the choice is the one that proving every candidate would make. The others keep their model-run
figures, and the report shows them unproven; the proven ones also get their session variants timed, for
the report (pipeline/stages/measure.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

from pipeline.cache import cache_key
from pipeline.config import Gates
from pipeline.gates import gate_failures, select
from pipeline.progress import step
from pipeline.ranking import ROUNDS, TEXTS_PER_ROUND, Timing, one_text_requests, time_interleaved
from pipeline.stages.measure import MeasureStage
from pipeline.state import BuildContext, BuildState, Evaluation, Measurement
from serve.artifacts import sha256_file
from serve.config import SessionSettings
from serve.runtime import MODEL_FILE, ModelRuntime

RANKING_VERSION = 2  # bump when the timing changes: cached rankings keyed on it are then redone


@dataclass(frozen=True)
class ProveStage:
    measure: MeasureStage
    gates: Gates
    objective: str
    min_speedup: float
    name: str = "prove"

    def timings(self, context: BuildContext, state: BuildState, passing: list[str]) -> dict[str, Timing]:
        """The passing candidates timed together, interleaved, with the session options each ships with;
        cached on their model bytes and options, so a rerun decides as the first run did."""
        if len(passing) < 2:
            return {}
        measurements: dict[str, Measurement] = state.require("measurements")
        folders = {c.variant: c.folder for c in state.candidates}
        texts = list(state.require("dataset").test.texts[:TEXTS_PER_ROUND])
        key = cache_key(
            version=RANKING_VERSION,
            candidates={n: [sha256_file(folders[n] / MODEL_FILE), measurements[n].session_options] for n in passing},
            texts=texts,
            rounds=ROUNDS,
        )
        found = context.results.get("ranking", key)
        if found is None:
            limits = context.service.limits
            runtimes = {
                name: ModelRuntime(
                    folders[name],
                    SessionSettings.model_validate(measurements[name].session_options),
                    limits.max_seq_len,
                    measurements[name].batch * limits.max_seq_len,
                    limits.max_batch,
                )
                for name in passing
            }
            with step(f"{context.model.name}: time {len(passing)} passing candidates, interleaved, {ROUNDS} rounds"):
                found = {name: t.to_json() for name, t in time_interleaved(runtimes, one_text_requests(texts)).items()}
            context.results.put("ranking", key, found)
        return {name: Timing(**values) for name, values in found.items()}

    def run(self, context: BuildContext, state: BuildState) -> BuildState:
        evaluations: dict[str, Evaluation] = state.require("evaluations")
        measurements = dict(state.require("measurements"))
        eligible = [c.variant for c in state.candidates if c.variant in context.model.candidates]
        passing = [
            name
            for name in eligible
            if not gate_failures(evaluations[name], measurements[name], self.gates, context.share_mb)
        ]
        timings = self.timings(context, state, passing)
        candidates = {c.variant: c for c in state.candidates}
        while True:
            verdicts = select(
                eligible,
                evaluations,
                measurements,
                self.gates,
                context.share_mb,
                self.objective,
                timings,
                self.min_speedup,
            )
            unproven = [
                v.variant for v in verdicts if (v.chosen or v.decides) and measurements[v.variant].request_path is None
            ]
            if not unproven:
                return replace(state, measurements=measurements, verdicts=verdicts)
            for name in unproven:
                candidate, measured = candidates[name], measurements[name]
                cached = self.measure.proven_before(context, candidate, measured)  # a rerun reads, says nothing
                with nullcontext() if cached else step(f"{context.model.name}: prove {name} through the request path"):
                    measurements[name] = self.measure.prove(context, candidate, measured)
                measurements[name] = self.measure.with_session_timings(context, candidate, measurements[name])
