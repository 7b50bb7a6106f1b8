"""Find every external-data file an ONNX model refers to, without the onnx package.

ONNX and ONNX Runtime had a series of external-data path-traversal bugs; memfit checks the locations
itself before any session is created. This walks the protobuf wire format of ModelProto along the
paths where a TensorProto can live (initializers, sparse initializers, node attributes, subgraphs,
functions) and returns each `external_data` `location`.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from serve.artifacts import ArtifactError, contained_path

LENGTH_DELIMITED = 2
# message -> {field number: message type of that (length-delimited) field}
SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


class MalformedModel(ArtifactError):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise MalformedModel("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedModel("varint too long")


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | None]]:
    """(field number, wire type, payload of length-delimited fields) of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            yield number, wire, None
        elif wire == 1:
            pos += 8
        elif wire == LENGTH_DELIMITED:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise MalformedModel("field runs past the end of its message")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise MalformedModel(f"unsupported wire type {wire}")


def _locations(data: memoryview, kind: str, depth: int = 0) -> Iterator[str]:
    if depth > 64:
        raise MalformedModel("graph nesting too deep")
    if kind == "entry":
        entry = {n: bytes(p).decode("utf-8", "replace") for n, w, p in _fields(data) if p is not None}
        if entry.get(1) == "location":
            yield entry.get(2, "")
        return
    children = SCHEMA[kind]
    for number, wire, payload in _fields(data):
        if wire == LENGTH_DELIMITED and payload is not None and number in children:
            yield from _locations(payload, children[number], depth + 1)


def external_data_locations(model_path: Path) -> list[str]:
    if model_path.stat().st_size == 0:
        raise MalformedModel(f"{model_path}: empty model file")
    with model_path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        mapped.madvise(mmap.MADV_RANDOM)  # the walk skips the weights: read no pages around the ones it reads
        view = memoryview(mapped)
        try:
            return sorted(set(_locations(view, "model")))
        except MalformedModel as exc:
            raise MalformedModel(f"{model_path}: not a readable ONNX model ({exc})") from None
        finally:
            view.release()


def check_external_data(model_path: Path, allowed: set[str] | None = None) -> list[str]:
    """Refuse external-data locations that are absolute, contain `..`, or resolve outside the model's
    folder (symlinks included); with `allowed`, each must also be a file the manifest lists."""
    locations = external_data_locations(model_path)
    for location in locations:
        try:
            contained_path(model_path.parent, location)
        except ArtifactError as exc:
            raise ArtifactError(f"{model_path}: external data {location!r} refused ({exc})") from None
        if allowed is not None and location not in allowed:
            raise ArtifactError(f"{model_path}: external data {location!r} is not listed in the manifest")
    return locations
