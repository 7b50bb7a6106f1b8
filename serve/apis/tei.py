"""text-embeddings-inference's API: `POST /embed`, `POST /predict`, `GET /info`, `GET /health`, with
TEI's request, response and error shapes. TEI serves one model: these routes use the service's first
model of the task."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

from werkzeug.routing import Rule

from serve import errors
from serve.apis import FEATURE_EXTRACTION, TEXT_CLASSIFICATION, Api, Call, Outcome, Raw, ServiceView
from serve.config import Limits
from serve.errors import ServiceError
from serve.inputs import fields_of, optional, shown, text_list

PATHS = ("/embed", "/predict", "/info", "/health")
EMBED_FIELDS = ("inputs", "normalize", "truncate", "truncation_direction", "prompt_name")
PREDICT_FIELDS = ("inputs", "truncate", "raw_scores", "truncation_direction")


def version() -> str:
    try:
        return metadata.version("memfit")
    except metadata.PackageNotFoundError:
        return "0+source"


def predict_inputs(value: Any, limits: Limits) -> tuple[list[str], bool]:
    """TEI's predict inputs (a string; `[text]`; a batch `[[text], ...]`) as texts, and whether it was
    one input. A pair `[text, text]` is refused: the served classifiers read one text."""
    if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
        for index, item in enumerate(value):
            if len(item) != 1:
                raise errors.unprocessable(
                    f"inputs[{index}] has {len(item)} texts; the served classifiers read one text, not pairs",
                    param="inputs",
                )
        return text_list([item[0] for item in value], "inputs", limits), False
    if isinstance(value, list) and len(value) != 1:
        raise errors.unprocessable(
            f"inputs has {len(value)} texts; send one text, or a batch as [[text], ...] (pairs are not supported)",
            param="inputs",
        )
    return text_list(value, "inputs", limits), True


def no_left_truncation(fields: dict[str, Any]) -> None:
    direction = optional(fields, "truncation_direction", str, "Right")
    if direction != "Right":
        raise errors.unprocessable(f"truncation_direction {shown(direction)} is not supported; use Right")


class TeiApi(Api):
    name = "tei"

    def rules(self) -> list[Rule]:
        return [
            Rule("/embed", endpoint="tei.embed", methods=["POST"]),
            Rule("/predict", endpoint="tei.predict", methods=["POST"]),
            Rule("/info", endpoint="tei.info", methods=["GET"]),
            Rule("/health", endpoint="tei.health", methods=["GET"]),
        ]

    def owns(self, path: str) -> bool:
        return path in PATHS

    def get(self, endpoint: str, service: ServiceView, args: Mapping[str, Any]) -> Any:
        if endpoint == "tei.health":
            service.ready()  # 503 while a model is not served
            return Raw(b"", "text/plain")
        if not service.models:
            service.ready()  # 503 with the reasons
        model = next(iter(service.models.values()))  # TEI describes one model: the service's first
        spec, runtime = model.runtime.spec, model.runtime
        if model.task == TEXT_CLASSIFICATION:
            model_type: dict[str, Any] = {
                "classifier": {
                    "id2label": {str(i): label for i, label in enumerate(spec.labels)},
                    "label2id": {label: i for i, label in enumerate(spec.labels)},
                }
            }
        else:
            model_type = {"embedding": {"pooling": spec.pooling or "mean"}}
        return {
            "model_id": model.name,
            "model_sha": model.variant,
            "model_dtype": model.manifest["variant"].get("precision", "float32"),
            "model_type": model_type,
            "max_concurrent_requests": service.threads,
            "max_input_length": runtime.max_seq_len,
            "max_batch_tokens": runtime.max_tokens_per_run,
            "max_batch_requests": None,
            "max_client_batch_size": service.limits.max_batch,
            "auto_truncate": service.limits.truncate,
            "tokenization_workers": 1,
            "version": version(),
            "sha": None,
            "docker_label": None,
        }

    def parse(self, endpoint: str, payload: Any, limits: Limits) -> Call:
        if endpoint == "tei.embed":
            fields = fields_of(payload, EMBED_FIELDS, '{"inputs": "text"}')
            no_left_truncation(fields)
            if optional(fields, "prompt_name", str) is not None:
                raise errors.unprocessable("prompt_name is not supported: the served models have no prompts")
            return Call(
                FEATURE_EXTRACTION,
                None,
                text_list(fields.get("inputs"), "inputs", limits),
                truncate=optional(fields, "truncate", bool),
                normalize=optional(fields, "normalize", bool, True),
            )
        fields = fields_of(payload, PREDICT_FIELDS, '{"inputs": "text"}')
        no_left_truncation(fields)
        texts, single = predict_inputs(fields.get("inputs"), limits)
        return Call(
            TEXT_CLASSIFICATION,
            None,
            texts,
            single=single,
            truncate=optional(fields, "truncate", bool),
            raw_scores=optional(fields, "raw_scores", bool, False),
        )

    def render(self, call: Call, outcome: Outcome) -> Any:
        if call.task == FEATURE_EXTRACTION:
            return outcome.values.tolist()
        labels = outcome.model.runtime.spec.labels
        predictions = [
            [
                {"score": score, "label": label}
                for score, label in sorted(zip(map(float, row), labels, strict=True), key=lambda pair: -pair[0])
            ]
            for row in outcome.values
        ]
        return predictions[0] if call.single else predictions

    def error_body(self, error: ServiceError) -> Any:
        if error.status >= 500:
            kind = "Unhealthy" if error.status == 503 else "Backend"
        else:
            kind = "Empty" if error.code == "empty" else "Validation"
        return {"error": error.message, "error_type": kind}
