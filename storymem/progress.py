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
    run: int = Field(0, description="The story's run this event belongs to (a resume starts a new run).")


EventSink = Callable[[ProgressEvent], None]


class EventLog:
    """An append-only, bounded list of events with sequence numbers, for pollers that resume
    from the last seq they saw. Keeps the newest `capacity` events (per-step events are many)."""

    def __init__(self, capacity: int = 2000, start: int = 1):
        """start: the first seq. A log rebuilt after an engine restart starts above any seq the
        lost log handed out (the engine uses the time in ms), so Last-Event-ID stays meaningful."""
        self.capacity = capacity
        self._events: list[ProgressEvent] = []
        self._next = start

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


class ProgressBars:
    """Two tqdm bars fed by progress events: shots of the story and steps of the current shot.

    The one bar of every front end (`storymem run`, the clients' `wait`, the demo). Totals come
    from the constructor or from the first event; a resumed story starts at its committed shots.
    """

    def __init__(self, shots_total: int | None = None, steps_total: int | None = None, done: int = 0, desc: str = "shots"):
        self._args = (shots_total, steps_total, done, desc)
        self.shots = self.steps = None
        if shots_total is not None:
            self._open(shots_total, steps_total or 0, done, desc)

    def _open(self, shots_total: int, steps_total: int, done: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.shots = tqdm(total=shots_total, initial=done, desc=desc, unit="shot", position=0)
        self.steps = tqdm(total=steps_total, desc="steps", unit="step", position=1, leave=False)

    def __call__(self, e: ProgressEvent) -> None:
        if self.shots is None:
            _, steps, done, desc = self._args
            self._open(e.shots_total, e.steps_total or steps or 0, done, desc)
        if e.phase == Phase.ENCODE and e.shot is not None:
            self.steps.reset(total=e.steps_total or self.steps.total)
            self.steps.set_description(f"shot {e.shot + 1}/{e.shots_total}")
        elif e.phase in (Phase.DENOISE, Phase.DECODE) and e.step is not None:
            self.steps.n = e.step
            self.steps.refresh()
        elif e.phase == Phase.COMMIT and e.shot is not None:
            self.shots.n = e.shot + 1
            self.shots.refresh()
        elif e.phase.terminal or e.phase == Phase.STITCH:
            self.shots.set_postfix_str(e.phase.value)

    def close(self) -> None:
        for bar in (self.steps, self.shots):
            if bar is not None:
                bar.close()


class EventCursor:
    """The one rule for following a story's events, shared by the SSE stream and every client.

    Feed it batches (events with seq > `last`, oldest first); it hands back the events to pass on
    and whether the stream has ended. A terminal event ends the stream only when nothing follows it:
    a story resumed after `cancelled` continues into its new run.
    """

    def __init__(self, after: int = 0):
        self.last = after
        self.ended = False

    def feed(self, batch: list) -> list:
        out = []
        for i, raw in enumerate(batch):
            e = raw if isinstance(raw, ProgressEvent) else ProgressEvent.model_validate(raw)
            if e.seq <= self.last:
                continue
            self.last = e.seq
            out.append(raw)
            if e.phase.terminal and i == len(batch) - 1:
                self.ended = True
        return out
