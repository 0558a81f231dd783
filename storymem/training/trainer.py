"""`Trainer`: one process of a (possibly distributed) M2V training run: model setup (LoRA per expert or
full training), the seeded sample plan and batches, optimizer steps, checkpoints and inference outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..m2v import ShotMode, build_condition, build_mask
from ..pipeline import offset_noise
from .config import TrainConfig
from .data import ClipLatents, open_clip_store, read_clip_manifest
from .loss import M2VLoss

log = logging.getLogger(__name__)

ADAPTER = "m2v"
EXPERT_FILES = {"high": "lora_high_noise.safetensors", "low": "lora_low_noise.safetensors"}
SINGLE_FILE = "lora.safetensors"
STATE_FILE = "trainer_state.pt"


def fresh_copy(module: nn.Module, seed: int) -> nn.Module:
    """A newly initialised module of the same diffusers config (training from scratch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return type(module).from_config(module.config)


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


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
        from .. import models
        from ..pipeline import StoryMemPipeline
        from ..script import WAN_DEFAULT_NEGATIVE_PROMPT

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
            for k, name in enumerate(self._slots(cfg)):
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
        self.loss_module = M2VLoss(self.experts, cfg.memory_loss_weight, cfg.first_frame_loss_weight, cfg.subject_loss_weight)
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
        if cfg.compile:
            # Wraps the step's module only: checkpoints and outputs read self.loss_module, unchanged.
            self.model = torch.compile(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

        self.store = store if store is not None else open_clip_store(cfg.store)
        self.records = read_clip_manifest(cfg.manifest, self.store)
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
        if cfg.subject_loss_weight != 1.0:
            lacking = [self.records[i].clip_id for i in self.eligible if self.records[i].subject_mask is None]
            if lacking:
                raise ValueError(
                    f"subject_loss_weight: {cfg.subject_loss_weight} needs the manifest's subject_mask column for every "
                    f"clip; {len(lacking)} have none, e.g. {lacking[:3]}"
                )
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

    @staticmethod
    def _slots(cfg: TrainConfig) -> tuple[str, str]:
        """The pipeline components (high-noise, low-noise) this run trains."""
        return ("t2v_transformer", "t2v_transformer_2") if cfg.task == "t2v" else ("transformer", "transformer_2")

    def _select_experts(self) -> dict[str, nn.Module]:
        high, low = (getattr(self.pipe, name) for name in self._slots(self.cfg))
        if high is None:
            raise ValueError(
                "task: 't2v' needs a model with a text-to-video transformer (an embedded bundle with one: "
                "scripts/train_embedded.py --t2v-steps)"
            )
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
        if len(self.experts) == 1 and getattr(self.pipe, self._slots(self.cfg)[1]) is None:
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
        text_only = cfg.task == "t2v" or rng.random() < cfg.memory_dropout
        m = 0 if text_only else int(rng.integers(cfg.min_memory, cfg.max_memory + 1))
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
        subject = self.data.subject_masks([p["clip"] for p in plan]) if self.cfg.subject_loss_weight != 1.0 else None
        z, f, h, w = next(iter(shot.values())).shape
        parts: dict[str, dict] = {}
        for k, p in enumerate(plan):
            mode = ShotMode.MI2V if p["motion"] else ShotMode.M2V
            n_cand = mem[p["clip"]].shape[1]
            memory = torch.stack([mem[c][:, min(j, n_cand - 1)] for c, j in p["memory"]], dim=1) if m else None
            if self.cfg.task == "t2v":
                cond = None  # a text-to-video transformer sees the noisy latents alone
            else:
                u = motion[p["clip"]] if p["motion"] else self.data.zeros_condition()
                mask = build_mask(
                    m, self.num_frames, h, w, mode, fix=self.cfg.fix,
                    temporal_scale=self.pipe.vae_scale_factor_temporal, memory_mask=self.cfg.memory_mask,
                )  # fmt: skip
                cond = build_condition(None if memory is None else memory[None], u[None], mask)
            clean = shot[p["clip"]][None] if memory is None else torch.cat([memory[None], shot[p["clip"]][None]], dim=2)
            noise = offset_noise(clean.shape, self.cfg.noise_offset, torch.Generator().manual_seed(p["noise_seed"]))
            part = parts.setdefault(p["expert"], {"clean": [], "noise": [], "condition": [], "sigma": [], "text": []})
            part["clean"].append(clean)
            part["noise"].append(noise)
            part["condition"].append(cond)
            part["sigma"].append(p["sigma"])
            part["text"].append(text[k : k + 1])
            if subject is not None:
                part.setdefault("subject", []).append(subject[p["clip"]][None])
        dev = self.device
        out = {}
        for name in self.experts:  # fixed order: every process runs the experts in the same order
            if name not in parts:
                continue
            part = parts[name]
            out[name] = dict(
                clean=torch.cat(part["clean"]).to(dev),
                noise=torch.cat(part["noise"]).to(dev),
                condition=None if part["condition"][0] is None else torch.cat(part["condition"]).to(dev),
                sigma=torch.tensor(part["sigma"], dtype=torch.float32, device=dev),
                text=torch.cat(part["text"]).to(dev),
                num_memory=m,
            )
            if "subject" in part:
                out[name]["subject"] = torch.cat(part["subject"]).to(dev)
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

        from .. import models

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
