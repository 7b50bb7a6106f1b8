"""Plumbing of the whole pipeline on tiny random-weight models: both tasks, reports, fail-closed gates."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.memory.cgroup import unavailable_reason as cgroup_reason
from serve.artifacts import APPROVED_FILE, PENDING_FILE, load_approved
from tests.conftest import TinyRun
from tests.helpers import memfit

MANIFEST_KEYS = {
    "model",
    "task",
    "source",
    "variant",
    "files",
    "session_options",
    "limits",
    "budget_mb",
    "metrics",
    "gates",
    "versions",
    "created_at",
}


def test_both_tasks_are_approved_with_complete_manifests(tiny_run: TinyRun) -> None:
    embed = load_approved(tiny_run.artifacts / "tiny-embed").manifest
    clf = load_approved(tiny_run.artifacts / "tiny-clf").manifest
    for manifest in (embed, clf):
        assert set(manifest) >= MANIFEST_KEYS
        # What the proof covers: the model runs, and the request path up to these limits.
        chars = manifest["limits"]["max_input_chars"]
        rows = manifest["metrics"]["measured_at"]["batch"]  # by speed (pipeline/micro_batch.py): 1, 2, 4 or 8
        assert rows in (1, 2, 4, 8) and str(rows) in manifest["metrics"]["micro_batch_timings"]
        assert manifest["limits"] == {
            "max_batch": 8,
            "max_seq_len": 64,
            "max_tokens_per_run": rows * 64,
            "max_body_bytes": 1_048_576,
            "max_input_chars": chars,
            "max_request_chars": 8 * chars,
            "threads": 16,
        }
        assert chars == 64 * 19  # MiniLM's tokenizer: its longest piece is 18 characters
        proof = manifest["metrics"]
        assert proof["peak_rss_mb"] >= proof["model_run_peak_mb"]
        assert sum(proof["request_path"]["statuses"].values()) == 2 * 2 * 10  # 10 bodies, TRUNCATE off/on, twice
        assert proof["request_path"]["allocator_pinned"] is True
        assert manifest["machine"]["cpu_flags_sha256"]
        curve = manifest["metrics"]["memory_curve"]
        assert [p["tokens"] for p in curve["points"]] == [64, 128, 256, 512]
        assert manifest["metrics"]["peak_rss_mb"] > manifest["metrics"]["rss_after_imports_mb"] > 0
        assert manifest["metrics"]["accuracy"]["n_test"] == 300
        assert {"python", "onnx", "onnxruntime", "torch", "transformers", "optimum-onnx"} <= set(manifest["versions"])
        assert len(manifest["source"]["weights_sha256"]) == 64
    assert set(embed["metrics"]["cosine"]) == {"mean", "min"}
    assert "overlap_at_10" in embed["metrics"]["neighbours"]
    assert embed["runtime"] == {"task": "feature-extraction", "pooling": "mean", "normalize": True, "labels": []}
    assert 0 <= clf["metrics"]["agreement"] <= 1
    assert clf["runtime"]["labels"] == ["rotten", "fresh"]


def test_export_was_validated_against_pytorch_and_sentence_transformers(tiny_run: TinyRun) -> None:
    report = json.loads((tiny_run.artifacts / "report.json").read_text())
    validation = {m["model"]: m["export_validation"] for m in report["models"]}
    assert validation["tiny-embed"]["max_abs_diff"] <= 1e-4
    assert validation["tiny-embed"]["min_cosine_vs_sentence_transformers"] >= 0.9999
    assert validation["tiny-clf"]["max_abs_diff"] <= 1e-4


def test_report_lists_every_candidate_with_a_verdict(tiny_run: TinyRun) -> None:
    report = json.loads((tiny_run.artifacts / "report.json").read_text())
    for model in report["models"]:
        variants = [row["variant"] for row in model["candidates"]]
        assert variants == [
            "fp32",
            "fp32-optimized",
            "int8-qint8-per-channel",
            "int8-mixed-qint8-per-channel",
            "wo8-matmul-b32",
            "wo8-matmul-b32-int8-compute",
        ]
        assert sum(row["verdict"] == "approved" for row in model["candidates"]) == 1
        stages = {"data", "load", "export", "candidates", "evaluate", "measure", "prove", "approve"}
        assert set(model["stage_seconds"]) == stages and all(s >= 0 for s in model["stage_seconds"].values())
    assert report["service_fit"]["seconds"] > 0
    markdown = (tiny_run.artifacts / "report.md").read_text()
    assert "| variant | file MB | worst-case peak MB | session | tokens/run |" in markdown
    assert re.search(r"^Time: [\d,.]+ s \(data [\d.]+ s, load [\d.]+ s, export ", markdown, re.MULTILINE)
    assert (tiny_run.artifacts / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_command(tiny_run: TinyRun, tmp_path: Path) -> None:
    done = memfit("verify", "--service", str(tiny_run.service))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify tiny-embed: ok" in done.stdout
    # A damaged copy fails verification with a non-zero exit.
    root = tmp_path / "copy"
    shutil.copytree(tiny_run.root / "configs", root / "configs")
    shutil.copytree(tiny_run.artifacts, root / "artifacts")
    shutil.copytree(tiny_run.root / "models", root / "models")
    model = load_approved(root / "artifacts" / "tiny-clf").folder / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    done = memfit("verify", "--service", str(root / "configs" / "service.yaml"))
    assert done.returncode == 1
    assert "verify tiny-clf: FAILED" in done.stdout and "model.onnx" in done.stdout


def rerun_tiny_embed(tiny_run: TinyRun, root: Path, **changes: object) -> subprocess.CompletedProcess[str]:
    """Copy the tiny run (configs, models, artifacts) to `root`, change tiny-embed's config, re-optimize it."""
    for name in ("configs", "models", "artifacts"):
        shutil.copytree(tiny_run.root / name, root / name)
    config_path = root / "configs" / "models" / "tiny-embed.yaml"
    config = yaml.safe_load(config_path.read_text())
    config.update(changes)
    config_path.write_text(yaml.safe_dump(config))
    service = str(root / "configs" / "service.yaml")
    return memfit(
        "optimize", "--service", service, "--model", "tiny-embed", "--build-dir", str(tiny_run.root / "build")
    )


def test_no_passing_candidate_exits_1_and_keeps_previous_approval(tiny_run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "strict"
    before = (tiny_run.artifacts / "tiny-embed" / APPROVED_FILE).read_bytes()
    strict = {"max_metric_drop_pt": 100.0, "min_mean_cosine": 1.0, "min_overlap_at_10": 0.0}  # int8 is never fp32
    done = rerun_tiny_embed(
        tiny_run, root, gates=strict, candidates=["int8-qint8-per-channel", "int8-qint8-per-tensor"]
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()
    assert any(line.startswith("memfit: error: no candidate of tiny-embed passes every gate") for line in last)
    assert any(line.startswith("  tiny-embed/int8-qint8-per-channel: mean cosine") for line in last)
    assert (root / "artifacts" / "tiny-embed" / APPROVED_FILE).read_bytes() == before
    load_approved(root / "artifacts" / "tiny-embed")


def test_weight_only_candidates_keep_fidelity(tiny_run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "wo"
    names = ["wo8-matmul-b32", "wo8-matmul-gather-b32", "wo4-matmul-b32"]
    done = rerun_tiny_embed(tiny_run, root, candidates=names)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        r["variant"]: r for r in json.loads((root / "artifacts" / "report.json").read_text())["models"][0]["candidates"]
    }
    assert set(rows) == {"fp32", *names}
    assert rows["wo8-matmul-b32"]["cosine_mean"] >= 0.999  # 8-bit weights, fp32 activations
    assert rows["wo8-matmul-gather-b32"]["cosine_mean"] >= 0.999
    # The tiny model is mostly its 30k-row embedding table: in 8-bit blocks the file shrinks by over half.
    assert rows["wo8-matmul-gather-b32"]["file_mb"] < rows["wo8-matmul-b32"]["file_mb"] / 2
    assert rows["wo4-matmul-b32"]["cosine_mean"] < rows["wo8-matmul-b32"]["cosine_mean"]


def test_whole_service_fit_is_measured_and_used_by_the_planner(tiny_run: TinyRun) -> None:
    """The real service, W = 1..4 workers in lockstep: every worker answered every body, none was
    killed or replaced, the line through the peaks predicts each within 5%, and the planner uses it."""
    fit = json.loads((tiny_run.artifacts / "service-fit.json").read_text())
    assert [m["model"] for m in fit["models"]] == ["tiny-embed", "tiny-clf"]
    runs = fit["runs"]
    assert [run["workers"] for run in runs] == [1, 2, 3, 4] and fit["max_workers_measured"] == 4
    bodies = sum(runs[0]["statuses"].values())
    for run in runs:
        assert sum(run["statuses"].values()) == bodies * run["workers"]
        assert not any(int(code) >= 500 for code in run["statuses"]), run["statuses"]
        assert len(run["worker_vmhwm_mb"]) == run["workers"] and not run["workers_replaced"]
        assert abs(run["line_error"]) <= 0.05 and abs(run["own_line_error"]) <= 0.05, run
        if run["cgroup"] is not None:
            assert run["cgroup"]["oom_kills"] == 0 and run["cgroup"]["peak_mb"] > 0
            assert abs(run["cgroup_line_error"]) <= 0.05, run  # the second line, through the container's peaks
            # This test process maps onnxruntime and Python's own library too: the pages of them the
            # service maps stayed cached, charged to it, and count as the container's.
            assert run["uncharged_mb"] > 0, run
    # Own pages (each page master and workers map, once) where frame numbers can be read: never below the
    # PSS sum, which gives away the share of pages that processes outside the service map too.
    own = "own pages" if runs[0]["own_peak_mb"] is not None else "pss"
    assert fit["counted_by"] == (f"max(cgroup, {own})" if cgroup_reason() is None else own)
    assert all(run["own_peak_mb"] is None or run["own_peak_mb"] >= run["pss_peak_mb"] for run in runs)
    assert fit["worker_peak_mb"] >= fit["one_process"]["worker_peak_mb"]
    assert fit["fits"] and "## Whole service" in (tiny_run.artifacts / "report.md").read_text()
    done = memfit("plan", "--service", str(tiny_run.service), "--workers", "2")
    assert done.returncode == 0
    planned = fit["runs"][1]["planned_mb"]
    assert f"WORKERS=2 needs ~{planned:,.0f} MB (measured with 2 workers at " in done.stdout


def test_finetuned_classifier_source_is_trained_once_and_optimized(tiny_run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "ft"
    shutil.copytree(tiny_run.root / "configs", root / "configs")
    shutil.copytree(tiny_run.root / "models", root / "models")
    config = yaml.safe_load((root / "configs" / "models" / "tiny-clf.yaml").read_text())
    config["name"] = "tiny-ft"
    config["source"] = {
        "finetune": {"base": {"path": "../../models/tiny-embed"}, "epochs": 1, "max_seq_len": 32, "seed": 3}
    }
    config["candidates"] = ["fp32", "int8-qint8-per-channel"]
    (root / "configs" / "models" / "tiny-ft.yaml").write_text(yaml.safe_dump(config))
    service = yaml.safe_load((root / "configs" / "service.yaml").read_text())
    service["models"] = ["models/tiny-ft.yaml"]
    (root / "configs" / "service.yaml").write_text(yaml.safe_dump(service))

    def optimize() -> dict:
        done = memfit(
            "optimize", "--service", str(root / "configs" / "service.yaml"), "--build-dir", str(root / "build")
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return load_approved(root / "artifacts" / "tiny-ft").manifest

    manifest = optimize()
    assert manifest["task"] == "text-classification" and manifest["runtime"]["labels"] == ["rotten", "fresh"]
    assert manifest["source"]["kind"] == "finetune" and manifest["source"]["settings"]["seed"] == 3
    trained = Path(manifest["source"]["path"])
    assert (trained / "model.safetensors").is_file() and not (trained / "modules.json").exists()
    stamp = (trained / "model.safetensors").stat().st_mtime_ns
    assert optimize()["source"]["weights_sha256"] == manifest["source"]["weights_sha256"]  # seeded, cached
    assert (trained / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_service_that_does_not_fit_publishes_none_of_its_new_approvals(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All or nothing: both models pass their gates, the whole service (faked here to measure over its
    budget) does not fit, so neither new approval is published and the previous ones still serve."""
    import pipeline.run
    from pipeline.stages import StageError

    root = tmp_path / "copy"
    shutil.copytree(tiny_run.root, root)
    artifacts = root / "artifacts"
    before = {m: (artifacts / m / APPROVED_FILE).read_bytes() for m in ("tiny-embed", "tiny-clf")}
    fit_before = (artifacts / "service-fit.json").read_bytes()
    over = {**json.loads(fit_before), "fits": False, "total_mb": 600.0}
    monkeypatch.setattr(pipeline.run, "measure_service", lambda configs, cache: over)
    with pytest.raises(StageError, match=r"the service does not fit: .* 600 MB .*previous approvals left untouched"):
        pipeline.run.optimize(root / "configs" / "service.yaml")
    for model, pointer in before.items():
        assert (artifacts / model / APPROVED_FILE).read_bytes() == pointer
        assert not (artifacts / model / PENDING_FILE).exists()
        load_approved(artifacts / model)
    assert (artifacts / "service-fit.json").read_bytes() == fit_before
