"""`memfit optimize`: run the stage list for every model of a service config, then report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import TMP_PREFIX, remove_leftovers, run_lock
from pipeline.config import LoadedConfigs
from pipeline.progress import step
from pipeline.report import write_report
from pipeline.stages import StageError, default_pipeline
from pipeline.state import BuildContext, BuildState


@dataclass(frozen=True)
class ModelRun:
    context: BuildContext
    state: BuildState


def sweep_leftovers(root: Path) -> None:
    """Remove temp folders that a killed run left anywhere under `root`."""
    if root.is_dir():
        for folder in {p.parent for p in root.rglob(f"{TMP_PREFIX}*")}:
            remove_leftovers(folder)


def optimize(service_path: Path, only: list[str] | None = None, work_root: Path | None = None) -> list[ModelRun]:
    configs = LoadedConfigs(service_path)
    artifacts_root = configs.artifacts_dir
    work_root = work_root or artifacts_root.parent / "build"
    runs = []
    for model, config_path in configs.models:
        if only and model.name not in only:
            continue
        context = BuildContext(
            model=model,
            config_path=config_path,
            service=configs.service,
            service_path=configs.service_path,
            work_dir=work_root / model.name,
            artifacts_dir=artifacts_root / model.name,
        )
        with run_lock(context.artifacts_dir):
            sweep_leftovers(context.work_dir)
            remove_leftovers(context.artifacts_dir)
            state = BuildState()
            for stage in default_pipeline(context):
                with step(f"{model.name}: stage {stage.name}"):
                    state = stage.run(context, state)
        runs.append(ModelRun(context, state))
    write_report(runs, artifacts_root, configs.service)
    refused = [run for run in runs if run.state.approved is None]
    if refused:
        lines = []
        for run in refused:
            lines += [f"  {run.context.model.name}/{v.variant}: {'; '.join(v.failures)}" for v in run.state.verdicts]
        names = ", ".join(run.context.model.name for run in refused)
        raise StageError(
            f"no candidate of {names} passes every gate; previous approval left untouched\n" + "\n".join(lines)
        )
    return runs
