"""The WSGI service: approved artifacts only, created per worker after fork, every limit enforced.

Run with `gunicorn -c serve/gunicorn.conf.py 'serve.app:create_app()'`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from serve import errors
from serve.artifacts import ArtifactError
from serve.config import ConfigError, Limits, load_service_config, model_names, resolve
from serve.errors import ServiceError
from serve.loader import ServedModel, open_approved
from serve.memory import pin_mmap_threshold, status_mb
from serve.openapi import openapi_document
from serve.runtime import InputTooLong

log = logging.getLogger("memfit.serve")
DEFAULT_CONFIG = "configs/service.yaml"
OPEN_ENDPOINTS = {"health", "ready", "openapi"}


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, refused with 413 before reading past `limit` (with or without Content-Length)."""
    stream = environ["wsgi.input"]
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared:
        try:
            length = int(declared)
        except ValueError:
            raise errors.bad_request("Content-Length is not a number") from None
        if length > limit:
            raise errors.too_large(limit)
        return bytes(stream.read(length))
    body = bytes(stream.read(limit + 1))
    if len(body) > limit:
        raise errors.too_large(limit)
    return body


def parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.bad_request("body is not valid UTF-8") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise errors.bad_request("JSON is nested too deeply") from None
    except ValueError as exc:
        raise errors.bad_request(f"body is not valid JSON ({exc})") from None


def parse_inputs(payload: Any, limits: Limits) -> tuple[str | None, list[str]]:
    """(model name or None, inputs) from `{"model": ..., "inputs": [...]}`; 400/422 on anything else."""
    if not isinstance(payload, dict):
        raise errors.bad_request('body must be a JSON object like {"inputs": ["text", ...]}')
    unknown = sorted(set(payload) - {"model", "inputs"})
    if unknown:
        raise errors.unprocessable(f"unknown field {unknown[0]!r}; allowed: model, inputs")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise errors.unprocessable("'model' must be a string")
    inputs = payload.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list):
        raise errors.bad_request("'inputs' must be a list of strings")
    if not inputs:
        raise errors.bad_request("'inputs' is empty")
    if len(inputs) > limits.max_batch:
        raise errors.unprocessable(
            f"{len(inputs)} inputs exceed max_batch ({limits.max_batch})", limit="max_batch", value=limits.max_batch
        )
    for index, item in enumerate(inputs):
        if not isinstance(item, str):
            raise errors.unprocessable(f"inputs[{index}] is not a string")
        if not item.strip():
            raise errors.unprocessable(f"inputs[{index}] is empty")
    return model, inputs


class Service:
    """Routes requests to the models of one service config; built once per worker process."""

    def __init__(self, config_path: str | Path):
        config, path = load_service_config(config_path)
        self.limits = config.limits
        self.api_key = os.environ.get("API_KEY") or None
        self.models: dict[str, ServedModel] = {}
        self.failures: dict[str, str] = {}
        artifacts = resolve(path, config.artifacts_dir)
        for name in model_names(config, path):
            try:
                self.models[name] = open_approved(artifacts / name, config.limits)
            except (ArtifactError, OSError, KeyError, ValueError) as exc:
                self.failures[name] = str(exc)
                log.error("model %s not served: %s", name, exc)
        self.routes = Map(
            [
                Rule("/api/health", endpoint="health", methods=["GET"]),
                Rule("/api/ready", endpoint="ready", methods=["GET"]),
                Rule("/api/models", endpoint="models", methods=["GET"]),
                Rule("/api/embed", endpoint="embed", methods=["POST"]),
                Rule("/api/classify", endpoint="classify", methods=["POST"]),
                Rule("/openapi.json", endpoint="openapi", methods=["GET"]),
            ]
        )
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "health": self.health,
            "ready": self.ready,
            "models": self.list_models,
            "embed": self.embed,
            "classify": self.classify,
            "openapi": lambda _: openapi_document(self.limits),
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            endpoint, _ = self.routes.bind_to_environ(environ).match()
            if self.api_key and endpoint not in OPEN_ENDPOINTS:
                self.authorize(environ)
            status, payload = 200, self.handlers[str(endpoint)](environ)
        except ServiceError as exc:
            status, payload = exc.status, exc.body()
        except NotFound:
            status, payload = 404, errors.not_found(f"no route {environ.get('PATH_INFO')}").body()
        except MethodNotAllowed as exc:
            status, payload = 405, ServiceError(405, "method_not_allowed", str(exc.description)).body()
        except HTTPException as exc:
            status, payload = exc.code or 400, errors.bad_request(str(exc.description)).body()
        except Exception:
            log.exception("unexpected error")
            status, payload = 500, ServiceError(500, "internal", "internal error").body()
        response = Response(json.dumps(payload), status=status, mimetype="application/json")
        return response(environ, start_response)

    def authorize(self, environ: dict[str, Any]) -> None:
        supplied = Request(environ).headers.get("Authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise errors.unauthorized()

    def health(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": "ok",
            "pid": os.getpid(),
            "rss_mb": round(status_mb(), 1),
            "models": {name: m.artifact.variant_id for name, m in self.models.items()} | dict.fromkeys(self.failures),
        }

    def ready(self, _: dict[str, Any]) -> dict[str, Any]:
        if self.failures:
            raise errors.not_ready("; ".join(f"{name}: {reason}" for name, reason in self.failures.items()))
        return {"ready": True, "models": sorted(self.models)}

    def list_models(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": name,
                    "task": model.task,
                    "variant": model.artifact.variant_id,
                    "limits": model.artifact.manifest["limits"],
                    "metrics": model.artifact.manifest["metrics"],
                }
                for name, model in self.models.items()
            ],
            "limits": self.limits.model_dump(),
        }

    def pick(self, requested: str | None, task: str) -> ServedModel:
        if requested is not None:
            if requested in self.failures:
                raise errors.not_ready(f"model {requested!r} is not loaded: {self.failures[requested]}")
            if requested not in self.models:
                raise errors.not_found(f"unknown model {requested!r}; served: {', '.join(sorted(self.models))}")
            model = self.models[requested]
            if model.task != task:
                raise errors.unprocessable(f"model {requested!r} is a {model.task} model")
            return model
        for model in self.models.values():
            if model.task == task:
                return model
        raise errors.not_found(f"no {task} model is served")

    def infer(self, environ: dict[str, Any], task: str) -> tuple[ServedModel, np.ndarray]:
        requested, inputs = parse_inputs(parse_json(read_body(environ, self.limits.max_body_bytes)), self.limits)
        model = self.pick(requested, task)
        try:
            encodings = model.runtime.encode(inputs, truncate=self.limits.truncate)
        except InputTooLong as exc:
            raise errors.unprocessable(
                f"inputs[{exc.index}] has more than max_seq_len ({exc.limit}) tokens; shorten it or set TRUNCATE=true",
                limit="max_seq_len",
                value=exc.limit,
            ) from None
        return model, model.runtime.run(encodings)

    def embed(self, environ: dict[str, Any]) -> dict[str, Any]:
        model, vectors = self.infer(environ, "feature-extraction")
        return {
            "model": model.name,
            "variant": model.artifact.variant_id,
            "dimensions": int(vectors.shape[1]),
            "embeddings": vectors.tolist(),
        }

    def classify(self, environ: dict[str, Any]) -> dict[str, Any]:
        model, probabilities = self.infer(environ, "text-classification")
        labels = model.runtime.spec.labels
        return {
            "model": model.name,
            "variant": model.artifact.variant_id,
            "results": [
                {"label": labels[int(row.argmax())], "scores": dict(zip(labels, map(float, row), strict=True))}
                for row in probabilities
            ],
        }


def create_app(config_path: str | None = None) -> Service:
    """The WSGI app for one worker (gunicorn calls this after fork: sessions are never shared)."""
    pin_mmap_threshold()
    try:
        return Service(config_path or os.environ.get("SERVICE_CONFIG", DEFAULT_CONFIG))
    except ConfigError as exc:
        raise SystemExit(f"memfit serve: {exc}") from None
