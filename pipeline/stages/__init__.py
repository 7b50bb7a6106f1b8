"""Build stages. Each is a small unit with a typed config and one `run(context, state) -> state`."""

from __future__ import annotations

from typing import Protocol

from pipeline.state import BuildContext, BuildState


class StageError(Exception):
    """A stage failed closed (bad model folder, export mismatch, no candidate passing); exit non-zero."""

    exit_code = 1


class Stage(Protocol):
    @property
    def name(self) -> str: ...

    def run(self, context: BuildContext, state: BuildState) -> BuildState: ...


def default_pipeline(context: BuildContext) -> list[Stage]:
    """The stages of `memfit optimize`, in order, configured from the model's config."""
    from pipeline.stages.approve import ApproveStage
    from pipeline.stages.candidates import CandidatesStage
    from pipeline.stages.data import DataStage
    from pipeline.stages.evaluate import EvaluateStage
    from pipeline.stages.export import ExportStage
    from pipeline.stages.load import LoadStage
    from pipeline.stages.measure import MeasureStage
    from pipeline.stages.prove import ProveStage

    model = context.model
    measure = MeasureStage(
        model.session_options, tuple(model.session_variants), model.measure_repeats, model.gates, model.micro_batch
    )
    return [
        DataStage(model.eval),
        LoadStage(model.source),
        ExportStage(model.export),
        CandidatesStage(tuple(model.candidates), model.gates, model.eval.calibration_size),
        EvaluateStage(model.eval),
        measure,
        ProveStage(measure, model.gates, model.objective, model.min_speedup),
        ApproveStage(model.gates),
    ]
