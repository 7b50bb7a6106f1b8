"""`memfit optimize`: run the stage list for every model of a service config, then report."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import TMP_PREFIX, remove_leftovers, run_lock
from pipeline.cache import ResultCache
from pipeline.config import LoadedConfigs
from pipeline.memory.service_fit import measure_service, write_service_fit
from pipeline.progress import step
from pipeline.report import write_report
from pipeline.stages import StageError, default_pipeline
from pipeline.stages.approve import settle
from pipeline.state import BuildContext, BuildState
from serve.artifacts import PENDING_FILE, ArtifactError
from serve.config import ConfigError

SERVICE_WORK_DIR = "_service"  # beside the models' build folders; a model name cannot start with "_"


@dataclass(frozen=True)
class ModelRun:
    context: BuildContext
    state: BuildState
    seconds: dict[str, float]  # each stage's wall time in this run (a cached stage takes little)


def sweep_leftovers(root: Path) -> None:
    """Remove temp folders that a killed run left anywhere under `root`."""
    if root.is_dir():
        for folder in {p.parent for p in root.rglob(f"{TMP_PREFIX}*")}:
            remove_leftovers(folder)


def optimize(service_path: Path, only: list[str] | None = None, work_root: Path | None = None) -> list[ModelRun]:
    configs = LoadedConfigs(service_path)
    names = [model.name for model, _ in configs.models]
    unknown = [name for name in only or [] if name not in names]
    if unknown:
        raise ConfigError(f"--model {unknown[0]!r} is not a model of {service_path} ({', '.join(names)})")
    artifacts_root = configs.artifacts_dir
    work_root = work_root or artifacts_root.parent / "build"
    # Every model of the service stays locked until its approvals are settled: the whole-service fit
    # measures them all, and publishes or withdraws them together.
    with contextlib.ExitStack() as locks:
        for name in names:
            locks.enter_context(run_lock(artifacts_root / name))
            (artifacts_root / name / PENDING_FILE).unlink(missing_ok=True)  # left by a killed run
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
            sweep_leftovers(context.work_dir)
            remove_leftovers(context.artifacts_dir)
            state = BuildState()
            seconds = {}
            for stage in default_pipeline(context):
                with step(f"{model.name}: stage {stage.name}") as took:
                    state = stage.run(context, state)
                seconds[stage.name] = round(took.seconds, 1)
            runs.append(ModelRun(context, state, seconds))
        return settle_service(configs, runs, ResultCache(work_root / SERVICE_WORK_DIR / "results"))


def settle_service(configs: LoadedConfigs, runs: list[ModelRun], cache: ResultCache) -> list[ModelRun]:
    """Measure the whole service on the new approvals; publish them all when it fits, else none."""
    artifacts_root = configs.artifacts_dir
    refused = [run for run in runs if run.state.approved is None]
    fit = None
    if not refused:
        try:
            with step("whole-service fit"):
                fit = measure_service(configs, cache)
        except ArtifactError as exc:  # e.g. `--model` ran one model and another has no approval yet
            print(f"memfit: whole-service fit not measured: {exc}", file=sys.stderr)
    # All or nothing: the new approvals are published only together, and only when the service fits.
    publish = not refused and (fit is None or fit["fits"])
    for run in runs:
        settle(run.context.artifacts_dir, publish)
    if fit is not None and publish:
        write_service_fit(fit, artifacts_root)
    write_report(runs, artifacts_root, configs.service, fit)
    if refused:
        lines = []
        for run in refused:
            lines += [f"  {run.context.model.name}/{v.variant}: {'; '.join(v.failures)}" for v in run.state.verdicts]
        refused_names = ", ".join(run.context.model.name for run in refused)
        raise StageError(
            f"no candidate of {refused_names} passes every gate; previous approvals left untouched\n" + "\n".join(lines)
        )
    if fit is not None and not fit["fits"]:
        raise StageError(
            f"the service does not fit: one worker at every model's worst case peaks at {fit['total_mb']:.0f} MB "
            f"({fit['counted_by']}, waiting bodies included) > budget {fit['budget_mb']:.0f} MB; "
            "previous approvals left untouched"
        )
    return runs
