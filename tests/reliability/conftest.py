from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import TinyRun


@pytest.fixture()
def tiny_copy(tiny_run: TinyRun, tmp_path: Path) -> TinyRun:
    """A private copy of the tiny run (configs, models, artifacts) that a test may damage."""
    for name in ("configs", "models", "artifacts"):
        shutil.copytree(tiny_run.root / name, tmp_path / name)
    return TinyRun(tmp_path, tmp_path / "configs" / "service.yaml", tmp_path / "artifacts")
