"""M2V training: memory-conditioned flow matching on a Wan image-to-video transformer.

The authors did not release their training code; this follows the paper's description (method.md,
'Training'): single-shot clips, each with 1..N memory frames drawn from *other* clips of the same
group (story / character), the mask and negative RoPE positions exactly as at inference, and the
flow-matching loss on the shot's latent frames only. Conditioning goes through the same code as
inference: `StoryMemPipeline.encode_memory / encode_condition_video / encode_prompt / vae_encode`
and `m2v.build_mask / build_condition / memory_frames`.

Data: a Parquet manifest, one row per clip, columns
    clip_id (str, unique), group_id (str: clips of one group share a character),
    path (str: .npy (F, H, W, 3) uint8, or a video file decoded with storymem.stitch.read_video;
          relative to the manifest's folder, or an object key when a store is given),
    prompt (str).
Clips are resized (bicubic) to the training size and cut to its first `num_frames` frames.

Modes: a LoRA per expert (rank/alpha/rsLoRA/dropout/targets as method.md gives them) with timesteps
drawn from each expert's range (high noise: sigma >= boundary), or full fine-tuning (`full`), which
the tiny from-scratch models of the synthetic world need. Options beyond the paper's recipe, off by
default: MI2V samples (`motion_prob`, conditioned on their own first frame) and a loss on the memory
frames (`memory_loss_weight`); a from-scratch model needs both to learn what a pretrained I2V base
already does (see scripts/train_embedded.py). Data parallel with torch DDP (gloo on CPU,
nccl on GPU); every random choice is a function of (seed, step, global sample index), so a run on W
processes with batch B computes the same global batch as one process with batch W * B.

Outputs (`output_dir/checkpoints/step-NNNNNNN/`, and `output_dir/final/`):
    lora_high_noise.safetensors / lora_low_noise.safetensors (or lora.safetensors for one transformer):
        diffusers-named LoRA weights that `storymem.lora.load_m2v_lora` loads (the training scale is
        folded into lora_B, so the loader's default alpha = rank reproduces the trained model);
    embedded.safetensors (full mode, embedded models): a bundle for ModelConfig.embedded_weights;
    transformer.safetensors / transformer_2.safetensors (full mode, local models);
    model_config.json: the ModelConfig fields that select these weights;
    trainer_state.pt: step, optimizer, LR scheduler, RNG and the exact trainable tensors (resume).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from .config import ModelConfig
from .lora import M2V_TARGET_SUFFIXES
from .m2v import ShotMode, build_condition, build_mask, memory_frames
from .script import MemoryMask

log = logging.getLogger(__name__)

ADAPTER = "m2v"
EXPERT_FILES = {"high": "lora_high_noise.safetensors", "low": "lora_low_noise.safetensors"}
SINGLE_FILE = "lora.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_COLUMNS = ("clip_id", "group_id", "path", "prompt")


class TrainConfig(BaseModel):
    """Everything one training run needs. Paths may be relative to the working directory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    manifest: str = Field(description="Parquet manifest of clips: a local file, or an object key in `store`.")
    store: str | None = Field(
        None, description="Where clips (and the manifest) live: 's3://bucket' or a folder. None: local paths."
    )
    output_dir: Path = Field(description="Checkpoints, logs and the final weights go here.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model (embedded tiny or local Wan).")

    full: bool = Field(False, description="Train every transformer weight instead of a LoRA (tiny models).")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'random': re-initialise the transformers from their config (with full=True)."
    )
    experts: Literal["both", "high", "low"] = Field(
        "both", description="Which expert(s) to train; 'both' splits each batch between them by share."
    )
    high_noise_share: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction of samples for the high-noise expert.")
    boundary: float | None = Field(
        None, ge=0.0, le=1.0, description="Expert switch on sigma (timestep / 1000). None: the model config's."
    )

    lora_rank: int = Field(128, ge=1, le=4096, description="LoRA rank r.")
    lora_alpha: float = Field(128.0, gt=0, description="LoRA alpha; scale alpha / sqrt(r) with rsLoRA.")
    use_rslora: bool = Field(True, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_targets: list[str] = Field(
        default_factory=lambda: list(M2V_TARGET_SUFFIXES),
        description="diffusers module-name suffixes that get a LoRA (self/cross attention q/k/v/o, FFN).",
    )

    height: int | None = Field(None, ge=16, description="Training frame height; None: the model profile's default.")
    width: int | None = Field(None, ge=16, description="Training frame width; None: the model profile's default.")
    num_frames: int | None = Field(None, ge=1, description="Frames per clip (4n+1); None: the profile's default.")

    min_memory: int = Field(1, ge=1, description="Fewest memory frames of a conditioned sample.")
    max_memory: int = Field(10, ge=1, le=64, description="Most memory frames of a sample.")
    memory_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of steps trained without memory (keeps shot 1 / T2V in distribution)."
    )
    memory_candidates: int = Field(
        3, ge=1, le=256, description="Frames of a clip that may serve as memory (evenly spaced, first and last included)."
    )
    fix: int = Field(
        3, ge=0, description="Memory sink size; with memory_mask 'sink_window' the first `fix` memory frames get 1, later ones 2."
    )
    memory_mask: MemoryMask = Field(
        MemoryMask.ONES, description="Mask value of memory frames, as at inference (GenerationSettings.memory_mask)."
    )
    motion_prob: float = Field(0.0, ge=0.0, le=1.0, description="Share of samples conditioned on their first frame (MI2V).")
    text_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of samples whose prompt is replaced by a negative prompt (for CFG)."
    )
    uncond_prompts: list[str] | None = Field(
        None, description="Prompts used by text dropout; None: the pipeline's and the scripts' default negatives."
    )
    timestep_shift: float = Field(1.0, gt=0.0, description="1: sigma uniform; s > 1 shifts samples to high noise.")
    memory_loss_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the loss on the memory latent frames. 0 (the paper): shot frames only, the base "
        "I2V model already denoises conditioned frames. A model trained from scratch needs it (> 0) to learn "
        "that, since sampling also integrates its velocity on the memory frames.",
    )

    batch_size: int = Field(4, ge=1, description="Clips per process per step.")
    steps: int = Field(1000, ge=1, description="Optimizer steps in total (resume continues to this number).")
    lr: float = Field(1e-5, gt=0.0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine decay floor as a fraction of lr.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["cosine", "constant"] = Field("constant", description="LR schedule after warm-up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm; None: no clipping.")
    gradient_checkpointing: bool = Field(False, description="Recompute transformer blocks in backward (large models).")
    seed: int = Field(0, ge=0, description="Every random choice derives from (seed, step, sample index).")
    cache_latents: bool = Field(True, description="Keep VAE latents and text embeddings of seen clips in memory.")
    save_every: int = Field(500, ge=1, description="Checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    log_every: int = Field(10, ge=1, description="Log the loss every this many steps.")
    resume: bool = Field(True, description="Continue from the latest checkpoint in output_dir when there is one.")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_memory > self.max_memory:
            raise ValueError(f"min_memory: {self.min_memory} exceeds max_memory {self.max_memory}")
        if self.init == "random" and not self.full:
            raise ValueError("init: 'random' needs full=True (a LoRA on a random model learns nothing useful)")
        if self.num_frames is not None and (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames: must be 4n+1, got {self.num_frames}")
        if not self.lora_targets:
            raise ValueError("lora_targets: at least one module suffix is required")
        return self


# ------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class ClipRecord:
    clip_id: str
    group_id: str
    path: str
    prompt: str


def _open_store(store: str | None):
    if store is None:
        return None
    from .storage import open_store  # lazy: S3 support is optional for local training

    return open_store(store)


def read_manifest(manifest: str | Path, store=None) -> list[ClipRecord]:
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
    cols = {c: table.column(c).to_pylist() for c in MANIFEST_COLUMNS}
    records, seen = [], set()
    for i in range(table.num_rows):
        row = {c: cols[c][i] for c in MANIFEST_COLUMNS}
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


def load_clip(record: ClipRecord, base_dir: Path | None, store=None) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of one clip."""
    if store is not None:
        data: bytes | Path = store.get_bytes(record.path)
    else:
        path = Path(record.path)
        data = path if path.is_absolute() or base_dir is None else base_dir / path
        if not data.exists():
            raise ValueError(f"manifest.path: clip {record.clip_id!r} not found at {data}")
    if record.path.endswith(".npy"):
        frames = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
    else:
        from .stitch import read_video

        frames = read_video(data)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"manifest.path: clip {record.clip_id!r} is not (F, H, W, 3) uint8 (got {frames.shape} {frames.dtype})")
    return frames


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
        from .pipeline import to_video_tensor

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
        from .pipeline import to_video_tensor

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


# ------------------------------------------------------------------------------------------------
# model


def fresh_copy(module: nn.Module, seed: int) -> nn.Module:
    """A newly initialised module of the same diffusers config (training from scratch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return type(module).from_config(module.config)


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class M2VLoss(nn.Module):
    """Holds the expert(s) being trained; forward(batch) -> the summed per-sample flow-matching loss
    divided by the local batch size. One module, so that DDP wraps every expert at once."""

    def __init__(self, experts: dict[str, nn.Module], memory_loss_weight: float = 0.0):
        super().__init__()
        self.experts = nn.ModuleDict(experts)
        self.memory_loss_weight = memory_loss_weight

    def forward(self, parts: dict[str, dict], batch_size: int) -> torch.Tensor:
        total = None
        for name, part in parts.items():
            model = self.experts[name]
            sigma = part["sigma"].view(-1, 1, 1, 1, 1)
            clean = part["clean"]  # (b, z, M + f, h, w): [memory latents | shot latents]
            noisy = (1.0 - sigma) * clean + sigma * part["noise"]
            x = torch.cat([noisy, part["condition"]], dim=1).to(model.dtype)
            m = part["num_memory"]
            with memory_frames(model, m):
                pred = model(
                    hidden_states=x,
                    timestep=part["sigma"] * 1000.0,
                    encoder_hidden_states=part["text"].to(model.dtype),
                    return_dict=False,
                )[0]
            # Velocity target on the shot's latent frames; the memory part only with memory_loss_weight.
            err = (pred.float() - (part["noise"] - clean)).pow(2)
            per_sample = err[:, :, m:].flatten(1).mean(1)
            if m and self.memory_loss_weight:
                per_sample = per_sample + self.memory_loss_weight * err[:, :, :m].flatten(1).mean(1)
            total = per_sample.sum() if total is None else total + per_sample.sum()
        return total / batch_size


# ------------------------------------------------------------------------------------------------
# trainer


def _dist_env(rank, world_size):
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is outside world_size {world_size}")
    return rank, world_size


class Trainer:
    """One process of a (possibly distributed) M2V training run."""

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int | None = None,
        world_size: int | None = None,
        init_method: str | None = None,
        store=None,
    ):
        """rank/world_size: default from the RANK/WORLD_SIZE environment (torchrun); store: an
        ArtifactStore holding manifest and clips, instead of `cfg.store`."""
        from . import models
        from .pipeline import StoryMemPipeline
        from .script import WAN_DEFAULT_NEGATIVE_PROMPT

        self.cfg = cfg
        self.rank, self.world_size = _dist_env(rank, world_size)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        device = models.resolve_device(cfg.model)
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count())))
            torch.cuda.set_device(device)
        self.device = device
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=init_method or "env://", rank=self.rank, world_size=self.world_size)
        self.dtype = models.resolve_dtype(cfg.model, device)

        if cfg.model.embedded:
            components, profile = models.build_embedded(cfg.model)
        else:
            components, profile = models.load_local(cfg.model, self.dtype)
        self.embedded = cfg.model.embedded
        if cfg.init == "random":
            for k, name in enumerate(("transformer", "transformer_2")):
                if components.get(name) is not None:
                    components[name] = fresh_copy(components[name], cfg.seed + k)
        self.components = components
        self.profile = profile
        self.pipe = StoryMemPipeline(
            **components,
            boundary_ratio=profile.boundary,
            rope_shift=cfg.model.rope_shift,
            max_sequence_length=profile.max_sequence_length,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.text_encoder.to(device).requires_grad_(False)
        self.pipe.vae.to(device).requires_grad_(False)

        d = profile.defaults
        self.height = cfg.height or d.get("height", 480)
        self.width = cfg.width or d.get("width", 832)
        self.num_frames = cfg.num_frames or d.get("num_frames", 81)
        if (self.num_frames - 1) % self.pipe.vae_scale_factor_temporal:
            raise ValueError(f"num_frames: must be 4n+1, got {self.num_frames}")
        multiple = self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size[1]
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height/width: must be multiples of {multiple}, got {self.height}x{self.width}")

        self.experts = self._select_experts()
        self.boundary = cfg.boundary if cfg.boundary is not None else (profile.boundary or cfg.model.boundary)
        # Seeded: LoRA initialisation and dropout draw from torch's global generator.
        torch.manual_seed(cfg.seed)
        for model in self.experts.values():
            model.to(device)
            if cfg.full:
                model.requires_grad_(True)
            else:
                self._add_lora(model)
            if cfg.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            model.train()
        self.loss_module = M2VLoss(self.experts, cfg.memory_loss_weight)
        self.params = [p for p in self.loss_module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("lora_targets: no trainable parameters (no module matched)")
        self.model = self.loss_module
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(
                self.loss_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=len(self.experts) > 1,
            )
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        self.store = store if store is not None else _open_store(cfg.store)
        self.records = read_manifest(cfg.manifest, self.store)
        base_dir = None if self.store is not None else Path(cfg.manifest).resolve().parent
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            groups.setdefault(r.group_id, []).append(i)
        singles = [g for g, ids in groups.items() if len(ids) < 2]
        if singles:
            log.warning("manifest: %d group(s) with a single clip are skipped (no memory source), e.g. %s", len(singles), singles[:3])
        self.groups = {g: ids for g, ids in groups.items() if len(ids) >= 2}
        if not self.groups:
            raise ValueError("manifest.group_id: no group has two or more clips; memory frames come from other clips of a group")
        self.eligible = [i for ids in self.groups.values() for i in ids]
        self.data = ClipLatents(
            self.pipe, self.records, base_dir, self.store, self.height, self.width, self.num_frames,
            cfg.memory_candidates, cfg.cache_latents,
        )
        self.uncond = cfg.uncond_prompts or [WAN_DEFAULT_NEGATIVE_PROMPT, ""]
        self.step = 0
        self.history: list[dict] = []
        if cfg.resume:
            latest = self.latest_checkpoint(cfg.output_dir)
            if latest is not None:
                self.load_state(latest)

    # -- setup --------------------------------------------------------------------------------

    def _select_experts(self) -> dict[str, nn.Module]:
        high, low = self.pipe.transformer, self.pipe.transformer_2
        if low is None:
            if self.cfg.experts == "low":
                raise ValueError("experts: 'low' needs a model with two experts (transformer_2)")
            return {"high": high}
        return {"both": {"high": high, "low": low}, "high": {"high": high}, "low": {"low": low}}[self.cfg.experts]

    def _add_lora(self, model: nn.Module) -> None:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=self.cfg.lora_rank,
                lora_alpha=self.cfg.lora_alpha,
                use_rslora=self.cfg.use_rslora,
                lora_dropout=self.cfg.lora_dropout,
                target_modules=list(self.cfg.lora_targets),
                init_lora_weights=True,
            ),
            adapter_name=ADAPTER,
        )
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()  # adapters train in float32 even on a bf16 base

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(cfg.steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def sigma_range(self, expert: str) -> tuple[float, float]:
        if len(self.experts) == 1 and self.pipe.transformer_2 is None:
            return 0.0, 1.0
        return (self.boundary, 1.0) if expert == "high" else (0.0, self.boundary)

    def _expert_of(self, g: int) -> str:
        names = list(self.experts)
        if len(names) == 1:
            return names[0]
        p = self.cfg.high_noise_share  # evenly spread: sample g is high-noise when floor((g+1)p) steps up
        return "high" if math.floor((g + 1) * p) > math.floor(g * p) else "low"

    def _sigma(self, rng: np.random.Generator, expert: str) -> float:
        lo, hi = self.sigma_range(expert)
        s = self.cfg.timestep_shift
        to_u = lambda sig: sig / (s - (s - 1.0) * sig)  # inverse of the flow shift
        u = rng.uniform(to_u(lo), to_u(hi))
        return float(s * u / (1.0 + (s - 1.0) * u))

    # -- batches ------------------------------------------------------------------------------

    def sample_plan(self, step: int) -> tuple[int, list[dict]]:
        """(M, per-sample choices) of this process's share of the global batch of `step`."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        global_batch = cfg.batch_size * self.world_size
        clips = rng.choice(self.eligible, size=global_batch, replace=global_batch > len(self.eligible))
        m = 0 if rng.random() < cfg.memory_dropout else int(rng.integers(cfg.min_memory, cfg.max_memory + 1))
        plan = []
        for g in range(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size):
            srng = np.random.default_rng([cfg.seed, step, g, 1])
            clip = int(clips[g])
            group = self.groups[self.records[clip].group_id]
            pool = [(c, j) for c in group if c != clip for j in range(cfg.memory_candidates)]
            picks = [pool[k] for k in srng.choice(len(pool), size=m, replace=m > len(pool))] if m else []
            expert = self._expert_of(g)
            plan.append(
                dict(
                    clip=clip,
                    memory=picks,
                    expert=expert,
                    sigma=self._sigma(srng, expert),
                    uncond=int(srng.integers(len(self.uncond))) if srng.random() < cfg.text_dropout else None,
                    motion=bool(srng.random() < cfg.motion_prob),
                    noise_seed=int(srng.integers(2**62)),
                )
            )
        return m, plan

    def build_batch(self, step: int) -> dict[str, dict]:
        m, plan = self.sample_plan(step)
        shot, mem, motion = self.data.latents(
            [p["clip"] for p in plan], [c for p in plan for c, _ in p["memory"]], [p["clip"] for p in plan if p["motion"]]
        )
        prompts = [self.uncond[p["uncond"]] if p["uncond"] is not None else self.records[p["clip"]].prompt for p in plan]
        text = self.data.text(prompts)
        z, f, h, w = next(iter(shot.values())).shape
        parts: dict[str, dict] = {}
        for k, p in enumerate(plan):
            mode = ShotMode.MI2V if p["motion"] else ShotMode.M2V
            n_cand = mem[p["clip"]].shape[1]
            memory = torch.stack([mem[c][:, min(j, n_cand - 1)] for c, j in p["memory"]], dim=1) if m else None
            u = motion[p["clip"]] if p["motion"] else self.data.zeros_condition()
            mask = build_mask(
                m, self.num_frames, h, w, mode, fix=self.cfg.fix,
                temporal_scale=self.pipe.vae_scale_factor_temporal, memory_mask=self.cfg.memory_mask,
            )  # fmt: skip
            cond = build_condition(None if memory is None else memory[None], u[None], mask)
            clean = shot[p["clip"]][None] if memory is None else torch.cat([memory[None], shot[p["clip"]][None]], dim=2)
            noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(p["noise_seed"]))
            part = parts.setdefault(p["expert"], {"clean": [], "noise": [], "condition": [], "sigma": [], "text": []})
            part["clean"].append(clean)
            part["noise"].append(noise)
            part["condition"].append(cond)
            part["sigma"].append(p["sigma"])
            part["text"].append(text[k : k + 1])
        dev = self.device
        out = {}
        for name in self.experts:  # fixed order: every process runs the experts in the same order
            if name not in parts:
                continue
            part = parts[name]
            out[name] = dict(
                clean=torch.cat(part["clean"]).to(dev),
                noise=torch.cat(part["noise"]).to(dev),
                condition=torch.cat(part["condition"]).to(dev),
                sigma=torch.tensor(part["sigma"], dtype=torch.float32, device=dev),
                text=torch.cat(part["text"]).to(dev),
                num_memory=m,
            )
        return out

    # -- steps --------------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return torch.autocast("cpu", enabled=False)

    def forward_backward(self, step: int | None = None) -> float:
        """Loss and gradients of one step's batch (gradients averaged over processes)."""
        step = self.step if step is None else step
        batch = self.build_batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.model(batch, self.cfg.batch_size)
        loss.backward()
        value = loss.detach()
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    @torch.no_grad()
    def eval_loss(self, steps: Sequence[int]) -> float:
        """Mean loss over the batches of the given steps, without training (dropout off)."""
        self.loss_module.eval()
        try:
            with self._autocast():
                values = [float(self.loss_module(self.build_batch(s), self.cfg.batch_size)) for s in steps]
        finally:
            self.loss_module.train()
        return float(np.mean(values))

    def train_step(self) -> float:
        loss = self.forward_backward(self.step)
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss

    def train(self) -> dict:
        """Run to `cfg.steps`, checkpointing every `save_every` steps; returns a summary."""
        cfg = self.cfg
        t0, losses = time.perf_counter(), []
        start = self.step
        while self.step < cfg.steps:
            losses.append(self.train_step())
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                entry = {
                    "step": self.step,
                    "loss": float(np.mean(losses[-cfg.log_every :])),
                    "lr": self.scheduler.get_last_lr()[0],
                    "elapsed_s": round(time.perf_counter() - t0, 2),
                }
                self.history.append(entry)
                if self.rank == 0:
                    log.info("step %(step)d loss %(loss).4f lr %(lr).2e", entry)
                    cfg.output_dir.mkdir(parents=True, exist_ok=True)
                    with open(cfg.output_dir / "log.jsonl", "a") as fh:
                        fh.write(json.dumps(entry) + "\n")
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        final = self.save_outputs(cfg.output_dir / "final") if self.rank == 0 else None
        self._barrier()
        return {
            "steps": self.step - start,
            "final_step": self.step,
            "seconds": time.perf_counter() - t0,
            "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-cfg.log_every :])) if losses else None,
            "outputs": final,
        }

    # -- checkpoints --------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.loss_module.named_parameters() if p.requires_grad}

    def lora_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per expert: diffusers-named LoRA weights with the training scale folded into lora_B, so that
        load_m2v_lora's default (alpha = rank, rsLoRA) reproduces the trained model."""
        from peft.utils import get_peft_model_state_dict

        fold = lora_scale(self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.use_rslora) / lora_scale(
            self.cfg.lora_rank, self.cfg.lora_rank, True
        )
        out = {}
        for name, model in self.experts.items():
            sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
            out[name] = {
                k: (v.float() * fold if ".lora_B." in k else v.float()).detach().cpu().contiguous() for k, v in sd.items()
            }
        return out

    def save_outputs(self, folder: Path) -> dict:
        """The inference weights and a model_config.json naming them; returns that mapping."""
        from safetensors.torch import save_file

        from . import models

        folder.mkdir(parents=True, exist_ok=True)
        selected: dict[str, str] = {}
        if not self.cfg.full:
            meta = {
                "format": "storymem-m2v-lora-v1",
                "rank": str(self.cfg.lora_rank),
                "alpha": str(self.cfg.lora_rank),
                "use_rslora": "true",
                "trained_alpha": str(self.cfg.lora_alpha),
                "trained_use_rslora": str(self.cfg.use_rslora).lower(),
            }
            single = self.pipe.transformer_2 is None
            for name, sd in self.lora_state_dicts().items():
                path = folder / (SINGLE_FILE if single else EXPERT_FILES[name])
                save_file(sd, str(path), metadata={**meta, "expert": name})
                selected["lora_low_noise" if single or name == "low" else "lora_high_noise"] = str(path.resolve())
        elif self.embedded:
            path = folder / "embedded.safetensors"
            models.save_bundle(self.components, path)
            selected["embedded_weights"] = str(path.resolve())
        else:
            for name, model in self.experts.items():
                key = "transformer" if name == "high" else "transformer_2"
                sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(sd, str(folder / f"{key}.safetensors"))
                selected[key] = str((folder / f"{key}.safetensors").resolve())
        (folder / "model_config.json").write_text(json.dumps(selected, indent=2))
        return selected

    @staticmethod
    def latest_checkpoint(output_dir: Path) -> Path | None:
        folder = Path(output_dir) / "checkpoints"
        found = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).exists()) if folder.exists() else []
        return found[-1] if found else None

    def save_checkpoint(self) -> Path:
        folder = self.cfg.output_dir / "checkpoints" / f"step-{self.step:07d}"
        if self.rank == 0:
            tmp = folder.with_name(folder.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            self.save_outputs(tmp)
            state = {
                "step": self.step,
                "trainable": self.trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "world_size": self.world_size,
                "config": self.cfg.model_dump(mode="json"),
            }
            torch.save(state, tmp / STATE_FILE)
            import shutil

            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)  # a checkpoint appears whole or not at all
            for old in sorted(p for p in folder.parent.glob("step-*") if not p.name.endswith(".tmp"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return folder

    def load_state(self, folder: Path) -> None:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        params = dict(self.loss_module.named_parameters())
        missing = [n for n in state["trainable"] if n not in params]
        if missing:
            raise ValueError(f"resume: checkpoint {folder} does not fit this model (e.g. {missing[:3]})")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", folder, self.step)


def train(cfg: TrainConfig, rank: int | None = None, world_size: int | None = None, init_method: str | None = None) -> dict:
    """Build a Trainer and run it to the end; returns the summary."""
    return Trainer(cfg, rank, world_size, init_method).train()


# ------------------------------------------------------------------------------------------------
# VAE of the embedded models


def reinit_autoencoder(vae: nn.Module, seed: int) -> nn.Module:
    """Kaiming-normal convolutions with zero biases, residual branches and attention outputs zeroed,
    before training a tiny VAE from scratch.

    With PyTorch's default init the thin Wan decoder's output is dominated by its biases and hardly
    depends on the latent (decoding z or -z differs by ~0.015), and training stalls at predicting
    the mean colour. Fan-in scaled weights keep the signal alive, and blocks that start as identity
    (their last conv zeroed) make the stack start as a short chain of convolutions."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, m in vae.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                last = name.endswith(".conv2") or name.endswith("attentions.0.proj")
                if last:
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return vae


def train_vae(vae, sample_batch, steps: int, lr: float = 2e-3, latent_noise: float = 0.1, latent_l2: float = 1e-3, log_every: int = 50) -> list[float]:
    """Reconstruction training of a (tiny) AutoencoderKLWan. `sample_batch(step)` returns videos
    (B, 3, F, H, W) in [-1, 1]. The pipeline encodes with the posterior mode, so the autoencoder is
    trained on the mode (a freshly initialised posterior's unit variance would drown the signal),
    with a little relative noise on the latents so that the decoder tolerates imperfect generations
    and a small L2 term that keeps the latent scale bounded (normalise_vae_latents rescales after)."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for step in range(steps):
        x = sample_batch(step)
        mu = vae.encode(x).latent_dist.mode()
        scale = mu.detach().flatten(2).std(dim=2, keepdim=True).unsqueeze(-1).unsqueeze(-1)  # (B, z, 1, 1, 1)
        y = vae.decode(mu + latent_noise * scale * torch.randn_like(mu)).sample
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + latent_l2 * mu.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log.info("vae step %d loss %.4f", step + 1, float(np.mean(losses[-log_every:])))
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def normalise_vae_latents(vae, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel latent statistics into the VAE so that the pipeline's normalisation with the
    config's `latents_mean` / `latents_std` gives zero-mean, unit-std latents on `videos`.

    The encoder's mean output is scaled affinely (quant_conv) and the decoder's input conv
    (post_quant_conv) undoes it, so decode(encode(x)) is unchanged. Returns the measured (mean, std)."""
    z = vae.config.z_dim
    mu = vae.encode(videos).latent_dist.mode().float()
    m_emp = mu.transpose(0, 1).reshape(z, -1).mean(1)
    s_emp = mu.transpose(0, 1).reshape(z, -1).std(1).clamp_min(1e-6)
    mean_d = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=mu.device)
    std_d = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=mu.device)
    a = std_d / s_emp
    b = mean_d - a * m_emp
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:z] *= a.view(z, 1, 1, 1, 1).to(q.weight.dtype)
    q.bias[:z] = (a * q.bias[:z].float() + b).to(q.bias.dtype)
    q.bias[z:] += (2.0 * torch.log(a)).to(q.bias.dtype)  # the posterior's std scales with its mean
    w = pq.weight.float()  # (z_out, z_in, 1, 1, 1): input channel i now carries a_i * z_i + b_i
    new_w = w / a.view(1, z, 1, 1, 1)
    pq.bias.copy_((pq.bias.float() - (new_w.flatten(1) * b.view(1, z)).sum(1)).to(pq.bias.dtype))
    pq.weight.copy_(new_w.to(pq.weight.dtype))
    return m_emp, s_emp


# ------------------------------------------------------------------------------------------------
# CLI


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train the M2V LoRA (or the whole tiny model) on a clip manifest",
        description="M2V training. Settings come from --config (YAML/JSON of TrainConfig fields) and the flags "
        "below, flags winning. Multi-process: launch with torchrun (gloo on CPU, nccl on GPU).",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML or JSON file of TrainConfig fields")
    p.add_argument("--manifest", default=None, help="Parquet manifest (clip_id, group_id, path, prompt)")
    p.add_argument("--store", default=None, help="'s3://bucket' or a folder holding manifest and clips")
    p.add_argument("--output-dir", type=Path, default=None, help="checkpoints and final weights")
    p.add_argument("--full", action="store_true", default=None, help="full fine-tuning instead of a LoRA")
    p.add_argument("--init", choices=["pretrained", "random"], default=None, help="'random': from scratch (with --full)")
    p.add_argument("--experts", choices=["both", "high", "low"], default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="clips per process per step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--schedule", choices=["cosine", "constant"], default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--max-memory", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None, help="start over even if checkpoints exist")
    p.add_argument("--embedded-weights", type=Path, default=None, help="bundle of the embedded base model")
    p.add_argument("--i2v-path", type=Path, default=None, help="local diffusers Wan I2V folder (the base model)")
    p.add_argument("--device", default=None, help="'auto', 'cpu', 'cuda'")
    return p


_FLAG_FIELDS = (
    "manifest", "store", "output_dir", "full", "init", "experts", "steps", "batch_size", "lr", "warmup_steps",
    "schedule", "lora_rank", "lora_alpha", "max_memory", "seed", "save_every", "resume",
)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data: dict = {}
    if args.config is not None:
        text = Path(args.config).read_text()
        data = (__import__("yaml").safe_load(text) if args.config.suffix in (".yaml", ".yml") else json.loads(text)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config: {args.config} must hold a mapping of TrainConfig fields")
    for name in _FLAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    model = dict(data.get("model") or {})
    for flag, name in (("embedded_weights", "embedded_weights"), ("i2v_path", "i2v_path"), ("device", "device")):
        if getattr(args, flag, None) is not None:
            model[name] = getattr(args, flag)
    if model:
        data["model"] = model
    return TrainConfig.model_validate(data)


def run_train(args: argparse.Namespace) -> int:
    import sys

    try:
        cfg = config_from_args(args)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            print(f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = train(cfg)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0
