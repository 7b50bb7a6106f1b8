"""The manifest contract: atomic publication, verification, and refusal of tampered or escaping paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.atomic import remove_leftovers
from serve.artifacts import APPROVED_FILE, ArtifactError, contained_path, load_approved
from serve.prepacked import PREPACKED_FILES
from tests.conftest import TinyRun
from tests.helpers import REPO


@pytest.fixture()
def approved_copy(tiny_run: TinyRun, tmp_path: Path) -> Path:
    """A private copy of a tiny model's artifacts folder, safe to damage."""
    target = tmp_path / "tiny-embed"
    shutil.copytree(tiny_run.artifacts / "tiny-embed", target)
    return target


def test_approval_verifies_and_names_its_variant(approved_copy: Path) -> None:
    artifact = load_approved(approved_copy)
    pointer = json.loads((approved_copy / APPROVED_FILE).read_text())
    assert pointer["variant"] == artifact.variant_id
    assert set(artifact.manifest["files"]) == {"model.onnx", "tokenizer.json", "runtime.json", *PREPACKED_FILES}


def test_flipped_byte_is_detected(approved_copy: Path) -> None:
    model = load_approved(approved_copy).folder / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model.onnx: sha256 differs from the manifest"):
        load_approved(approved_copy)


def test_edited_manifest_is_detected(approved_copy: Path) -> None:
    manifest = load_approved(approved_copy).folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"budget_mb": 512', '"budget_mb": 4096'))
    with pytest.raises(ArtifactError, match=r"manifest.json: sha256 differs from approved.json"):
        load_approved(approved_copy)


@pytest.mark.parametrize("relpath", ["/etc/passwd", "../outside.onnx", "a/../../b"])
def test_escaping_paths_are_refused(tmp_path: Path, relpath: str) -> None:
    with pytest.raises(ArtifactError, match="absolute or leaves the artifact folder"):
        contained_path(tmp_path, relpath)


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    (tmp_path / "secret").write_text("x")
    (tmp_path / "inside" / "model.onnx").symlink_to(tmp_path / "secret")
    with pytest.raises(ArtifactError, match="symlinks are not allowed"):
        contained_path(tmp_path / "inside", "model.onnx")


KILL_DURING_PUBLISH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from pipeline.stages.approve import publish
    from pipeline.state import Candidate

    model_dir, candidate_dir, fault = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    real = getattr(os, fault)
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(os, fault, killed)
    publish(model_dir, Candidate("fp32", candidate_dir, {}, 0.0), lambda files: {"files": files})
    """
)


@pytest.mark.parametrize("fault", ["rename", "replace"], ids=["before-variant-rename", "before-pointer-replace"])
def test_killed_publication_keeps_previous_approval(approved_copy: Path, tmp_path: Path, fault: str) -> None:
    before = (approved_copy / APPROVED_FILE).read_bytes()
    candidate = load_approved(approved_copy).folder
    done = subprocess.run(
        [sys.executable, "-c", KILL_DURING_PUBLISH, str(approved_copy), str(candidate), fault],
        cwd=REPO,
        check=False,
    )
    assert done.returncode == -9
    assert (approved_copy / APPROVED_FILE).read_bytes() == before
    load_approved(approved_copy)  # the previous approval still verifies
    leftovers = list(approved_copy.glob(".tmp-*"))
    if fault == "rename":
        assert leftovers, "the killed run should have left its temp folder"
    assert remove_leftovers(approved_copy) == leftovers
    assert not list(approved_copy.glob(".tmp-*"))
