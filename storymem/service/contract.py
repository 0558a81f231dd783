"""The service's contract, written once: story states, the status and page models, the error family
with its HTTP status, and the engine's method list.

Every layer speaks these: the manifest (`storymem.story.Manifest.state`), the job book, the Ray
engine (`actors/engine.py`), the HTTP routes (`serve_app.py`) and both clients. Errors carry
`(field, problem)` pairs and their HTTP status, and pickle across Ray.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from pydantic import BaseModel, Field


class StoryState(str, Enum):
    """Where a story is. The manifest stores the same values."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (StoryState.DONE, StoryState.FAILED, StoryState.CANCELLED)

    @property
    def resumable(self) -> bool:
        return self in (StoryState.FAILED, StoryState.CANCELLED)


class StoryStatus(BaseModel):
    id: str
    state: StoryState
    story_name: str | None = None
    shots_done: int = 0
    shots_total: int
    current_shot: int | None = Field(None, description="0-based shot being made, when running.")
    step: int | None = Field(None, description="Denoising steps done in the current shot.")
    steps_total: int | None = None
    phase: str | None = Field(None, description="Phase of the last progress event.")
    created: float
    updated: float
    started: float | None = None
    finished: float | None = None
    seconds_per_shot: list[float] = Field(default_factory=list, description="Wall seconds of each committed shot.")
    error: str | None = None
    video_key: str | None = Field(None, description="Object key of the final video once done.")
    attempts: int = Field(0, description="Times a director has run this story (restarts after faults count).")
    owner: str | None = Field(None, description="The tenant the story belongs to (None: no tenants configured).")
    run: int = Field(0, description="Runs of this story (a resume or an engine restart starts a new run).")


class StoryPage(BaseModel):
    """One page of GET /v1/stories."""

    items: list[StoryStatus]
    total: int = Field(description="Stories matching the filter.")
    offset: int = 0
    limit: int = 20


# ---------------------------------------------------------------------------------------- errors


class StoryMemError(RuntimeError):
    """A request the service refused or could not serve. `errors`: (field, problem) pairs;
    `status`: the HTTP status (also in-cluster, where no HTTP is involved)."""

    status_code = 500

    def __init__(self, status: int | None = None, errors=(), retry_after_s: float | None = None):
        status = type(self).status_code if status is None else int(status)
        # The constructor arguments are kept as `args` so that the error pickles across Ray.
        super().__init__(status, [tuple(e) for e in errors], retry_after_s)
        self.status = status
        self.errors = [(str(f), str(p)) for f, p in errors]
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        text = "; ".join(f"{f}: {p}" for f, p in self.errors) or "error"
        return f"HTTP {self.status}: {text}"

    def detail(self) -> list[dict]:
        """The JSON error body's `detail` list."""
        return [{"field": f, "problem": p} for f, p in self.errors]


class InvalidRequest(StoryMemError, ValueError):
    """Malformed request: bad JSON, a bad field, an oversize body, a wrong content type (400/413/415/422)."""

    status_code = 422


class Unauthorized(StoryMemError):
    """Missing or wrong bearer token (401)."""

    status_code = 401


class NotFound(StoryMemError, KeyError):
    """No such story, shot or route (404). Stories of another tenant are not found either."""

    status_code = 404

    __str__ = StoryMemError.__str__  # not KeyError's repr of the args


class Conflict(StoryMemError):
    """The story's state does not allow this (yet), or an Idempotency-Key was reused for another body (409)."""

    status_code = 409


class QueueFull(StoryMemError):
    """The engine's queue (or the tenant's quota) is full; retry after `retry_after_s` (429)."""

    status_code = 429


class ServiceUnavailable(StoryMemError):
    """The engine or the storage did not answer, or the service is not ready (5xx)."""

    status_code = 503


def error_for_status(status: int, errors, retry_after_s: float | None = None) -> StoryMemError:
    """The typed error for an HTTP status."""
    kind: type[StoryMemError]
    if status in (401, 403):
        kind = Unauthorized
    elif status == 404:
        kind = NotFound
    elif status == 409:
        kind = Conflict
    elif status == 429:
        kind = QueueFull
    elif 400 <= status < 500:
        kind = InvalidRequest
    else:
        kind = ServiceUnavailable
    return kind(status, errors, retry_after_s)


def as_service_error(exc: BaseException) -> BaseException:
    """A library ScriptError as the 422 it is; other exceptions unchanged."""
    from ..script import ScriptError

    if isinstance(exc, ScriptError):
        return InvalidRequest(422, exc.errors)
    return exc


# ---------------------------------------------------------------------------------------- the engine


class EngineAPI(Protocol):
    """What an engine answers (the Ray `StoryEngine`, or the in-process `JobBook` over a driver).

    Requests reach it validated (`storymem.service.intake`); it trusts them. `tenant` None means an
    admin caller (sees every story). Every method returns JSON-able data (dicts of StoryStatus...).
    """

    async def submit(
        self, request, tenant: str | None = None, idempotency_key: str | None = None, digest: str | None = None
    ) -> dict: ...

    async def status(self, story_id: str, tenant: str | None = None) -> dict: ...

    async def events(self, story_id: str, after: int = 0, timeout: float = 0.0, tenant: str | None = None) -> list: ...

    async def cancel(self, story_id: str, tenant: str | None = None) -> dict: ...

    async def resume(self, story_id: str, tenant: str | None = None) -> dict: ...

    async def list(self, offset: int = 0, limit: int = 20, state: str | None = None, tenant: str | None = None) -> dict: ...

    async def memory(self, story_id: str, tenant: str | None = None) -> list: ...

    async def health(self) -> dict: ...

    async def profile(self) -> dict: ...


# The engine's method list, from the Protocol above: adapters (a Ray handle as coroutines, the
# Serve ingress) are generated from it rather than written out again.
ENGINE_METHODS: tuple[str, ...] = tuple(
    name for name, value in EngineAPI.__dict__.items() if callable(value) and not name.startswith("_")
)

__all__ = [
    "ENGINE_METHODS",
    "EngineAPI",
    "StoryState",
    "StoryStatus",
    "StoryPage",
    "StoryMemError",
    "InvalidRequest",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "QueueFull",
    "ServiceUnavailable",
    "error_for_status",
    "as_service_error",
]
