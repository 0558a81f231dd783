"""Keyframe selection and the memory bank (method.md, 'Keyframe selection and memory bank').

After every shot, a few keyframes (CLIP-distinct, good-quality frames) enter the bank. The bank holds
at most `max_size` frames: the first `fix` ever added (the memory sink, usually the characters'
first appearance or the reference images) plus the most recent ones (a sliding window). It also
keeps the embedding of every frame it was ever given, evicted ones too, so that a new keyframe
too similar to anything the story saved before is skipped (as the authors' selection does).
"""

from __future__ import annotations

import io
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Sequence

import numpy as np

from .config import MemoryConfig

SOURCES = ("keyframe", "reference")
_FORMAT_VERSION = 2  # 2: + the embeddings of every frame ever added (history_*); 1 is still read


def _normalise(x: np.ndarray, field: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{field}: contains NaN or infinite values")
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{field}: contains an all-zero embedding")
    return (x / norms).astype(np.float32)


def _check_image(image: np.ndarray, field: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{field}: expected an (H, W, 3) uint8 image, got shape {shape} dtype {dtype}")


@dataclass
class MemoryFrame:
    """One image in memory with its CLIP embedding and where it came from."""

    image: np.ndarray  # (H, W, 3) uint8, at the resolution it arrived in
    embedding: np.ndarray  # (D,) float32, L2-normalised
    shot: int  # -1 for reference images
    frame: int  # frame index within the shot, or index among the references
    source: str  # "keyframe" | "reference"

    def __post_init__(self) -> None:
        _check_image(self.image, "image")
        emb = np.asarray(self.embedding)
        if emb.ndim != 1 or emb.size == 0:
            raise ValueError(f"embedding: expected a (D,) vector, got shape {emb.shape}")
        # No renormalisation here: it would perturb the last bits and break lossless save/load.
        self.embedding = emb.astype(np.float32, copy=False)
        norm = float(np.linalg.norm(self.embedding))
        if not math.isfinite(norm) or abs(norm - 1.0) > 1e-3:
            raise ValueError(f"embedding: must be L2-normalised (norm {norm:.4f})")
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {SOURCES}, got {self.source!r}")
        self.shot, self.frame = int(self.shot), int(self.frame)


def _greedy_chain(sim: np.ndarray, candidates: np.ndarray, threshold: float) -> list[int]:
    # Sequential by nature: each choice depends on the previously selected frame.
    selected = [int(candidates[0])]
    for i in candidates[1:]:
        if sim[i, selected[-1]] < threshold:
            selected.append(int(i))
    return selected


def select_keyframes(
    embeddings: np.ndarray,
    quality: np.ndarray | None,
    memory_embeddings: np.ndarray | None,
    cfg: MemoryConfig,
) -> list[int]:
    """Indices (sorted) of a shot's frames that should enter memory.

    The first frame passing the quality filter starts the chain; each later passing frame whose cosine
    similarity to the last chosen one is below the threshold joins it. The threshold drops by
    `cfg.threshold_step` until at most `cfg.max_keyframes_per_shot` frames are chosen. Chosen frames
    too similar (> `cfg.dedupe_threshold`) to any of `memory_embeddings` (every frame the story saved,
    evicted ones included) are then dropped. When no frame passes the quality filter, none is chosen.
    `cfg.quality_threshold` 'auto' not resolved against a scorer (see `MemoryConfig`) filters nothing.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings: expected (N, D), got shape {emb.shape}")
    n = emb.shape[0]
    if n == 0:
        return []
    emb = _normalise(emb, "embeddings")

    threshold_q = cfg.quality_threshold if isinstance(cfg.quality_threshold, (int, float)) else None
    if threshold_q is None:
        passing = np.arange(n)
    else:
        if quality is None:
            raise ValueError("quality: required when quality_threshold is set")
        q = np.asarray(quality, dtype=np.float64)
        if q.shape != (n,):
            raise ValueError(f"quality: expected shape ({n},), got {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("quality: contains NaN or infinite values")
        passing = np.flatnonzero(q >= threshold_q)
        if passing.size == 0:
            return []

    sim = emb @ emb.T
    cap = cfg.max_keyframes_per_shot
    # Thresholds are computed from an integer step count, not by repeated subtraction, so float
    # drift cannot skip or repeat a value; cosine is >= -1, so below that nothing more can change.
    max_steps = int(math.ceil((cfg.threshold_start + 1.0) / cfg.threshold_step)) + 1
    selected: list[int] = []
    for k in range(max_steps + 1):
        threshold = round(cfg.threshold_start - k * cfg.threshold_step, 10)
        selected = _greedy_chain(sim, passing, threshold)
        if len(selected) <= cap or threshold <= -1.0:
            break
    selected = selected[:cap]

    if memory_embeddings is not None:
        mem = np.asarray(memory_embeddings)
        if mem.ndim != 2:
            raise ValueError(f"memory_embeddings: expected (K, D), got shape {mem.shape}")
        if mem.shape[0] > 0:
            if mem.shape[1] != emb.shape[1]:
                raise ValueError(
                    f"memory_embeddings: dimension {mem.shape[1]} does not match embeddings {emb.shape[1]}"
                )
            mem = _normalise(mem, "memory_embeddings")
            max_sim = (emb[selected] @ mem.T).max(axis=1)
            selected = [i for i, s in zip(selected, max_sim) if s <= cfg.dedupe_threshold]
    return sorted(selected)


class MemoryBank:
    """Keyframes that condition the next shots: a memory sink plus a sliding window."""

    def __init__(self, max_size: int = 10, fix: int = 3) -> None:
        if not isinstance(max_size, (int, np.integer)) or max_size < 1:
            raise ValueError(f"max_size: must be an integer >= 1, got {max_size!r}")
        if not isinstance(fix, (int, np.integer)) or not 0 <= fix <= max_size:
            raise ValueError(f"fix: must be an integer in [0, max_size={max_size}], got {fix!r}")
        self.max_size = int(max_size)
        self.fix = int(fix)
        self.frames: list[MemoryFrame] = []
        # Last frame(s) of the previous shot, for cut=False successors (MI2V: 1, MM2V: 5).
        self.tail: np.ndarray | None = None
        # Every frame ever added, evicted ones too: (shot, frame) and its embedding (for dedupe).
        self.history: list[tuple[int, int]] = []
        self._history_embeddings: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def dim(self) -> int | None:
        return int(self.frames[0].embedding.shape[0]) if self.frames else None

    def add(self, frames: Sequence[MemoryFrame]) -> None:
        """Append frames; over capacity keep the first `fix` plus the most recent `max_size - fix`."""
        frames = list(frames)
        dim = self.dim
        for f in frames:
            if not isinstance(f, MemoryFrame):
                raise ValueError(f"frames: expected MemoryFrame items, got {type(f).__name__}")
            if dim is None:
                dim = f.embedding.shape[0]
            elif f.embedding.shape[0] != dim:
                raise ValueError(f"frames: embedding dimension {f.embedding.shape[0]} does not match memory's {dim}")
        self.frames.extend(frames)
        self.history.extend((f.shot, f.frame) for f in frames)
        self._history_embeddings.extend(f.embedding for f in frames)
        if len(self.frames) > self.max_size:
            window = self.max_size - self.fix
            recent = self.frames[len(self.frames) - window :] if window > 0 else []
            self.frames = self.frames[: self.fix] + recent

    def add_references(self, images: Sequence[np.ndarray], embeddings: np.ndarray) -> None:
        """Reference images (MR2V) as memory: shot -1, source 'reference'."""
        images = list(images)
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != len(images):
            raise ValueError(f"embeddings: expected ({len(images)}, D), got shape {emb.shape}")
        for j, img in enumerate(images):
            _check_image(img, f"images[{j}]")
        emb = _normalise(emb, "embeddings")
        self.add(
            [
                MemoryFrame(np.ascontiguousarray(img).copy(), emb[j], shot=-1, frame=j, source="reference")
                for j, img in enumerate(images)
            ]
        )

    def update(
        self,
        shot: int,
        frames: np.ndarray,
        embeddings: np.ndarray,
        quality: np.ndarray | None,
        cfg: MemoryConfig,
        tail_frames: int,
        skip: int = 0,
    ) -> list[int]:
        """Select a finished shot's keyframes, add them, keep its tail; return their frame indices.

        Candidates are the frames after the first `skip` (the overlap frames a MI2V/MM2V shot repeats
        from the previous one and the final video drops, or settings.keyframe_skip when larger); indices
        count from the shot's first frame.
        Keyframes are deduplicated against every frame this bank was ever given (`saved_embeddings`)."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"frames: expected (F, H, W, 3) uint8 with F >= 1, got {frames.shape} {frames.dtype}")
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != frames.shape[0]:
            raise ValueError(f"embeddings: expected ({frames.shape[0]}, D), got shape {emb.shape}")
        if not isinstance(tail_frames, (int, np.integer)) or tail_frames < 0:
            raise ValueError(f"tail_frames: must be an integer >= 0, got {tail_frames!r}")
        if not isinstance(skip, (int, np.integer)) or not 0 <= skip < frames.shape[0]:
            raise ValueError(f"skip: must be an integer in [0, {frames.shape[0]}), got {skip!r}")
        emb = _normalise(emb, "embeddings")
        q = None if quality is None else np.asarray(quality)[skip:]
        saved = self.saved_embeddings() if self.history else None
        selected = [i + int(skip) for i in select_keyframes(emb[skip:], q, saved, cfg)]
        self.add(
            [MemoryFrame(frames[i].copy(), emb[i], shot=int(shot), frame=i, source="keyframe") for i in selected]
        )
        self.tail = frames[-tail_frames:].copy() if tail_frames > 0 else None
        return selected

    def images(self) -> list[np.ndarray]:
        return [f.image for f in self.frames]

    def embeddings(self) -> np.ndarray:
        """(K, D) float32; (0, D) when empty (D = 0 if nothing was ever added)."""
        if not self.frames:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([f.embedding for f in self.frames]).astype(np.float32, copy=False)

    def saved_embeddings(self) -> np.ndarray:
        """(K, D) float32: every frame ever added, evicted ones too, in the order they came."""
        if not self._history_embeddings:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(self._history_embeddings).astype(np.float32, copy=False)

    def describe(self) -> list[dict]:
        """What is in memory, without pixels."""
        return [
            {
                "shot": f.shot,
                "frame": f.frame,
                "source": f.source,
                "slot": "sink" if i < self.fix else "window",
                "height": int(f.image.shape[0]),
                "width": int(f.image.shape[1]),
            }
            for i, f in enumerate(self.frames)
        ]

    # -- persistence -----------------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "version": np.array(_FORMAT_VERSION, dtype=np.int64),
            "max_size": np.array(self.max_size, dtype=np.int64),
            "fix": np.array(self.fix, dtype=np.int64),
            "shots": np.array([f.shot for f in self.frames], dtype=np.int64),
            "frame_index": np.array([f.frame for f in self.frames], dtype=np.int64),
            "sources": np.array([f.source for f in self.frames], dtype="<U16"),
            "embeddings": self.embeddings(),
            "history_shots": np.array([s for s, _ in self.history], dtype=np.int64),
            "history_frames": np.array([f for _, f in self.history], dtype=np.int64),
            "history_embeddings": self.saved_embeddings(),
            "has_tail": np.array(self.tail is not None),
            "tail": self.tail if self.tail is not None else np.zeros((0, 0, 0, 3), dtype=np.uint8),
        }
        # One entry per image: references and keyframes may differ in size.
        for i, f in enumerate(self.frames):
            arrays[f"image_{i}"] = f.image
        return arrays

    def save(self, path_or_file: str | os.PathLike | BinaryIO) -> None:
        """Write a lossless compressed npz to a path or a binary file object."""
        if isinstance(path_or_file, (str, os.PathLike)):
            with open(path_or_file, "wb") as fh:
                np.savez_compressed(fh, **self._arrays())
        else:
            np.savez_compressed(path_or_file, **self._arrays())

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.save(buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "MemoryBank":
        return cls.load(data)

    @classmethod
    def load(cls, source: str | os.PathLike | BinaryIO | bytes) -> "MemoryBank":
        """Read what `save` wrote; anything else raises ValueError."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        try:
            with np.load(source, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise ValueError(f"memory state: not a readable memory bank file ({exc})") from exc
        try:
            return cls._from_arrays(arrays)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("memory state"):
                raise
            raise ValueError(f"memory state: {exc}") from exc

    @classmethod
    def _from_arrays(cls, a: dict[str, np.ndarray]) -> "MemoryBank":
        required = ("version", "max_size", "fix", "shots", "frame_index", "sources", "embeddings", "has_tail", "tail")
        missing = [k for k in required if k not in a]
        if missing:
            raise ValueError(f"memory state: missing entries {missing}")
        version = int(a["version"])
        if version not in (1, _FORMAT_VERSION):
            raise ValueError(f"memory state: unsupported version {version}")
        bank = cls(max_size=int(a["max_size"]), fix=int(a["fix"]))
        shots, idx, sources, emb = a["shots"], a["frame_index"], a["sources"], a["embeddings"]
        k = shots.shape[0]
        if idx.shape != (k,) or sources.shape != (k,) or emb.ndim != 2 or emb.shape[0] != k:
            raise ValueError("memory state: metadata and embeddings disagree on the number of frames")
        if emb.dtype != np.float32:
            raise ValueError(f"memory state: embeddings must be float32, got {emb.dtype}")
        if k > bank.max_size:
            raise ValueError(f"memory state: {k} frames exceed max_size {bank.max_size}")
        frames = []
        for i in range(k):
            if f"image_{i}" not in a:
                raise ValueError(f"memory state: missing image_{i}")
            frames.append(MemoryFrame(a[f"image_{i}"], emb[i], int(shots[i]), int(idx[i]), str(sources[i])))
        bank.frames = frames  # already within capacity; add() would re-run eviction needlessly
        if version == 1:  # evicted frames were not kept then: the history starts with what memory holds
            bank.history = [(f.shot, f.frame) for f in frames]
            bank._history_embeddings = [f.embedding for f in frames]
        else:
            hs, hf, he = a.get("history_shots"), a.get("history_frames"), a.get("history_embeddings")
            if hs is None or hf is None or he is None:
                raise ValueError("memory state: missing history entries")
            n = hs.shape[0]
            if hf.shape != (n,) or he.ndim != 2 or he.shape[0] != n or he.dtype != np.float32:
                raise ValueError("memory state: history metadata and embeddings disagree")
            if n and k and he.shape[1] != emb.shape[1]:
                raise ValueError("memory state: history embeddings differ in dimension from memory's")
            bank.history = [(int(x), int(y)) for x, y in zip(hs, hf)]
            bank._history_embeddings = [he[i] for i in range(n)]
        if bool(a["has_tail"]):
            tail = a["tail"]
            if tail.dtype != np.uint8 or tail.ndim != 4 or tail.shape[-1] != 3:
                raise ValueError(f"memory state: tail must be (T, H, W, 3) uint8, got {tail.shape} {tail.dtype}")
            bank.tail = tail
        return bank
