"""Following a story: the one event follower of the clients, the demo and the batch job.

`follow` turns long-polls (`fetch(after) -> events`) into a stream of ProgressEvents with the
contract's rule (`storymem.progress.EventCursor`: a terminal event ends the stream only when
nothing follows it). `wait` follows a story to its end with the one progress-bar class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from ..progress import EventCursor, ProgressBars, ProgressEvent
from .contract import StoryStatus


def follow(fetch: Callable[[int], list], after: int = 0, is_over: Callable[[], bool] | None = None) -> Iterator[ProgressEvent]:
    """Events after seq `after` until the story ends. fetch(after) long-polls for the next batch;
    is_over() is asked after an empty batch (a story whose log has no terminal event left)."""
    cursor = EventCursor(after)
    while True:
        batch = fetch(cursor.last)
        for raw in cursor.feed(batch):
            yield raw if isinstance(raw, ProgressEvent) else ProgressEvent.model_validate(raw)
        if cursor.ended:
            return
        if not batch and is_over is not None and is_over():
            return


def wait(client, story_id: str, progress: bool = True, timeout: float | None = None) -> StoryStatus:
    """Consume the story's events (feeding ProgressBars) until it ends; its final status. Works
    with any client that has `events(id)` and `status(id)`. The timeout is checked as events and
    keep-alives arrive."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    bars = ProgressBars(desc=story_id[-8:]) if progress else None
    try:
        for e in client.events(story_id):
            if bars is not None:
                bars(e)
            if late():
                break
    finally:
        if bars is not None:
            bars.close()
    status = client.status(story_id)
    while not status.state.terminal:  # the stream ended early (a dropped connection, a late state)
        if late():
            raise TimeoutError(f"story {story_id} is still {status.state.value} after {timeout} s")
        time.sleep(0.5)
        status = client.status(story_id)
    return status


__all__ = ["follow", "wait"]
