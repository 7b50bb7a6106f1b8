"""memfit's own API: `/api/embed`, `/api/classify`, health, readiness, the served models, OpenAPI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from werkzeug.routing import Rule

from serve import metrics
from serve.apis import FEATURE_EXTRACTION, TEXT_CLASSIFICATION, Api, Call, Outcome, Raw, ServiceView
from serve.config import Limits
from serve.errors import ServiceError
from serve.inputs import parse_inputs
from serve.openapi import openapi_document

TASKS = {"api.embed": FEATURE_EXTRACTION, "api.classify": TEXT_CLASSIFICATION}
# Where each task's requests go: the memory proof and the service fit send their bodies here (every API
# shares the path from body to answer; only the JSON shapes around it differ).
INFERENCE_PATHS = {FEATURE_EXTRACTION: "/api/embed", TEXT_CLASSIFICATION: "/api/classify"}


class NativeApi(Api):
    name = "api"

    def rules(self) -> list[Rule]:
        return [
            Rule("/api/health", endpoint="api.health", methods=["GET"]),
            Rule("/api/ready", endpoint="api.ready", methods=["GET"]),
            Rule("/api/models", endpoint="api.models", methods=["GET"]),
            Rule("/api/embed", endpoint="api.embed", methods=["POST"]),
            Rule("/api/classify", endpoint="api.classify", methods=["POST"]),
            Rule("/openapi.json", endpoint="api.openapi", methods=["GET"]),
            Rule("/metrics", endpoint="api.metrics", methods=["GET"]),
        ]

    def owns(self, path: str) -> bool:
        return True  # every path no other API owns

    def get(self, endpoint: str, service: ServiceView, args: Mapping[str, Any]) -> Any:
        if endpoint == "api.health":
            return service.health()
        if endpoint == "api.ready":
            return service.ready()
        if endpoint == "api.models":
            return service.list_models()
        if endpoint == "api.metrics":
            metrics.record_memory(service.watchdog, fresh=True)
            return Raw(metrics.exposition(), metrics.CONTENT_TYPE)
        return openapi_document(service.limits)

    def parse(self, endpoint: str, payload: Any, limits: Limits) -> Call:
        model, inputs = parse_inputs(payload, limits)
        return Call(TASKS[endpoint], model, inputs)

    def render(self, call: Call, outcome: Outcome) -> Any:
        model, values = outcome.model, outcome.values
        if model.task == TEXT_CLASSIFICATION:
            labels = model.runtime.spec.labels
            return {
                "model": model.name,
                "variant": model.variant,
                "results": [
                    {"label": labels[int(row.argmax())], "scores": dict(zip(labels, map(float, row), strict=True))}
                    for row in values
                ],
            }
        return {
            "model": model.name,
            "variant": model.variant,
            "dimensions": int(values.shape[1]),
            "embeddings": values.tolist(),
        }

    def error_body(self, error: ServiceError) -> Any:
        return error.body()
