"""The memory of every running story in one actor, and the proxy a director uses in its place.

The actor keeps each story's `MemoryBank` (keyframes, embeddings, sink/window, tail) with the number
of shots applied to it. `open` reuses a cached bank only when it matches the manifest exactly
(same count of committed shots); otherwise it restores the lossless state the manifest names from
storage. A bank updated for a shot that was never committed (its director died) is thus never used.
The actor restarts if it dies; its directors then see `StoryInterrupted` and run again from their
manifest, which restores the bank.
"""

from __future__ import annotations

import os

import numpy as np
import ray

from storymem.config import MemoryConfig, StorageConfig
from storymem.memory import MemoryBank
from storymem.storage import S3Store
from storymem.story import StoryInterrupted

from ._common import ACTOR_LOST, FramesRef, get


@ray.remote(max_restarts=-1, max_task_retries=0)
class MemoryBankActor:
    def __init__(self, storage_cfg: StorageConfig):
        self.store = S3Store(storage_cfg)
        self.banks: dict[str, tuple[MemoryBank, int, str | None]] = {}  # story -> (bank, applied, state key)

    def _bank(self, story: str) -> MemoryBank:
        try:
            return self.banks[story][0]
        except KeyError:
            raise StoryInterrupted(f"memory of story {story} is not open (the memory actor restarted)") from None

    def open(self, story: str, applied: int, state_key: str | None, max_size: int, fix: int) -> bool:
        """Make the story's bank match its manifest: `applied` committed shots, the last one's state
        stored at `state_key`. Returns False when the bank is new and empty (the caller seeds it with
        reference images), True when it holds the restored state."""
        cached = self.banks.get(story)
        if cached is not None and cached[1] == applied and cached[2] == state_key:
            return True
        if state_key is None:
            if applied:
                raise ValueError(f"state_key: missing for story {story} with {applied} committed shots")
            self.banks[story] = (MemoryBank(max_size=max_size, fix=fix), 0, None)
            return False
        bank = MemoryBank.from_bytes(self.store.get_bytes(state_key))
        self.banks[story] = (bank, applied, state_key)
        return True

    def add_references(self, story: str, images: list[np.ndarray], embeddings: np.ndarray) -> None:
        self._bank(story).add_references(images, embeddings)

    def images(self, story: str) -> list[np.ndarray]:
        return self._bank(story).images()

    def tail(self, story: str) -> np.ndarray | None:
        return self._bank(story).tail

    def describe(self, story: str) -> list[dict]:
        return self._bank(story).describe()

    def update(
        self, story, shot, frames, embeddings, quality, cfg: MemoryConfig, tail_frames: int, skip: int = 0
    ) -> list[int]:
        bank = self._bank(story)
        selected = bank.update(shot, frames, embeddings, quality, cfg, tail_frames=tail_frames, skip=skip)
        # Ahead of the manifest until the director commits: `open` then compares with the state key.
        self.banks[story] = (bank, shot + 1, f"uncommitted:{shot}")
        return selected

    def to_bytes(self, story: str) -> bytes:
        return self._bank(story).to_bytes()

    def committed(self, story: str, applied: int, state_key: str) -> None:
        """The director committed shot `applied - 1` with this state: the cache matches the manifest."""
        cached = self.banks.get(story)
        if cached is not None and cached[1] == applied:
            self.banks[story] = (cached[0], applied, state_key)

    def drop(self, story: str) -> None:
        self.banks.pop(story, None)

    def stories(self) -> list[str]:
        return sorted(self.banks)

    def pid(self) -> int:
        return os.getpid()


class BankProxy:
    """What the story runner calls a memory bank, backed by the memory actor.

    Frames go to the actor as an object-store handle; losing the actor raises StoryInterrupted.
    """

    def __init__(self, actor, story: str):
        self.actor = actor
        self.story = story

    def _call(self, method: str, *args):
        try:
            return get(getattr(self.actor, method).remote(self.story, *args))
        except ACTOR_LOST as e:
            raise StoryInterrupted(f"memory actor lost: {type(e).__name__}") from e

    def open(self, applied: int, state_key: str | None, max_size: int, fix: int) -> bool:
        return self._call("open", applied, state_key, max_size, fix)

    def add_references(self, images, embeddings) -> None:
        self._call("add_references", list(images), np.asarray(embeddings))

    def images(self) -> list[np.ndarray]:
        return self._call("images")

    @property
    def tail(self) -> np.ndarray | None:
        return self._call("tail")

    def describe(self) -> list[dict]:
        return self._call("describe")

    def update(self, shot, frames, embeddings, quality, cfg, tail_frames: int, skip: int = 0) -> list[int]:
        data = frames.ref if isinstance(frames, FramesRef) else frames
        return self._call("update", shot, data, embeddings, quality, cfg, tail_frames, skip)

    def to_bytes(self) -> bytes:
        return self._call("to_bytes")

    def committed(self, applied: int, state_key: str) -> None:
        self._call("committed", applied, state_key)

    def drop(self) -> None:
        try:
            self.actor.drop.remote(self.story)
        except ACTOR_LOST:
            pass
