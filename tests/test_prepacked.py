"""Shared weights: approved artifacts ship ONNX Runtime's prepacked initializers, checksummed, and every
worker maps them; elsewhere (another runtime or CPU) the portable model loads and says why, or, with
SHARED_WEIGHTS=require, the model is refused."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import pipeline.prepack
import serve.prepacked
from pipeline.memory.harness import GunicornService
from pipeline.prepack import FOLIO, LAYOUT, arrange_by_use, references, write_prepacked
from serve.artifacts import ArtifactError, drop_cached, load_approved, verify_files
from serve.config import SessionSettings, load_service_config
from serve.loader import open_approved
from serve.onnx_refs import check_external_data
from serve.prepacked import PREPACKED_DATA, PREPACKED_FILES, PREPACKED_MODEL, platform_stamp
from serve.runtime import ModelRuntime, session_options
from tests.conftest import TinyRun
from tests.helpers import memfit

TEXTS = ["a quiet, funny film", "the worst sequel of the year", "fine"]


def test_the_approval_ships_prepacked_weights_checksummed_for_this_platform(tiny_run: TinyRun) -> None:
    for model in ("tiny-embed", "tiny-clf"):
        artifact = load_approved(tiny_run.artifacts / model)
        assert set(PREPACKED_FILES) <= set(artifact.manifest["files"])
        assert artifact.manifest["prepacked"] == {**platform_stamp(), "layout": LAYOUT}
        allowed = set(artifact.manifest["files"])
        assert check_external_data(artifact.folder / PREPACKED_MODEL, allowed=allowed) == [PREPACKED_DATA]
        assert not [p for p in artifact.folder.iterdir() if p.name.startswith(".prepack-")]


def test_shared_and_portable_weights_answer_the_same(tiny_run: TinyRun) -> None:
    config, _ = load_service_config(tiny_run.service)
    shared = open_approved(tiny_run.artifacts / "tiny-embed", config)
    assert shared.runtime.weights.shared and shared.runtime.weights.path.name == PREPACKED_MODEL
    private = open_approved(tiny_run.artifacts / "tiny-embed", config.model_copy(update={"shared_weights": "private"}))
    assert not private.runtime.weights.shared and private.runtime.weights.path.name == "model.onnx"
    np.testing.assert_allclose(shared.runtime.embed(TEXTS), private.runtime.embed(TEXTS), rtol=0, atol=1e-6)


def test_elsewhere_the_portable_model_loads_or_is_refused(tiny_run: TinyRun, monkeypatch: pytest.MonkeyPatch) -> None:
    built = platform_stamp()
    elsewhere = {**built, "onnxruntime": "0.0.1"}
    monkeypatch.setattr(serve.prepacked, "platform_stamp", lambda: elsewhere)
    config, _ = load_service_config(tiny_run.service)
    portable = open_approved(tiny_run.artifacts / "tiny-embed", config)
    assert not portable.runtime.weights.shared
    assert portable.runtime.weights.reason == (
        f"private weights: prepacked by onnxruntime {built['onnxruntime']}, this is 0.0.1"
    )
    with pytest.raises(ArtifactError, match="SHARED_WEIGHTS=require, but prepacked by onnxruntime"):
        open_approved(tiny_run.artifacts / "tiny-embed", config.model_copy(update={"shared_weights": "require"}))


def cached_pages(path: Path) -> int:
    """How many of `path`'s pages are in the page cache (mincore on a fresh mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    vector = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with path.open("rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
    try:
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
    finally:
        libc.munmap(address, size)
    return sum(byte & 1 for byte in vector)


def mapped_page_numbers(path: Path) -> set[int]:
    """The distinct pages of `path` (their numbers in the file) this process maps."""
    pages: set[int] = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(address, 16) // mmap.PAGESIZE for address in fields[0].split("-"))
            first = int(fields[2], 16) // mmap.PAGESIZE
            pages |= set(range(first, first + end - start))
    return {page for page in pages if page < -(-path.stat().st_size // mmap.PAGESIZE)}


def mapped_pages(path: Path) -> int:
    return len(mapped_page_numbers(path))


def test_a_loaded_model_leaves_only_the_pages_its_session_maps_in_the_page_cache(tiny_run: TinyRun) -> None:
    """A container is charged for the file pages its processes read: hashing leaves none behind, and after
    loading only the pages the session maps stay, whichever weights file is served."""
    config, _ = load_service_config(tiny_run.service)
    artifact = load_approved(tiny_run.artifacts / "tiny-embed", verify=False)
    folder = artifact.folder
    drop_cached(folder / "model.onnx")
    if cached_pages(folder / "model.onnx"):
        pytest.skip(f"{folder}: this filesystem keeps its pages (tmpfs), so there is no cache to drop")
    (folder / "model.onnx").read_bytes()
    verify_files(folder, artifact.manifest["files"])
    assert cached_pages(folder / "model.onnx") == 0
    shared = open_approved(tiny_run.artifacts / "tiny-embed", config)
    assert shared.runtime.weights.shared
    assert cached_pages(folder / "model.onnx") == 0
    assert cached_pages(folder / PREPACKED_DATA) == mapped_pages(folder / PREPACKED_DATA) > 0
    del shared
    gc.collect()  # the session unmaps the prepacked weights
    private = open_approved(tiny_run.artifacts / "tiny-embed", config.model_copy(update={"shared_weights": "private"}))
    assert not private.runtime.weights.shared
    assert cached_pages(folder / "model.onnx") == mapped_pages(folder / "model.onnx")
    assert cached_pages(folder / PREPACKED_DATA) == 0


def test_what_a_session_maps_lies_apart_from_what_it_reads_once(
    tiny_run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prepacked file holds the ranges a session maps, then, from the next folio boundary on, the
    originals it reads once at load, so that dropping the file's cache after load leaves what is mapped.
    The session maps no page of the second part, and answers bit for bit as with ONNX Runtime's own
    layout, which arranged gives the shipped files byte for byte."""
    config, _ = load_service_config(tiny_run.service)
    artifact = load_approved(tiny_run.artifacts / "tiny-embed")
    mapped, load_only = references(onnx.load(artifact.folder / PREPACKED_MODEL, load_external_data=False))
    assert mapped and load_only, "the tiny model's MatMul weights are prepacked"
    boundary = -(-max(r.offset + r.length for r in mapped) // FOLIO) * FOLIO
    assert min(r.offset for r in load_only) == boundary
    assert all(r.offset % mmap.PAGESIZE == 0 for r in mapped + load_only)

    shared = open_approved(tiny_run.artifacts / "tiny-embed", config)
    pages = mapped_page_numbers(artifact.folder / PREPACKED_DATA)
    assert pages and max(pages) * mmap.PAGESIZE < boundary

    ort_layout = tmp_path / "ort-layout"
    shutil.copytree(artifact.folder, ort_layout)
    with monkeypatch.context() as patched:
        patched.setattr(pipeline.prepack, "arrange_by_use", lambda model, data: None)
        write_prepacked(ort_layout / "model.onnx", session_options(SessionSettings()))
    settings = shared.runtime.settings
    as_written = ModelRuntime(ort_layout, settings, 64, 512, 8, shared_weights="require")
    assert np.array_equal(shared.runtime.embed(TEXTS), as_written.embed(TEXTS))
    arrange_by_use(ort_layout / PREPACKED_MODEL, ort_layout / PREPACKED_DATA)
    for name in (PREPACKED_MODEL, PREPACKED_DATA):
        assert (ort_layout / name).read_bytes() == (artifact.folder / name).read_bytes(), name


def test_health_and_verify_say_which_weights_load(tiny_run: TinyRun) -> None:
    with GunicornService(tiny_run.service) as service:
        weights = service.request("GET", "/api/health").body["weights"]
    assert weights["tiny-embed"] == {
        "file": PREPACKED_MODEL,
        "shared": True,
        "reason": "prepacked weights memory-mapped, shared by workers",
    }
    done = memfit("verify", "--service", str(tiny_run.service))
    assert done.returncode == 0 and done.stdout.count("prepacked weights memory-mapped") == 2
    private = memfit("verify", "--service", str(tiny_run.service), env={**os.environ, "SHARED_WEIGHTS": "private"})
    assert "private weights: SHARED_WEIGHTS=private" in private.stdout


def test_a_tampered_prepacked_file_fails_verification(tiny_run: TinyRun, tmp_path: Path) -> None:
    copy = tmp_path / "tiny-embed"
    shutil.copytree(tiny_run.artifacts / "tiny-embed", copy)
    data = load_approved(copy).folder / PREPACKED_DATA
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=f"{PREPACKED_DATA}: sha256 differs"):
        load_approved(copy)
