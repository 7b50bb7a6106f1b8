from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import OPTIMIZE_TIMEOUT_S, memfit, model_config, tiny_model, write_service


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the default model's real build belongs to the memory gate (`make gate`, which CI
    runs after `make test`): the build alone takes about as long as `make optimize`."""
    for item in items:
        if "minilm_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gate)


@dataclass(frozen=True)
class TinyRun:
    root: Path
    service: Path
    artifacts: Path


@dataclass(frozen=True)
class MinilmRun:
    artifacts: Path
    env: dict[str, str]  # ARTIFACTS_DIR pointing the shipped configs at this run's artifacts
    build: Path  # exports and candidates, reusable by further runs


@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> MinilmRun:
    """`memfit optimize` on the shipped MiniLM config, once per test session, into a temp folder."""
    root = tmp_path_factory.mktemp("minilm")
    env = {**os.environ, "ARTIFACTS_DIR": str(root / "artifacts")}
    done = memfit("optimize", "--build-dir", str(root / "build"), env=env, timeout=OPTIMIZE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    print((root / "artifacts" / "report.md").read_text())
    return MinilmRun(root / "artifacts", env, root / "build")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The whole pipeline once on two tiny random-weight models (embedding + classifier)."""
    from pipeline.run import optimize

    root = tmp_path_factory.mktemp("tiny")
    tiny_model(root / "models" / "tiny-embed", "feature-extraction")
    tiny_model(root / "models" / "tiny-clf", "text-classification")
    service = write_service(
        root,
        [
            model_config("tiny-embed", "feature-extraction", {"path": "../../models/tiny-embed"}),
            model_config("tiny-clf", "text-classification", {"path": "../../models/tiny-clf"}),
        ],
    )
    optimize(service)
    return TinyRun(root, service, root / "artifacts")
