"""A request's inputs, checked before any tokenizer sees them: structure, count, Unicode hygiene.

Length in characters is bounded per model by `ModelRuntime.bound` (it knows the tokenizer); what is
checked here holds for every model: a JSON object with a list of at most `max_batch` strings, each
encodable as UTF-8 and holding at least one visible character.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from serve import errors
from serve.config import Limits

SHOWN_CHARS = 100
# Categories that render nothing on their own: control, format (zero-width), surrogate, private use,
# unassigned, separators, and combining marks with no base character.
INVISIBLE_CATEGORIES = ("C", "Z", "M")


def shown(value: Any) -> str:
    """`value` as it may be echoed in an error: its repr, cut to about SHOWN_CHARS characters."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} characters as shown"
    return f"{text[:SHOWN_CHARS]}… ({size})"


def fields_of(payload: Any, allowed: tuple[str, ...], example: str) -> dict[str, Any]:
    """`payload` as a JSON object with no field outside `allowed`; 400/422 otherwise."""
    if not isinstance(payload, dict):
        raise errors.bad_request(f"body must be a JSON object like {example}")
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        raise errors.unprocessable(f"unknown field {shown(unknown[0])}; allowed: {', '.join(allowed)}")
    return payload


def optional(payload: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """Field `name` of `kind` (JSON null as absent), or `default`; 422 for another type."""
    value = payload.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise errors.unprocessable(f"{name!r} must be a {kind.__name__}", param=name)
    return value


def text_list(value: Any, name: str, limits: Limits) -> list[str]:
    """A string or a non-empty list of at most `max_batch` strings, as a list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise errors.bad_request(f"{name!r} must be a string or a list of strings", param=name)
    if not value:
        raise errors.empty(name)
    if len(value) > limits.max_batch:
        raise errors.unprocessable(
            f"{len(value)} inputs exceed max_batch ({limits.max_batch})",
            param=name,
            limit="max_batch",
            value=limits.max_batch,
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise errors.unprocessable(f"{name}[{index}] is not a string", param=name)
    return value


def parse_inputs(payload: Any, limits: Limits) -> tuple[str | None, list[str]]:
    """(model name or None, inputs) from `{"model": ..., "inputs": [...]}`; 400/422 on anything else."""
    fields = fields_of(payload, ("model", "inputs"), '{"inputs": ["text", ...]}')
    return optional(fields, "model", str), text_list(fields.get("inputs"), "inputs", limits)


def check_text(index: int, text: str) -> None:
    """422 for a text that cannot be encoded as UTF-8 (a lone surrogate, as JavaScript clients send when
    they cut a string inside an emoji) or that has no visible character after NFKC normalization."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise errors.unprocessable(
            f"inputs[{index}] is not valid Unicode: lone surrogate U+{code:04X} at position {exc.start}"
        ) from None
    if not any(
        unicodedata.category(char)[0] not in INVISIBLE_CATEGORIES for char in unicodedata.normalize("NFKC", text)
    ):
        raise errors.unprocessable(f"inputs[{index}] has no visible characters")
