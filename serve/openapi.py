"""The OpenAPI 3 document of the service, with the configured limits in the schemas."""

from __future__ import annotations

from typing import Any

from serve.config import Limits


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


INFERENCE_ERRORS = {
    "400": _error("malformed JSON, invalid UTF-8, or empty inputs"),
    "401": _error("API key required"),
    "404": _error("unknown model"),
    "408": _error("body not received within READ_TIMEOUT"),
    "413": _error("body larger than max_body_bytes"),
    "415": _error("Content-Type is not application/json (UTF-8)"),
    "422": _error(
        "too many inputs; an input over max_input_chars characters or max_seq_len tokens; a request over "
        "max_request_chars; a non-string, a lone surrogate, or an input with no visible character"
    ),
    "503": _error("model not loaded"),
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, **({"content": {"application/json": {"schema": schema}}} if schema else {})}


def compatible_paths(limits: Limits) -> dict[str, Any]:
    """OpenAI's and text-embeddings-inference's routes (serve/apis), with the same limits and statuses
    as /api/*, errors in each API's own shape."""
    texts = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "maxItems": limits.max_batch, "items": {"type": "string", "minLength": 1}},
        ]
    }
    openai_error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string"},
                },
            }
        },
    }
    tei_error = {
        "type": "object",
        "required": ["error", "error_type"],
        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
    }
    openai_errors = {status: _answer(r["description"], openai_error) for status, r in INFERENCE_ERRORS.items()}
    tei_errors = {status: _answer(r["description"], tei_error) for status, r in INFERENCE_ERRORS.items()}
    boolean = {"type": "boolean"}

    def tei_post(summary: str, option: str, answer: str) -> dict[str, Any]:
        properties = {"inputs": texts, option: boolean, "truncate": boolean}
        schema = {"type": "object", "additionalProperties": False, "required": ["inputs"], "properties": properties}
        return {
            "post": {
                "summary": f"text-embeddings-inference: {summary}",
                "requestBody": _body(schema),
                "responses": {"200": _answer(answer, {"type": "array"}), **tei_errors},
            }
        }

    return {
        "/v1/embeddings": {
            "post": {
                "summary": "OpenAI-compatible embeddings (float or base64), with token usage",
                "requestBody": _body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["input", "model"],
                        "properties": {
                            "input": texts,
                            "model": {"type": "string"},
                            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                            "dimensions": {"type": "integer", "description": "only the model's own"},
                            "user": {"type": "string"},
                        },
                    }
                ),
                "responses": {"200": _answer("a list of embeddings", {"type": "object"}), **openai_errors},
            }
        },
        "/v1/models": {"get": {"summary": "OpenAI-compatible model list", "responses": {"200": _answer("models")}}},
        "/embed": tei_post("embeddings, normalized unless normalize is false", "normalize", "one per input"),
        "/predict": tei_post("scores per label, highest first", "raw_scores", "predictions"),
        "/info": {
            "get": {"summary": "text-embeddings-inference: the first model", "responses": {"200": _answer("info")}}
        },
        "/health": {
            "get": {
                "summary": "text-embeddings-inference: 200 once every model is served",
                "responses": {"200": _answer("healthy"), "503": _answer("a model is not served", tei_error)},
            }
        },
    }


def openapi_document(limits: Limits) -> dict[str, Any]:
    request = {
        "type": "object",
        "additionalProperties": False,
        "required": ["inputs"],
        "properties": {
            "model": {"type": "string", "description": "a served model's name; default: the first of the task"},
            "inputs": {
                "type": "array",
                "minItems": 1,
                "maxItems": limits.max_batch,
                "items": {"type": "string", "minLength": 1},
                "description": (
                    f"at most {limits.max_batch} texts of at most {limits.max_seq_len} tokens each, checked "
                    "first in characters (max_input_chars)"
                ),
            },
        },
    }
    post_json = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Inputs"}}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "memfit service",
            "version": "1",
            "description": "Approved ONNX models within a memory budget.",
        },
        "paths": {
            "/api/health": {
                "get": {"summary": "liveness, variants and worker RSS", "responses": {"200": _json("Health")}}
            },
            "/api/ready": {
                "get": {
                    "summary": "200 once every model loaded and verified",
                    "responses": {"200": _json("Ready"), "503": _error("a model failed to load or verify")},
                }
            },
            "/api/models": {
                "get": {
                    "summary": "served models with their manifests' metrics and limits",
                    "responses": {"200": _json("Models"), "401": _error("API key required")},
                }
            },
            "/api/embed": {
                "post": {
                    "summary": "embeddings, pooled and normalized as the model defines",
                    "requestBody": post_json,
                    "responses": {"200": _json("Embeddings"), **INFERENCE_ERRORS},
                }
            },
            "/api/classify": {
                "post": {
                    "summary": "label and scores per input",
                    "requestBody": post_json,
                    "responses": {"200": _json("Classes"), **INFERENCE_ERRORS},
                }
            },
            **compatible_paths(limits),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Inputs": request,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "models", "rss_mb"],
                    "properties": {
                        "status": {"type": "string"},
                        "pid": {"type": "integer"},
                        "rss_mb": {"type": "number"},
                        "models": {"type": "object", "additionalProperties": {"type": "string", "nullable": True}},
                        "watchdog": {
                            "type": "object",
                            "nullable": True,
                            "description": "proven peak, the RSS limit over which a worker is recycled, recycles",
                        },
                    },
                },
                "Ready": {
                    "type": "object",
                    "properties": {
                        "ready": {"type": "boolean"},
                        "models": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "Models": {"type": "object", "properties": {"models": {"type": "array", "items": {"type": "object"}}}},
                "Embeddings": {
                    "type": "object",
                    "required": ["model", "embeddings"],
                    "properties": {
                        "model": {"type": "string"},
                        "variant": {"type": "string"},
                        "dimensions": {"type": "integer"},
                        "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    },
                },
                "Classes": {
                    "type": "object",
                    "required": ["model", "results"],
                    "properties": {
                        "model": {"type": "string"},
                        "variant": {"type": "string"},
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "label": {"type": "string"},
                                    "scores": {"type": "object", "additionalProperties": {"type": "number"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    }
