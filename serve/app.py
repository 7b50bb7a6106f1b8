"""The WSGI service: approved artifacts only, created per worker after fork, every limit enforced.

Run with `gunicorn -c serve/gunicorn.conf.py 'serve.app:create_app()'`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import Map
from werkzeug.wrappers import Request, Response

from serve import errors, metrics
from serve.apis import Api, Call, Outcome, Raw
from serve.apis.native import NativeApi
from serve.apis.openai import OpenAIApi
from serve.apis.tei import TeiApi
from serve.artifacts import ArtifactError
from serve.config import ConfigError, Limits, load_service_config, model_names, resolve
from serve.errors import ServiceError
from serve.inputs import check_text, shown
from serve.loader import ServedModel, open_approved
from serve.memory import allocator_pinned, pin_allocator, status_mb
from serve.planner import proven_worker_peak
from serve.runtime import InputTooLong
from serve.watchdog import Watchdog, margin_pct

log = logging.getLogger("memfit.serve")
DEFAULT_CONFIG = "configs/service.yaml"
OPEN_ENDPOINTS = {"api.health", "api.ready", "api.openapi", "tei.health"}
ROUTE_KEY, MODEL_KEY = "memfit.route", "memfit.model"  # what a request's metrics are labelled by


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
        return receive(stream, length)
    body = receive(stream, limit + 1)
    if len(body) > limit:
        raise errors.too_large(limit)
    return body


def receive(stream: Any, size: int) -> bytes:
    try:
        return bytes(stream.read(size))
    except TimeoutError as exc:  # the worker's READ_TIMEOUT (serve/worker.py)
        raise errors.request_timeout(str(exc)) from None


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


JSON_TYPE = "application/json"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def check_content_type(environ: dict[str, Any]) -> None:
    """415 unless the body is declared JSON (UTF-8): a text/plain or form POST needs no CORS preflight,
    so without this any web page could make a visitor's browser call the service."""
    request = Request(environ)
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if request.mimetype != JSON_TYPE or charset not in ("utf-8", "utf8"):
        declared = environ.get("CONTENT_TYPE") or "none"
        raise errors.unsupported_media_type(f"Content-Type must be {JSON_TYPE} (UTF-8); got {shown(declared)}")


class Service:
    """Routes requests to the models of one service; built once per worker process.

    Requests are read concurrently (gthread), but parsing, tokenizing, inference and serializing run
    one request at a time under `inference_lock`: the memory the build proves is one request's."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        limits: Limits,
        failures: dict[str, str] | None = None,
        api_key: str | None = None,
        watchdog: Watchdog | None = None,
        threads: int = 1,
    ):
        self.models = models
        self.limits = limits
        self.failures = failures or {}
        self.api_key = api_key
        self.watchdog = watchdog
        self.threads = threads  # requests one worker reads at once
        self.inference_lock = threading.Lock()
        # The first API that owns a path shapes its errors; the native API owns the rest.
        self.apis: tuple[Api, ...] = (OpenAIApi(), TeiApi(), NativeApi())
        self.routes = Map(
            [rule for api in self.apis for rule in api.rules()],
            merge_slashes=False,  # merging answers with a redirect; a JSON API answers 404 instead
            redirect_defaults=False,
        )

    @classmethod
    def from_config(cls, config_path: str | Path) -> Service:
        """Every approved model of the service config, verified; a model that fails is reported by
        /api/ready, and the others are served."""
        config, path = load_service_config(config_path)
        models: dict[str, ServedModel] = {}
        failures: dict[str, str] = {}
        artifacts = resolve(path, config.artifacts_dir)
        for name in model_names(config, path):
            try:
                models[name] = open_approved(artifacts / name, config)
            except (ArtifactError, OSError, KeyError, ValueError) as exc:
                failures[name] = str(exc)
                log.error("model %s not served: %s", name, exc)
        proven = proven_worker_peak(config, path)
        watchdog = Watchdog(proven, margin_pct()) if proven is not None else None
        return cls(models, config.limits, failures, os.environ.get("API_KEY") or None, watchdog, config.threads)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        mimetype = JSON_TYPE
        try:
            answer, status, headers = self.dispatch(environ), 200, {}
            data, mimetype = (answer.data, answer.mimetype) if isinstance(answer, Raw) else (answer, mimetype)
        except ServiceError as exc:
            status, data, headers = exc.status, self.error_data(environ, exc), exc.headers
        except Exception:
            log.exception("unexpected error")
            error = errors.internal()
            status, data, headers = error.status, self.error_data(environ, error), {}
        response = Response(data, status=status, mimetype=mimetype, headers=SECURITY_HEADERS | headers)
        route, model = environ.get(ROUTE_KEY, "unmatched"), environ.get(MODEL_KEY, "")
        metrics.record_request(route, model, status, time.perf_counter() - started)
        return response(environ, start_response)

    def error_data(self, environ: dict[str, Any], error: ServiceError) -> bytes:
        """The error in the shape of the API whose path was asked for."""
        path = str(environ.get("PATH_INFO") or "")
        api = next(api for api in self.apis if api.owns(path))
        return json.dumps(api.error_body(error)).encode()

    def dispatch(self, environ: dict[str, Any]) -> bytes | Raw:
        try:
            rule, args = self.routes.bind_to_environ(environ).match(return_rule=True)
        except MethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.valid_methods or ()))
            raise errors.method_not_allowed(str(environ.get("REQUEST_METHOD")), allowed) from None
        except HTTPException:  # not found, or a redirect (never sent: a JSON API has nothing to redirect to)
            raise errors.not_found(f"no route {shown(environ.get('PATH_INFO'))}") from None
        endpoint = str(rule.endpoint)
        environ[ROUTE_KEY] = rule.rule  # the route's pattern: bounded label values, never a raw path
        if self.api_key and endpoint not in OPEN_ENDPOINTS:
            self.authorize(environ)
        api = next(api for api in self.apis if endpoint.startswith(f"{api.name}."))
        if "POST" in (rule.methods or ()):
            return self.infer(environ, api, endpoint)
        answer = api.get(endpoint, self, args)
        return answer if isinstance(answer, Raw) else json.dumps(answer).encode()

    def authorize(self, environ: dict[str, Any]) -> None:
        supplied = Request(environ).headers.get("Authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise errors.unauthorized()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "pid": os.getpid(),
            "rss_mb": round(status_mb(), 1),
            "allocator_pinned": allocator_pinned(),
            "models": {name: m.variant for name, m in self.models.items()} | dict.fromkeys(self.failures),
            "weights": {name: m.runtime.weights.to_json() for name, m in self.models.items()},
            "intra_op_threads": {name: m.runtime.settings.intra_op_num_threads for name, m in self.models.items()},
            "watchdog": self.watchdog.status() if self.watchdog else None,
        }

    def ready(self) -> dict[str, Any]:
        if self.failures:
            raise errors.not_ready("; ".join(f"{name}: {reason}" for name, reason in self.failures.items()))
        return {"ready": True, "models": sorted(self.models)}

    def list_models(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": name,
                    "task": model.task,
                    "variant": model.variant,
                    "limits": model.manifest["limits"],
                    "metrics": model.manifest["metrics"],
                }
                for name, model in self.models.items()
            ],
            "limits": self.limits.model_dump(),
        }

    def pick(self, requested: str | None, task: str) -> ServedModel:
        if requested is not None:
            if requested in self.failures:
                raise errors.not_ready(
                    f"model {shown(requested)} is not loaded: {self.failures[requested]}", param="model"
                )
            if requested not in self.models:
                raise errors.not_found(
                    f"unknown model {shown(requested)}; served: {', '.join(sorted(self.models))}", param="model"
                )
            model = self.models[requested]
            if model.task != task:
                raise errors.unprocessable(f"model {shown(requested)} is a {model.task} model", param="model")
            return model
        for model in self.models.values():
            if model.task == task:
                return model
        raise errors.not_found(f"no {task} model is served")

    def infer(self, environ: dict[str, Any], api: Api, endpoint: str) -> bytes:
        """The JSON answer to one inference request. The body is read outside the lock (a slow client
        delays only itself); everything that allocates with the input's size runs under it."""
        check_content_type(environ)
        body = read_body(environ, self.limits.max_body_bytes)
        with self.inference_lock:
            call = api.parse(endpoint, parse_json(body), self.limits)
            del body
            model = self.pick(call.model, call.task)
            environ[MODEL_KEY] = model.name
            runs_before = model.runtime.session_runs
            outcome = self.answer(call, model)
            metrics.record_inference(model.name, outcome.tokens, model.runtime.session_runs - runs_before)
            metrics.record_memory(self.watchdog)
            return json.dumps(api.render(call, outcome)).encode()

    def answer(self, call: Call, model: ServedModel) -> Outcome:
        truncate = self.limits.truncate if call.truncate is None else call.truncate
        try:
            texts = model.runtime.bound(call.inputs, truncate=truncate)
            call.inputs.clear()  # an uncut input may be megabytes long: only the cut texts are kept
            total = sum(map(len, texts))
            if total > model.runtime.max_request_chars:
                raise InputTooLong(None, "max_request_chars", model.runtime.max_request_chars, total, "characters")
            for index, text in enumerate(texts):
                check_text(index, text)
            rows = model.runtime.token_ids(texts, truncate=truncate)
        except InputTooLong as exc:
            hint = "; shorten it or set TRUNCATE=true" if exc.limit_name != "max_request_chars" else ""
            raise errors.unprocessable(f"{exc}{hint}", limit=exc.limit_name, value=exc.limit) from None
        values = model.runtime.run(rows, normalize=call.normalize, raw_scores=call.raw_scores)
        return Outcome(model, values, sum(map(len, rows)))


def create_app(config_path: str | None = None) -> Service:
    """The WSGI app for one worker (gunicorn calls this after fork: sessions are never shared)."""
    if not pin_allocator():
        log.warning("glibc's mmap threshold and arenas could not be pinned: this worker may exceed its proven peak")
    try:
        return Service.from_config(config_path or os.environ.get("SERVICE_CONFIG", DEFAULT_CONFIG))
    except ConfigError as exc:
        raise SystemExit(f"memfit serve: {exc}") from None
