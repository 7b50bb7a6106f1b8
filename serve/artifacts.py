"""The manifest contract: reading `approved.json`, re-hashing every file, refusing paths that escape.

The pipeline writes this contract and the service reads it; both verify through this one module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APPROVED_FILE = "approved.json"
# A new approval the build has not yet proven to fit beside the service's other models: published by
# renaming it to approved.json once the whole-service fit passes, removed if it fails.
PENDING_FILE = "approved.pending.json"
MANIFEST_FILE = "manifest.json"
RUNTIME_FILE = "runtime.json"
CHUNK = 1 << 20
DROP_EVERY_S = 0.02  # while a session loads: its files' unmapped pages are dropped this often


class ArtifactError(Exception):
    """An approved artifact that is missing, tampered with or unsafe; nothing is loaded from it."""


def sha256_file(path: Path, drop_behind: bool = False) -> str:
    """The file's sha256; with `drop_behind`, the pages hashed so far leave the page cache (but those a
    process maps), so checking a file never holds it all there. All of them each time: the kernel caches a
    file in folios of up to 2 MB and drops only a folio the range covers whole, so dropping each 1 MB chunk
    alone dropped little (mpnet: 305 MB of 339 cached after checking its files)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        hashed = 0
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            hashed += len(chunk)
            if drop_behind:
                os.posix_fadvise(handle.fileno(), 0, hashed, os.POSIX_FADV_DONTNEED)
    return digest.hexdigest()


def drop_cached(path: Path) -> None:
    """Evict `path`'s pages from the page cache (but those a process maps)."""
    with path.open("rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def dropped_meanwhile(paths: list[Path], every_s: float = DROP_EVERY_S) -> Iterator[None]:
    """Evict `paths` from the page cache every `every_s` seconds while the block runs, and once after. A
    container is charged for every file page its processes read, mapped or not, and ONNX Runtime reads all
    of a prepacked file at session creation though it keeps only the prepacked weights mapped: dropped
    once the session was made, that read still made the load's peak (mpnet, one process in a cgroup:
    272.2 MB; dropped every 20 ms meanwhile, 199.5, and the session no slower)."""
    stop = threading.Event()

    def drop() -> None:
        while not stop.wait(every_s):
            for path in paths:
                drop_cached(path)

    dropper = threading.Thread(target=drop, name="memfit-drop-cached", daemon=True)
    dropper.start()
    try:
        yield
    finally:
        stop.set()
        dropper.join()
        for path in paths:
            drop_cached(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def contained_path(root: Path, relpath: str) -> Path:
    """`root/relpath`, refusing absolute paths, `..` and symlinks that leave `root`."""
    rel = Path(relpath)
    if rel.is_absolute() or relpath.startswith(("/", "\\")) or ".." in rel.parts or not rel.parts:
        raise ArtifactError(f"{root}: path {relpath!r} is absolute or leaves the artifact folder")
    candidate = root / rel
    if candidate.is_symlink():
        raise ArtifactError(f"{candidate}: symlinks are not allowed in an artifact")
    resolved_root = root.resolve()
    if not candidate.resolve().is_relative_to(resolved_root):
        raise ArtifactError(f"{root}: path {relpath!r} resolves outside the artifact folder")
    return candidate


@dataclass(frozen=True)
class ApprovedArtifact:
    """One model's approved variant: its folder and its parsed, verified manifest."""

    model: str
    folder: Path
    manifest: dict[str, Any]

    @property
    def variant_id(self) -> str:
        return self.folder.name


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def verify_files(folder: Path, files: dict[str, Any]) -> None:
    """Re-hash every file the manifest lists; any mismatch, absence or escape raises ArtifactError. The
    hashing leaves no page cache behind: a container is charged for the file pages it reads, and a session
    reads what it maps itself."""
    if not files:
        raise ArtifactError(f"{folder}: manifest lists no files")
    for relpath, entry in files.items():
        path = contained_path(folder, relpath)
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"{path}: size {path.stat().st_size} differs from manifest {entry['bytes']}")
        if sha256_file(path, drop_behind=True) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 differs from the manifest (corrupted or tampered)")


def approval_pointer(model_dir: Path, pending: bool = False) -> Path:
    """The pointer file to follow: with `pending`, a pending approval where there is one."""
    if pending and (model_dir / PENDING_FILE).is_file():
        return model_dir / PENDING_FILE
    return model_dir / APPROVED_FILE


def load_approved(model_dir: Path, verify: bool = True, pending: bool = False) -> ApprovedArtifact:
    """Follow `approved.json` (or, with `pending`, a pending approval where there is one) to its
    manifest, checking the manifest's own hash and then every file."""
    pointer_path = approval_pointer(model_dir, pending)
    pointer = read_json(pointer_path)
    try:
        manifest_rel = str(pointer["manifest"])
        expected = str(pointer["sha256"])
    except KeyError as exc:
        raise ArtifactError(f"{pointer_path}: missing key {exc}") from None
    manifest_path = contained_path(model_dir, manifest_rel)
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path}: approved manifest is missing") from None
    if sha256_bytes(raw) != expected:
        raise ArtifactError(f"{manifest_path}: sha256 differs from {pointer_path.name} (corrupted or tampered)")
    manifest = json.loads(raw)
    folder = manifest_path.parent
    if verify:
        verify_files(folder, manifest.get("files", {}))
    return ApprovedArtifact(model=model_dir.name, folder=folder, manifest=manifest)
