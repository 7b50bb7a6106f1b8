"""A killed or concurrent `memfit optimize` never leaves an approval pointing at a half-written file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.atomic import run_lock
from pipeline.memory.harness import GunicornService
from pipeline.stages.approve import publish
from pipeline.state import Candidate
from serve.artifacts import APPROVED_FILE, ArtifactError, load_approved
from tests.conftest import TinyRun
from tests.helpers import REPO, memfit
from tests.reliability.test_artifact_faults import model_with_external_data

pytestmark = pytest.mark.reliability

# Runs `memfit optimize` with one library call replaced by "do the work, then SIGKILL this process".
KILL_AFTER = textwrap.dedent(
    """
    import importlib, os, signal, sys
    module_name, attribute = sys.argv[1].rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attribute)
    def killed(*args, **kwargs):
        if attribute != "replace" or str(args[1]).endswith("approved.json"):
            if attribute != "replace":
                real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, attribute, killed)
    from pipeline.cli import main
    main(sys.argv[2:])
    """
)
FAULTS = {
    "export": "optimum.exporters.onnx.main_export",
    "quantize": "onnxruntime.quantization.quantize_dynamic",
    "approval": "os.replace",
}


def optimize(copy: TinyRun, *extra: str) -> list[str]:
    return [
        *extra,
        "optimize",
        "--service",
        str(copy.service),
        "--model",
        "tiny-embed",
        "--build-dir",
        str(copy.root / "build"),
    ]


@pytest.mark.parametrize("stage", list(FAULTS))
def test_sigkill_keeps_previous_approval_and_next_run_recovers(tiny_copy: TinyRun, stage: str) -> None:
    model_dir = tiny_copy.artifacts / "tiny-embed"
    before = (model_dir / APPROVED_FILE).read_bytes()
    env = {**os.environ, "FIT_MAX_WORKERS": "1"}  # what is tested is the approval, not the worker count
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, FAULTS[stage], *optimize(tiny_copy)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (model_dir / APPROVED_FILE).read_bytes() == before
    load_approved(model_dir)  # still verifies
    leftovers = list(tiny_copy.root.rglob(".tmp-*"))
    if stage != "approval":
        assert leftovers, f"a kill during {stage} should leave a temp folder to clean up"
    with GunicornService(tiny_copy.service) as service:  # ... and still serves
        assert service.request("POST", "/api/embed", {"inputs": ["still here"]}).status == 200

    rerun = memfit(*optimize(tiny_copy), env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not list(tiny_copy.root.rglob(".tmp-*")), "the next run removes the leftovers"
    assert (model_dir / APPROVED_FILE).read_bytes() != before
    load_approved(model_dir)


def test_second_run_fails_fast_on_the_lock(tiny_copy: TinyRun) -> None:
    with run_lock(tiny_copy.artifacts / "tiny-embed"):
        done = memfit(*optimize(tiny_copy))
    assert done.returncode == 3
    assert "another memfit run holds the lock" in done.stderr


def test_pipeline_refuses_to_publish_escaping_external_data(tiny_copy: TinyRun, tmp_path: Path) -> None:
    model_dir = tiny_copy.artifacts / "tiny-embed"
    before = (model_dir / APPROVED_FILE).read_bytes()
    candidate = tmp_path / "candidate"
    shutil.copytree(load_approved(model_dir).folder, candidate)
    (candidate / "manifest.json").unlink()
    model_with_external_data(tmp_path / "evil", "/etc/passwd").replace(candidate / "model.onnx")
    with pytest.raises(ArtifactError, match="external data '/etc/passwd' refused"):
        publish(model_dir, Candidate("fp32", candidate, {}, 0.0), lambda files: {"files": files})
    assert (model_dir / APPROVED_FILE).read_bytes() == before
