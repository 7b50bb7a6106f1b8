"""The `memfit` command: optimize, verify, plan. Exit 0 on success, 1 when a gate or check fails,
2 for bad config or input, 3 when another run holds the lock; always with a one-line reason."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serve.config import ConfigError

DEFAULT_SERVICE = "configs/service.yaml"


def cmd_optimize(args: argparse.Namespace) -> int:
    from pipeline.run import optimize

    runs = optimize(Path(args.service), only=args.model or None,
                    work_root=Path(args.build_dir) if args.build_dir else None)
    for run in runs:
        print(f"memfit: {run.context.model.name}: approved {run.state.approved}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from serve.artifacts import ArtifactError, load_approved
    from serve.config import load_service_config, resolve

    service, path = load_service_config(args.service)
    from pipeline.config import LoadedConfigs

    configs = LoadedConfigs(path)
    failed = 0
    for model, _ in configs.models:
        model_dir = resolve(path, service.artifacts_dir) / model.name
        try:
            artifact = load_approved(model_dir)
        except ArtifactError as exc:
            print(f"memfit: verify {model.name}: FAILED: {exc}")
            failed += 1
            continue
        print(f"memfit: verify {model.name}: ok ({artifact.variant_id}, {len(artifact.manifest['files'])} files)")
    return 1 if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from serve.planner import plan_from_config

    fits, message = plan_from_config(Path(args.service), workers=args.workers)
    print(message)
    return 0 if fits else 1


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="memfit", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    optimize = sub.add_parser("optimize", help="export, shrink, evaluate, measure and approve every model")
    optimize.add_argument("--service", default=DEFAULT_SERVICE)
    optimize.add_argument("--model", action="append", help="only this model (repeatable)")
    optimize.add_argument("--build-dir", help="cache of exports and candidates (default: next to artifacts)")
    optimize.set_defaults(func=cmd_optimize)
    verify = sub.add_parser("verify", help="re-hash every approved artifact against its manifest")
    verify.add_argument("--service", default=DEFAULT_SERVICE)
    verify.set_defaults(func=cmd_verify)
    plan = sub.add_parser("plan", help="how many gunicorn workers fit the budget")
    plan.add_argument("--service", default=DEFAULT_SERVICE)
    plan.add_argument("--workers", type=int, default=None, help="default: $WORKERS or 1")
    plan.set_defaults(func=cmd_plan)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from pipeline.atomic import RunLockError
    from pipeline.stages import StageError

    try:
        code = args.func(args)
    except (ConfigError, StageError, RunLockError) as exc:
        print(f"memfit: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
