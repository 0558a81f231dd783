"""Training data: the Parquet clip manifest, clip loading, and the clips' VAE latents and text
embeddings computed with the pipeline's own encoders (cached in memory).

A clip manifest has one row per clip, columns
    clip_id (str, unique), group_id (str: clips of one group share a character),
    path (str: .npy (F, H, W, 3) uint8, or a video file decoded with storymem.stitch.read_video;
          relative to the manifest's folder, or an object key when a store is given),
    prompt (str),
and optionally subject_mask (str: .npy (F, H, W) bool or uint8, nonzero where the subject is; relative
    like path; read only when TrainConfig.subject_loss_weight weights the loss toward the subject).
It is not a story manifest (storymem.story.read_manifest: a story's commit point in the store).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

MANIFEST_COLUMNS = ("clip_id", "group_id", "path", "prompt")
SUBJECT_MASK_COLUMN = "subject_mask"


@dataclass(frozen=True)
class ClipRecord:
    clip_id: str
    group_id: str
    path: str
    prompt: str
    subject_mask: str | None = None


def open_clip_store(store: str | None):
    if store is None:
        return None
    from ..storage import open_store  # lazy: S3 support is optional for local training

    return open_store(store)


def read_clip_manifest(manifest: str | Path, store=None) -> list[ClipRecord]:
    """Rows of a clip manifest; raises ValueError naming the column and row of a bad entry."""
    import pyarrow.parquet as pq

    try:
        if store is not None:
            table = pq.read_table(io.BytesIO(store.get_bytes(str(manifest))))
        else:
            table = pq.read_table(str(manifest))
    except (OSError, KeyError) as exc:
        raise ValueError(f"manifest: cannot read {manifest} ({exc})") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"manifest: missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
    columns = MANIFEST_COLUMNS + ((SUBJECT_MASK_COLUMN,) if SUBJECT_MASK_COLUMN in table.column_names else ())
    cols = {c: table.column(c).to_pylist() for c in columns}
    records, seen = [], set()
    for i in range(table.num_rows):
        row = {c: cols[c][i] for c in columns}
        for c, v in row.items():
            if not isinstance(v, str) or (c != "prompt" and not v):
                raise ValueError(f"manifest.{c}[{i}]: expected a non-empty string, got {v!r}")
        if row["clip_id"] in seen:
            raise ValueError(f"manifest.clip_id[{i}]: duplicate clip id {row['clip_id']!r}")
        seen.add(row["clip_id"])
        records.append(ClipRecord(**row))
    if not records:
        raise ValueError(f"manifest: {manifest} has no rows")
    return records


def _locate(record: ClipRecord, column: str, base_dir: Path | None, store) -> bytes | Path:
    """The bytes (from a store) or the local file a manifest column of a clip names."""
    name = getattr(record, column)
    if store is not None:
        return store.get_bytes(name)
    path = Path(name)
    data = path if path.is_absolute() or base_dir is None else base_dir / path
    if not data.exists():
        raise ValueError(f"manifest.{column}: clip {record.clip_id!r} not found at {data}")
    return data


def load_clip(record: ClipRecord, base_dir: Path | None, store=None) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of one clip."""
    data = _locate(record, "path", base_dir, store)
    if record.path.endswith(".npy"):
        frames = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
    else:
        from ..stitch import read_video

        frames = read_video(data)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"manifest.path: clip {record.clip_id!r} is not (F, H, W, 3) uint8 (got {frames.shape} {frames.dtype})")
    return frames


def load_subject_mask(record: ClipRecord, base_dir: Path | None, store=None) -> np.ndarray:
    """(F, H, W) bool subject mask of one clip (manifest column subject_mask)."""
    if record.subject_mask is None:
        raise ValueError(f"manifest.subject_mask: clip {record.clip_id!r} has none (subject_loss_weight needs one per clip)")
    data = _locate(record, "subject_mask", base_dir, store)
    mask = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
    if mask.ndim != 3:
        raise ValueError(f"manifest.subject_mask: clip {record.clip_id!r} is not (F, H, W) (got {mask.shape})")
    return mask != 0


def latent_subject_mask(mask: np.ndarray, num_frames: int, spatial: int, temporal: int) -> torch.Tensor:
    """(f, h, w) float {0, 1} on the latent grid: a latent cell is subject when any pixel it encodes is
    (the causal VAE: latent frame 0 is pixel frame 0, latent frame j >= 1 pixel frames t(j-1)+1 .. tj)."""
    m = torch.from_numpy(np.ascontiguousarray(mask[:num_frames])).float()
    groups = [m[:1]] + [m[1 + temporal * j : 1 + temporal * (j + 1)] for j in range((num_frames - 1) // temporal)]
    per_frame = torch.stack([g.amax(0) for g in groups])  # (f, H, W)
    return torch.nn.functional.max_pool2d(per_frame[:, None], spatial)[:, 0]


class ClipLatents:
    """VAE latents and text embeddings of clips, computed with the pipeline's own encoders."""

    def __init__(self, pipe, records: list[ClipRecord], base_dir, store, height, width, num_frames, candidates, cache):
        self.pipe, self.records, self.base_dir, self.store = pipe, records, base_dir, store
        self.height, self.width, self.num_frames = height, width, num_frames
        self.candidates, self.cache = candidates, cache
        self._shot: dict[int, torch.Tensor] = {}
        self._memory: dict[int, torch.Tensor] = {}
        self._motion: dict[int, torch.Tensor] = {}
        self._text: dict[str, torch.Tensor] = {}
        self._subject: dict[int, torch.Tensor] = {}
        self._zeros_u: torch.Tensor | None = None

    def candidate_frames(self, n: int) -> list[int]:
        k = min(self.candidates, n)
        return sorted({int(round(i * (n - 1) / max(k - 1, 1))) for i in range(k)})

    def _frames(self, i: int) -> np.ndarray:
        frames = load_clip(self.records[i], self.base_dir, self.store)
        if frames.shape[0] < self.num_frames:
            raise ValueError(
                f"manifest.path: clip {self.records[i].clip_id!r} has {frames.shape[0]} frames, training needs {self.num_frames}"
            )
        return frames[: self.num_frames]

    def _fill(self, ids: Sequence[int], need_motion: Sequence[int]) -> tuple[dict, dict, dict]:
        from ..pipeline import to_video_tensor

        shot, mem, motion = {}, {}, {}
        for i in dict.fromkeys(ids):
            if i in self._shot:
                shot[i], mem[i] = self._shot[i], self._memory[i]
                continue
            frames = self._frames(i)
            video = to_video_tensor(frames, self.height, self.width).unsqueeze(0)
            shot[i] = self.pipe.vae_encode(video)[0].cpu()
            picks = [frames[j] for j in self.candidate_frames(len(frames))]
            mem[i] = self.pipe.encode_memory(picks, self.height, self.width)[0].cpu()  # (z, K, h, w)
            if self.cache:
                self._shot[i], self._memory[i] = shot[i], mem[i]
        for i in dict.fromkeys(need_motion):
            if i not in self._motion:
                u = self.pipe.encode_condition_video(self._frames(i)[:1], self.num_frames, self.height, self.width)[0].cpu()
                if not self.cache:
                    motion[i] = u
                    continue
                self._motion[i] = u
            motion[i] = self._motion[i]
        return shot, mem, motion

    @torch.no_grad()
    def precompute(self, ids: Sequence[int], batch_size: int = 16, motion: bool = False) -> None:
        """Encode many clips in VAE batches up front (lazy filling encodes one clip at a time);
        with `motion`, also their MI2V condition u."""
        from ..pipeline import to_video_tensor

        if not self.cache:
            return
        todo = [i for i in dict.fromkeys(ids) if i not in self._shot or (motion and i not in self._motion)]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            frames = [self._frames(i) for i in chunk]
            video = torch.stack([to_video_tensor(f, self.height, self.width) for f in frames])
            shot = self.pipe.vae_encode(video).cpu()
            cand = self.candidate_frames(self.num_frames)
            mem = self.pipe.encode_memory([f[j] for f in frames for j in cand], self.height, self.width)[0].cpu()
            if motion:
                # The batched form of pipe.encode_condition_video(first frame, F, H, W): [frame 0, zeros...].
                cond = torch.zeros_like(video)
                cond[:, :, :1] = video[:, :, :1]
                u = self.pipe.vae_encode(cond).cpu()
            for k, i in enumerate(chunk):
                self._shot[i] = shot[k]
                self._memory[i] = mem[:, k * len(cand) : (k + 1) * len(cand)].contiguous()
                if motion:
                    self._motion[i] = u[k]

    def latents(self, ids: Sequence[int], memory_ids: Sequence[int], motion_ids: Sequence[int]):
        """({clip: (z, f, h, w)}, {clip: (z, K, h, w) memory candidates}, {clip: u for MI2V})."""
        shot, mem, motion = self._fill(list(ids) + list(memory_ids), motion_ids)
        return shot, mem, motion

    def subject_masks(self, ids: Sequence[int]) -> dict[int, torch.Tensor]:
        """{clip: (f, h, w) latent-grid subject mask} (manifest column subject_mask; cached)."""
        out = {}
        for i in dict.fromkeys(ids):
            if i in self._subject:
                out[i] = self._subject[i]
                continue
            mask = load_subject_mask(self.records[i], self.base_dir, self.store)
            if mask.shape[0] < self.num_frames or mask.shape[1:] != (self.height, self.width):
                raise ValueError(
                    f"manifest.subject_mask: clip {self.records[i].clip_id!r} is {mask.shape}, training needs "
                    f"({self.num_frames}+, {self.height}, {self.width})"
                )
            out[i] = latent_subject_mask(
                mask, self.num_frames, self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
            )
            if self.cache:
                self._subject[i] = out[i]
        return out

    def zeros_condition(self) -> torch.Tensor:
        if self._zeros_u is None:
            self._zeros_u = self.pipe.encode_condition_video(None, self.num_frames, self.height, self.width)[0].cpu()
        return self._zeros_u

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if todo:
            emb = self.pipe.encode_prompt(todo).float().cpu()
            fresh = dict(zip(todo, emb))
            if self.cache:
                self._text.update(fresh)
            lookup = {**self._text, **fresh}
        else:
            lookup = self._text
        return torch.stack([lookup[p] for p in prompts])
