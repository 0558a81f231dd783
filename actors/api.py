"""The engine's contract with its callers (Serve app, batch job, Python client, demo).

`StoryEngine` (actors/engine.py) is a named async Ray actor. Every method returns plain JSON-able
data (dicts of the models below), so callers need no Ray types beyond the handle.

    submit(request: dict, owner: str | None = None) -> dict (StoryStatus)   # ScriptError / EngineFull
    status(story_id) -> dict (StoryStatus)                                   # StoryNotFound
    events(story_id, after: int = 0, timeout: float = 0.0) -> list[dict]     # ProgressEvent dicts, seq > after;
                                                                             # waits up to timeout for new ones
    cancel(story_id) -> dict (StoryStatus)
    resume(story_id) -> dict (StoryStatus)    # failed or cancelled stories continue from the last committed shot
    list(offset: int = 0, limit: int = 20, state: str | None = None, owner: str | None = None)
        -> dict {"items": [StoryStatus...], "total": int}   # newest first; owner filters when given
    memory(story_id) -> list[dict]            # per committed shot: index, mode, memory_used, keyframes
                                              # [{frame, key}], memory_after
    health() -> dict                          # generators alive, queue length, running stories

Optional extras: `wait_ready(timeout=300.0) -> dict` (health() once a generator has loaded the
model) and `internals(story_id=None) -> dict` (generator pool leases/pids/busy times, leases per
shot and the director's pid; for tests, benchmarks and operators). `actors.start_engine(cfg)` starts
the engine (or returns the running one). Cancel of a cancelled story returns its status; of a done
or failed story raises StoryConflict; `cancel` waits up to 10 s for the story to stop.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

ENGINE_NAME = "storymem-engine"


class StoryState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (StoryState.DONE, StoryState.FAILED, StoryState.CANCELLED)


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
    owner: str | None = Field(None, description="Who submitted the story (submit's owner), when given.")


class EngineFull(RuntimeError):
    """More stories are queued or running than the engine accepts (HTTP 429)."""

    def __init__(self, retry_after_s: float, message: str = "the story queue is full"):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # crosses process boundaries (Ray pickles exceptions raised in actors)
        return (type(self), (self.retry_after_s, str(self)))


class StoryNotFound(KeyError):
    """No story has this id (HTTP 404)."""


class StoryConflict(RuntimeError):
    """The request does not fit the story's state, e.g. resuming a story that is running (HTTP 409)."""


def get_engine(namespace: str = "storymem"):
    """The running engine's handle (the engine must have been started in this Ray cluster)."""
    import ray

    return ray.get_actor(ENGINE_NAME, namespace=namespace)
