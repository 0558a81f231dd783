"""Scorer actors (CLIP embeddings + aesthetic score) and the round-robin client a director uses.

A shot's frames stay in the object store: each scorer call names the frames' object and a slice of
`batch_size` frames, so the batches of one shot run on several scorers at once without copies.
"""

from __future__ import annotations

import itertools

import numpy as np
import ray

from storymem.config import ScoringConfig

from ._common import FramesRef, get

# Arrays above this size go to the object store once rather than inline with every batch call.
_INLINE_BYTES = 256 * 1024


@ray.remote(max_restarts=-1, max_task_retries=3)
class ScorerActor:
    def __init__(self, cfg: ScoringConfig):
        from storymem.scoring import Scorer

        self.scorer = Scorer(cfg)
        self.frames_scored = 0

    def score(self, frames: np.ndarray, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, aesthetic) of frames[start:stop]."""
        part = np.asarray(frames)[start:stop]
        self.frames_scored += len(part)
        return self.scorer.score_frames(part)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.scorer.embed_texts(texts)

    def stats(self) -> dict:
        return {"frames_scored": self.frames_scored, "batch_size": self.scorer.cfg.batch_size}


class PooledScorer:
    """A FrameScorer over several scorer actors: frames split into batches, sent round-robin."""

    def __init__(self, scorers: list, batch_size: int, start: int = 0):
        if not scorers:
            raise ValueError("scorers: at least one scorer actor is needed")
        self.scorers = list(scorers)
        self.batch_size = batch_size
        self._next = itertools.count(start)

    def score_frames(self, frames) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(frames, FramesRef):
            data, n = frames.ref, frames.count
        else:
            arr = np.asarray(frames)
            n = len(arr)
            data = ray.put(arr) if arr.nbytes > _INLINE_BYTES else arr
        if n == 0:
            raise ValueError("frames: nothing to score")
        calls = []
        for start in range(0, n, self.batch_size):
            scorer = self.scorers[next(self._next) % len(self.scorers)]
            calls.append(scorer.score.remote(data, start, min(start + self.batch_size, n)))
        parts = get(calls)
        embeddings = np.concatenate([p[0] for p in parts])
        quality = np.concatenate([p[1] for p in parts])
        return embeddings, quality
