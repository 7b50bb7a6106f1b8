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
