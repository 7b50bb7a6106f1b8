"""Prepacked weights, written at build time for the service to map (serve/prepacked.py loads them).

ONNX Runtime writes them (`session.save_external_prepacked_constant_initializers`): a model whose
initializers live in one data file, where a prepacked initializer keeps its original bytes and names its
packed buffers in the same file (`prepacked_<i>`: `<kernel>+<hash>|<offset>;<length>;<flag>|…`). A
session reads every original once at load, to check its packed buffers against it, then maps the buffers
and the originals that have none, and unmaps the rest. ONNX Runtime interleaves the two kinds, and the
kernel caches a file in folios of up to 2 MB that it keeps whole while any of their pages is mapped:
after mpnet loaded, 200.4 MB of its 219.2 MB file stayed cached where the session mapped 139.1. So the
file is rewritten with what a session maps first and what it only reads from the next 2 MB boundary on:
138.5 MB stayed cached, the outputs bit for bit the same (benchmarks/results/page-cache-folios-2026-12-07.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from serve.prepacked import (
    PREPACKED_DATA,
    PREPACKED_FILES,
    PREPACKED_MODEL,
    PREPACKED_STAMP,
    platform_stamp,
    stale_reason,
)

LAYOUT = 1  # bump when the data file's arrangement changes: an older one is then rewritten by the next build
PAGE = 4096  # every range starts on a page, as ONNX Runtime's own mmap of external data needs
FOLIO = 2 << 20  # the largest folio the page cache keeps whole (a PMD); mapped and load-only ranges never share one


def write_prepacked(model: Path, options: ort.SessionOptions) -> None:
    """Write the three prepacked files beside the portable `model` (with `options`' graph optimizations),
    each renamed into place; the stamp last, so a half-written set is never used."""
    folder = model.parent
    with tempfile.TemporaryDirectory(dir=folder, prefix=".prepack-") as tmp:
        options.optimized_model_filepath = str(Path(tmp) / PREPACKED_MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", PREPACKED_DATA)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        arrange_by_use(Path(tmp) / PREPACKED_MODEL, Path(tmp) / PREPACKED_DATA)
        stamp = {**platform_stamp(), "layout": LAYOUT}
        (Path(tmp) / PREPACKED_STAMP).write_text(json.dumps(stamp, sort_keys=True))
        (folder / PREPACKED_STAMP).unlink(missing_ok=True)
        for name in PREPACKED_FILES:
            os.replace(Path(tmp) / name, folder / name)


def ensure_prepacked(model: Path, options: ort.SessionOptions) -> None:
    """Write the prepacked files unless `model`'s folder holds a set valid for this runtime and CPU, in
    this layout."""
    folder = model.parent
    if stale_reason(folder) is not None or stamp_layout(folder) != LAYOUT:
        write_prepacked(model, options)


def stamp_layout(folder: Path) -> int | None:
    try:
        layout = json.loads((folder / PREPACKED_STAMP).read_text(encoding="utf-8")).get("layout")
    except (OSError, ValueError):
        return None
    return layout if isinstance(layout, int) else None


@dataclass
class Reference:
    """One range of the data file: an initializer's own bytes (`buffer` None, its `offset` entry), or
    buffer `buffer` of a `prepacked_<i>` entry, `<kernel>+<hash>|<offset>;<length>;<flag>|…` (one per
    packed buffer: Attention packs three)."""

    entry: onnx.StringStringEntryProto
    buffer: int | None
    offset: int
    length: int

    @staticmethod
    def spans(entry: onnx.StringStringEntryProto) -> tuple[str, list[list[str]]]:
        kernel, *buffers = entry.value.split("|")
        spans = [buffer.split(";") for buffer in buffers]
        if not kernel or not spans or any(len(f) != 3 or not all(x.isdigit() for x in f) for f in spans):
            raise ValueError(f"unexpected prepacked entry {entry.key}={entry.value!r}")
        return kernel, spans

    @classmethod
    def packed(cls, entry: onnx.StringStringEntryProto) -> list[Reference]:
        _, spans = cls.spans(entry)
        return [cls(entry, index, int(offset), int(length)) for index, (offset, length, _) in enumerate(spans)]

    def move(self, offset: int) -> None:
        if self.buffer is None:
            self.entry.value = str(offset)
            return
        kernel, spans = self.spans(self.entry)
        spans[self.buffer][0] = str(offset)
        self.entry.value = "|".join([kernel, *(";".join(span) for span in spans)])


def references(model: onnx.ModelProto) -> tuple[list[Reference], list[Reference]]:
    """The ranges a loaded session maps (packed buffers, and originals without any), and those it only
    reads at load (originals with packed buffers)."""
    mapped: list[Reference] = []
    load_only: list[Reference] = []
    for tensor in model.graph.initializer:
        entries = {entry.key: entry for entry in tensor.external_data}
        if "offset" not in entries:
            continue
        packed = [r for key, entry in entries.items() if key.startswith("prepacked_") for r in Reference.packed(entry)]
        original = Reference(entries["offset"], None, int(entries["offset"].value), int(entries["length"].value))
        (load_only if packed else mapped).append(original)
        mapped.extend(packed)
    return mapped, load_only


def arrange_by_use(model_path: Path, data_path: Path) -> None:
    """Rewrite `data_path` with the mapped ranges first, each on a page, and the load-only ones from the
    next folio boundary on (the gaps are holes), and point `model_path`'s references at them. A range
    named twice is written once."""
    model = onnx.load(model_path, load_external_data=False)
    mapped, load_only = references(model)
    arranged = data_path.with_name(data_path.name + ".arranged")
    placed: dict[tuple[int, int], int] = {}
    with data_path.open("rb") as source, arranged.open("wb") as target:
        end = 0
        for group in (mapped, load_only):
            end += -end % FOLIO
            for reference in group:
                span = (reference.offset, reference.length)
                if span not in placed:
                    end += -end % PAGE
                    chunk = os.pread(source.fileno(), reference.length, reference.offset)
                    if len(chunk) != reference.length:
                        raise ValueError(f"{data_path.name}: {reference.entry.key} runs past the end of the file")
                    target.seek(end)
                    target.write(chunk)
                    placed[span] = end
                    end += reference.length
                reference.move(placed[span])
    os.replace(arranged, data_path)
    onnx.save(model, model_path)
