"""The APIs the service speaks: its own (`/api/*`), OpenAI's embeddings (`/v1/*`) and
text-embeddings-inference's (`/embed`, `/predict`, `/info`, `/health`).

Each API maps its request shape onto one `Call`, and the service's one answer back onto its response
and error shapes; limits, checks, micro-batching and the inference lock are the service's, the same for
every API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from werkzeug.routing import Rule

from serve.config import Limits
from serve.errors import ServiceError

if TYPE_CHECKING:
    from serve.loader import ServedModel
    from serve.watchdog import Watchdog

FEATURE_EXTRACTION = "feature-extraction"
TEXT_CLASSIFICATION = "text-classification"


@dataclass(frozen=True)
class Call:
    """One inference request as the service runs it, whichever API it came through."""

    task: str
    model: str | None  # None: the service's first model of the task
    inputs: list[str]
    single: bool = False  # one string rather than a list: some APIs answer in kind
    truncate: bool | None = None  # None: the service's TRUNCATE
    normalize: bool | None = None  # None: as the model was trained (its Normalize module)
    raw_scores: bool = False  # classifier logits instead of probabilities
    options: dict[str, Any] = field(default_factory=dict)  # how the API renders the answer


@dataclass(frozen=True)
class Raw:
    """An answer sent as it is rather than as JSON."""

    data: bytes
    mimetype: str


@dataclass(frozen=True)
class Outcome:
    """The service's answer to a Call."""

    model: ServedModel
    values: np.ndarray  # one row per input: an embedding, or class probabilities (or logits)
    tokens: int  # tokens the model read, special tokens included


class ServiceView(Protocol):
    """What an API reads of the service (serve/app.py's Service)."""

    models: dict[str, ServedModel]
    limits: Limits
    threads: int
    watchdog: Watchdog | None

    def health(self) -> dict[str, Any]: ...

    def ready(self) -> dict[str, Any]: ...

    def list_models(self) -> dict[str, Any]: ...


class Api:
    """An API's routes and shapes. Endpoints are named `<api>.<name>`; a POST endpoint runs inference,
    a GET endpoint answers from the service's state."""

    name: str

    def rules(self) -> list[Rule]:
        raise NotImplementedError

    def get(self, endpoint: str, service: ServiceView, args: Mapping[str, Any]) -> Any:
        """A GET endpoint's answer: JSON-serializable, or Raw."""
        raise NotImplementedError

    def owns(self, path: str) -> bool:
        """Whether an error at `path` (a route of this API, or a missing one under it) takes its shape."""
        raise NotImplementedError

    def parse(self, endpoint: str, payload: Any, limits: Limits) -> Call:
        raise NotImplementedError

    def render(self, call: Call, outcome: Outcome) -> Any:
        raise NotImplementedError

    def error_body(self, error: ServiceError) -> Any:
        raise NotImplementedError
