"""The `memfit` command: init, optimize, verify, plan. Exit 0 on success, 1 when a gate or check fails,
2 for bad config or input, 3 when another run holds the lock; always with a one-line reason."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from serve.artifacts import ArtifactError
from serve.config import ConfigError

DEFAULT_SERVICE = "configs/service.yaml"


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.init import init_model

    if (args.text_column or args.label_column) and not args.data:
        raise ConfigError("--text-column and --label-column describe --data FILE: pass --data too")
    initialized = init_model(
        args.source,
        args.name,
        service_path=Path(args.service) if args.service else None,
        data=Path(args.data) if args.data else None,
        text_column=args.text_column or "text",
        label_column=args.label_column,
        command=" ".join(["memfit", *sys.argv[1:]]),
    )
    for line in initialized.summary():
        print(f"memfit init: {line}")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from pipeline.run import optimize

    runs = optimize(
        Path(args.service),
        only=args.model or None,
        work_root=Path(args.build_dir) if args.build_dir else None,
    )
    for run in runs:
        print(f"memfit: {run.context.model.name}: approved {run.state.approved}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from serve.artifacts import load_approved
    from serve.config import load_service_config, resolve
    from serve.cpu import check_int8_kernels
    from serve.prepacked import choose_weights
    from serve.runtime import MODEL_FILE

    service, path = load_service_config(args.service)
    from pipeline.config import LoadedConfigs

    configs = LoadedConfigs(path)
    failed = 0
    for model, _ in configs.models:
        model_dir = resolve(path, service.artifacts_dir) / model.name
        try:
            artifact = load_approved(model_dir)
            check_int8_kernels(artifact.manifest, model.name)
            prepacking = not artifact.manifest["session_options"].get("disable_prepacking", False)
            weights = choose_weights(artifact.folder / MODEL_FILE, service.shared_weights, prepacking)
        except ArtifactError as exc:
            print(f"memfit: verify {model.name}: FAILED: {exc}")
            failed += 1
            continue
        files = len(artifact.manifest["files"])
        print(f"memfit: verify {model.name}: ok ({artifact.variant_id}, {files} files; {weights.reason})")
    return 1 if failed else 0


def cmd_check_baseline(args: argparse.Namespace) -> int:
    from pipeline.config import LoadedConfigs
    from pipeline.memory.baseline import check_baseline

    configs = LoadedConfigs(Path(args.service))
    names = [model.name for model, _ in configs.models]
    service = configs.service_path.stem
    result = check_baseline(configs.artifacts_dir, Path(args.baseline), names, service, args.tolerance)
    for line in result.notes:
        print(f"memfit: baseline: {line}")
    for line in result.failures:
        print(f"memfit: baseline: FAILED: {line}")
    return 1 if result.failures else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from serve.planner import idle_master_mb, plan_from_config, table

    fits, message = plan_from_config(Path(args.service), workers=args.workers)
    with contextlib.suppress(ArtifactError):
        print("\n".join(table(Path(args.service), idle_master_mb())))
    print(message)
    return 0 if fits else 1


def cmd_serve_bench(args: argparse.Namespace) -> int:
    from pipeline.memory.harness import serve_bench

    result = serve_bench(Path(args.service), requests=args.requests)
    idle, peak = result["idle"], result["peak"]
    print(
        f"memfit serve-bench: {result['requests']} mixed requests (largest {result['largest_request']}) to "
        f"{len(result['models'])} model(s), 1 gunicorn worker, {result['samples']} samples "
        f"(longest gap {result['max_sample_gap_ms']:.0f} ms)"
    )
    print(
        f"  idle  RSS master {idle['master_rss']:.1f} + worker {idle['worker_rss']:.1f} = {idle['total_rss']:.1f} MB;"
        f" PSS {idle['total_pss']:.1f} MB"
    )
    print(
        f"  peak  RSS master {peak['master_rss']:.1f} + worker {peak['worker_rss']:.1f} = {peak['total_rss']:.1f} MB;"
        f" PSS {peak['total_pss']:.1f} MB"
        + (f", own pages {peak['total_own']:.1f} MB" if "total_own" in peak else "")
        + f"; worker VmHWM {result['worker_vmhwm_mb']:.1f} MB"
    )
    print(
        f"  latency p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms; {result['requests_per_s']:.1f} req/s;"
        f" {len(result['failures'])} failed"
    )
    for name, figures in result["models"].items():
        print(
            f"  {name}: {figures['requests']} requests, p50 {figures['p50_ms']:.1f} ms, p95 {figures['p95_ms']:.1f} ms"
        )
    verdict = "within" if result["fits"] else "OVER"
    print(f"  peak {result['peak']['total_rss']:.1f} MB is {verdict} the {result['budget_mb']:.0f} MB budget")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if result["failures"] or not result["fits"] else 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="memfit", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write a model config (and a service config) from a model folder or package")
    init.add_argument("source", help="a Hugging Face model folder, or an installed package that ships one")
    init.add_argument("--name", required=True, help="the model's name in the service (a-z, 0-9, _ and -)")
    init.add_argument(
        "--service", help="add the model to this service config (default: create configs/service-NAME.yaml)"
    )
    init.add_argument(
        "--data", help="a CSV/JSONL file of your texts (default: texts memfit ships, fidelity-only gates)"
    )
    init.add_argument("--text-column", help="the column of --data holding the texts (default: text)")
    init.add_argument("--label-column", help="the column of --data holding labels: gates the task metric too")
    init.set_defaults(func=cmd_init)
    optimize = sub.add_parser("optimize", help="export, shrink, evaluate, measure and approve every model")
    optimize.add_argument("--service", default=DEFAULT_SERVICE)
    optimize.add_argument("--model", action="append", help="only this model (repeatable)")
    optimize.add_argument("--build-dir", help="cache of exports and candidates (default: next to artifacts)")
    optimize.set_defaults(func=cmd_optimize)
    verify = sub.add_parser("verify", help="re-hash every approved artifact against its manifest")
    verify.add_argument("--service", default=DEFAULT_SERVICE)
    verify.set_defaults(func=cmd_verify)
    baseline = sub.add_parser("check-baseline", help="CI gate: approved peak RSS against the committed baseline")
    baseline.add_argument("--service", default=DEFAULT_SERVICE)
    baseline.add_argument("--baseline", default="benchmarks/memory-baseline.json")
    baseline.add_argument("--tolerance", type=float, default=0.10, help="allowed growth (fraction)")
    baseline.set_defaults(func=cmd_check_baseline)
    bench = sub.add_parser("serve-bench", help="measure the real service under gunicorn with a request mix")
    bench.add_argument("--service", default=DEFAULT_SERVICE)
    bench.add_argument("--requests", type=int, default=500)
    bench.add_argument("--json", help="also write the figures to this file")
    bench.set_defaults(func=cmd_serve_bench)
    plan = sub.add_parser("plan", help="how many gunicorn workers fit the budget")
    plan.add_argument("--service", default=DEFAULT_SERVICE)
    plan.add_argument("--workers", type=int, default=None, help="default: $WORKERS or 1")
    plan.set_defaults(func=cmd_plan)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from pipeline.atomic import RunLockError
    from pipeline.stages import StageError
    from serve.artifacts import ArtifactError

    try:
        code = args.func(args)
    except (ConfigError, StageError, RunLockError) as exc:
        print(f"memfit: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except ArtifactError as exc:
        print(f"memfit: error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
