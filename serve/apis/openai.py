"""OpenAI's embeddings API: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`, so that the
official SDKs and everything built on them work against the service unchanged (base URL `.../v1`)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from werkzeug.routing import Rule

from serve import errors
from serve.apis import FEATURE_EXTRACTION, Api, Call, Outcome, ServiceView
from serve.config import Limits
from serve.errors import ServiceError
from serve.inputs import fields_of, optional, shown, text_list

if TYPE_CHECKING:
    from serve.loader import ServedModel

FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
ENCODINGS = ("float", "base64")
OWNER = "memfit"


def encoded(row: np.ndarray, encoding: str) -> Any:
    """One embedding as a list of floats, or as base64 of its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


def model_object(model: ServedModel) -> dict[str, Any]:
    created = datetime.fromisoformat(str(model.manifest["created_at"]))
    return {"id": model.name, "object": "model", "created": int(created.timestamp()), "owned_by": OWNER}


class OpenAIApi(Api):
    name = "openai"

    def rules(self) -> list[Rule]:
        return [
            Rule("/v1/embeddings", endpoint="openai.embeddings", methods=["POST"]),
            Rule("/v1/models", endpoint="openai.models", methods=["GET"]),
            Rule("/v1/models/<path:model>", endpoint="openai.model", methods=["GET"]),
        ]

    def owns(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/")

    def get(self, endpoint: str, service: ServiceView, args: Mapping[str, Any]) -> Any:
        if endpoint == "openai.model":
            name = args["model"]
            if name not in service.models:
                raise errors.not_found(f"unknown model {shown(name)}", param="model")
            return model_object(service.models[name])
        return {"object": "list", "data": [model_object(m) for m in service.models.values()]}

    def parse(self, endpoint: str, payload: Any, limits: Limits) -> Call:
        fields = fields_of(payload, FIELDS, '{"model": "name", "input": ["text", ...]}')
        value = fields.get("input")
        if isinstance(value, list) and any(isinstance(item, int | list) for item in value):
            # LangChain's OpenAIEmbeddings sends tiktoken ids by default: its setting is named, to save a search.
            raise errors.bad_request(
                "token-id inputs are not supported; send text (LangChain's OpenAIEmbeddings: "
                "check_embedding_ctx_length=False)",
                param="input",
            )
        encoding = optional(fields, "encoding_format", str, "float")
        if encoding not in ENCODINGS:
            raise errors.unprocessable(
                f"encoding_format must be float or base64; got {shown(encoding)}", param="encoding_format"
            )
        dimensions = optional(fields, "dimensions", int)
        optional(fields, "user", str)  # accepted, not used
        return Call(
            FEATURE_EXTRACTION,
            optional(fields, "model", str),
            text_list(value, "input", limits),
            options={"encoding_format": encoding, "dimensions": dimensions},
        )

    def render(self, call: Call, outcome: Outcome) -> Any:
        dimensions, native = call.options["dimensions"], int(outcome.values.shape[1])
        if dimensions is not None and dimensions != native:
            raise errors.bad_request(
                f"model {shown(outcome.model.name)} has {native} dimensions and cannot shorten them; got {dimensions}",
                param="dimensions",
            )
        encoding = call.options["encoding_format"]
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": encoded(row, encoding)}
                for index, row in enumerate(outcome.values)
            ],
            "model": outcome.model.name,
            "usage": {"prompt_tokens": outcome.tokens, "total_tokens": outcome.tokens},
        }

    def error_body(self, error: ServiceError) -> Any:
        code = error.code
        if error.status == 401:
            code = "invalid_api_key"
        elif error.status == 404 and error.param == "model":
            code = "model_not_found"
        kind = "server_error" if error.status >= 500 else "invalid_request_error"
        return {"error": {"message": error.message, "type": kind, "param": error.param, "code": code}}
