"""Progress events: one schema for the CLI bar, the engine's event log, the SSE stream and pages."""

from __future__ import annotations

import time
from enum import Enum
from typing import Callable

from pydantic import BaseModel, Field


class Phase(str, Enum):
    QUEUED = "queued"
    START = "start"
    ENCODE = "encode"  # text and memory encoding
    DENOISE = "denoise"
    DECODE = "decode"
    SCORE = "score"
    COMMIT = "commit"
    STITCH = "stitch"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED, Phase.CANCELLED)


class ProgressEvent(BaseModel):
    """One step of a story's progress. `shot` is 0-based; `step` counts denoising steps done."""

    story: str = Field(description="Story id.")
    shot: int | None = Field(None, description="Shot index (0-based) the event belongs to.")
    shots_total: int = Field(description="Shots in the story.")
    step: int | None = Field(None, description="Denoising steps done in this shot.")
    steps_total: int | None = Field(None, description="Denoising steps per shot.")
    phase: Phase
    t: float = Field(default_factory=time.time, description="Unix time of the event.")
    seq: int = Field(0, description="Position in the story's event log (set by the log).")
    message: str | None = Field(None, description="Reason for failed/cancelled, or a note.")


EventSink = Callable[[ProgressEvent], None]


class EventLog:
    """An append-only, bounded list of events with sequence numbers, for pollers that resume
    from the last seq they saw. Keeps the newest `capacity` events (per-step events are many)."""

    def __init__(self, capacity: int = 2000):
        self.capacity = capacity
        self._events: list[ProgressEvent] = []
        self._next = 1

    def append(self, event: ProgressEvent) -> ProgressEvent:
        event = event.model_copy(update={"seq": self._next})
        self._next += 1
        self._events.append(event)
        if len(self._events) > self.capacity:
            # Drop old per-step events first: phase changes are what late readers need.
            steps = [i for i, e in enumerate(self._events) if e.phase == Phase.DENOISE]
            drop = steps[0] if steps else 0
            del self._events[drop]
        return event

    def since(self, seq: int = 0) -> list[ProgressEvent]:
        return [e for e in self._events if e.seq > seq]

    @property
    def last(self) -> ProgressEvent | None:
        return self._events[-1] if self._events else None
