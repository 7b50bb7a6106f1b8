"""The runtime image's dependency set, proven without a Docker engine: a fresh venv with only
`pip install .[serve]` (as the Dockerfile's runtime stage does) serves the approved artifacts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.memory.harness import GunicornService
from tests.conftest import TinyRun
from tests.helpers import REPO

pytestmark = pytest.mark.e2e


def test_serve_extra_alone_runs_the_service(tiny_run: TinyRun, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("pipeline", "serve"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", f"{source}[serve]"], check=True)
    missing = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util as u; print([m for m in ('torch', 'transformers', 'optimum', "
            "'sklearn', 'onnx') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert missing.stdout.strip() == "[]", "the serve extra pulled in build-only packages"

    with GunicornService(tiny_run.service, python=python) as service:
        assert service.request("GET", "/api/health").status == 200
        assert service.request("GET", "/api/ready").status == 200
        embed = service.request("POST", "/api/embed", {"inputs": ["a fine film"]})
        assert embed.status == 200 and len(embed.body["embeddings"][0]) == 32
        classify = service.request("POST", "/api/classify", {"inputs": ["a fine film"]})
        assert classify.status == 200 and classify.body["results"][0]["label"] in ("rotten", "fresh")
    assert service.process is not None and service.process.returncode == 0
