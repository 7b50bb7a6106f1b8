"""Model folders memfit refuses at load, each with a clear reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.model_folder import ModelFolderError, check_folder
from tests.helpers import TOKENIZER_FILES, memfit, minilm_folder


def folder_with(tmp_path: Path, files: dict[str, str | bytes], config: dict | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "bert"}))
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_folder() / name, folder / name)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def test_pickle_only_weights_are_refused(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"pytorch_model.bin": b"\x80\x02pickle"})
    with pytest.raises(ModelFolderError) as caught:
        check_folder(folder)
    assert str(caught.value) == (
        f"{folder}: only pickle weights (pytorch_model.bin); memfit loads safetensors only "
        "(re-save with save_pretrained(..., safe_serialization=True))"
    )


def test_remote_code_is_refused(tmp_path: Path) -> None:
    config = {"model_type": "custom", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}}
    folder = folder_with(tmp_path, {"model.safetensors": b"", "modeling_custom.py": "import os"}, config)
    with pytest.raises(ModelFolderError, match="requires trust_remote_code"):
        check_folder(folder)


def test_missing_config_and_tokenizer(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match=r"not a Hugging Face model folder \(no config.json\)"):
        check_folder(empty)
    folder = folder_with(tmp_path, {"model.safetensors": b""})
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match=r"no tokenizer\.json"):
        check_folder(folder)


def test_safetensors_beside_pickle_is_accepted(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, {"model.safetensors": b"x", "pytorch_model.bin": b"y"})
    assert [p.name for p in check_folder(folder)] == ["model.safetensors"]


def test_pickle_model_fails_the_cli_with_exit_2(tmp_path: Path) -> None:

    from tests.helpers import model_config, write_service

    folder_with(tmp_path, {"pytorch_model.bin": b"\x80\x02pickle"})
    service = write_service(tmp_path, [model_config("pickled", "feature-extraction", {"path": "../../model"})])
    done = memfit("optimize", "--service", str(service))
    assert done.returncode == 2
    assert "only pickle weights (pytorch_model.bin); memfit loads safetensors only" in done.stderr
    assert not (tmp_path / "artifacts" / "pickled" / "approved.json").exists()
