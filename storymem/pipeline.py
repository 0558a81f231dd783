"""StoryMemPipeline: one shot of a story by T2V, M2V, MI2V, MM2V or MR2V.

A diffusers `DiffusionPipeline` over Wan components: a UMT5 text encoder, the Wan VAE, the M2V
transformer(s) (a Wan image-to-video model with the M2V LoRA; two experts for Wan2.2 A14B), an
optional text-to-video transformer(s) for the first shot, and a UniPC flow-matching scheduler.

Defaults follow the authors' released inference (docs/reference.md): Wan's sigma grid handed to
diffusers' UniPC, every memory frame masked 1, Wan's negative prompt and prompt cleaning, and shot 1
by the text-to-video model with its own shift, expert boundary and guidance.
"""

from __future__ import annotations

import contextlib
import html
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import ftfy
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput

from .m2v import ShotMode, build_condition, build_mask, install_memory_rope, memory_frames
from .script import WAN_DEFAULT_NEGATIVE_PROMPT, MemoryMask, SigmaSchedule

log = logging.getLogger(__name__)


StepCallback = Callable[[int, int], None]


MEMORY_ENCODE_PIXELS = 2 * 832 * 480  # pixels of memory images per VAE encode call
WAN_SIGMA_MAX = 0.999  # Wan's solver: the largest training sigma, 1 - 1/1000
NO_T2V_NOTE = "no text-to-video model configured: shot made by the M2V model with empty memory"


@dataclass
class StoryMemPipelineOutput(BaseOutput):
    """frames: (F, H, W, 3) uint8 (or latents for output_type='latent'); timings in seconds per phase.
    model: which transformers made the shot, 't2v' or 'm2v'; notes: what a reader of the result should
    know (e.g. shot 1 asked for T2V but no text-to-video model is loaded)."""

    frames: np.ndarray | torch.Tensor
    mode: str = ""
    timings: dict = field(default_factory=dict)
    model: str = ""
    notes: list = field(default_factory=list)


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: ftfy.fix_text (curly quotes become straight, mojibake is repaired),
    HTML entities unescaped (twice, as Wan does), runs of whitespace collapsed."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


def wan_sigmas(num_inference_steps: int) -> np.ndarray:
    """Wan's unshifted sigma grid, linspace(0.999, 0, n + 1)[:-1]; UniPC's set_timesteps shifts it."""
    return np.linspace(WAN_SIGMA_MAX, 0.0, num_inference_steps + 1)[:-1].copy()


def make_timesteps(scheduler: UniPCMultistepScheduler, num_inference_steps: int, shift: float, schedule, device=None):
    """A copy of `scheduler` at `shift` with its timesteps set on the chosen sigma grid."""
    scheduler = UniPCMultistepScheduler.from_config(scheduler.config, flow_shift=shift)
    if SigmaSchedule(schedule) == SigmaSchedule.WAN:
        scheduler.set_timesteps(device=device, sigmas=wan_sigmas(num_inference_steps))
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


def offset_noise(shape, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of `shape` (batch, channels, frames, height, width) plus `offset` times one
    normal draw per sample and channel, constant over frames and space, renormalised to unit variance.

    offset 0 gives exactly torch.randn(shape), the draw of Wan and of every shipped model. A model trained
    on i.i.d. noise carries a sampling offset into the colour of the whole frame; training with it
    (TrainConfig.noise_offset) teaches the model to remove it again (docs/identity.md, measured on the
    embedded model)."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if offset == 0:
        return noise
    const = torch.randn((shape[0], shape[1], 1, 1, 1), generator=generator, dtype=torch.float32)
    return (noise + offset * const) / (1.0 + offset**2) ** 0.5


def _as_image(frame) -> torch.Tensor:
    x = frame if isinstance(frame, torch.Tensor) else torch.from_numpy(np.array(frame))  # a copy: frames from Ray's object store are read-only
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (H, W, 3) RGB images, got shape {tuple(x.shape)}")
    return x


def to_video_tensor(frames, height: int, width: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) / list of images of any sizes -> float (3, N, height, width) in [-1, 1].

    Each image is resized (bicubic) to height x width on its own before they are stacked, so memory
    images of different sizes (reference images, keyframes of an earlier size) are accepted."""
    if isinstance(frames, (list, tuple)):
        images = [_as_image(f) for f in frames]
    else:
        x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}")
        images = [x]
    out = []
    for x in images:
        x = (x if x.ndim == 4 else x[None]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-2:] != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
        out.append(x)
    return torch.cat(out).permute(1, 0, 2, 3)


class StoryMemPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->t2v_transformer->t2v_transformer_2->transformer->transformer_2->vae"
    _optional_components = ["transformer_2", "t2v_transformer", "t2v_transformer_2"]
    speed = None  # the storymem.speed.SpeedConfig applied by apply_speed; None: the plain pipeline
    # The M2V LoRA sets on transformer/transformer_2 (attach_lora); none: the base model is the M2V model.
    lora = None  # storymem.lora.AdapterStack
    lora_sets: tuple = ()  # storymem.lora.LoraSet, in load order

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae: AutoencoderKLWan,
        scheduler: UniPCMultistepScheduler,
        transformer: WanTransformer3DModel,
        transformer_2: WanTransformer3DModel | None = None,
        t2v_transformer: WanTransformer3DModel | None = None,
        t2v_transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = 0.9,
        rope_shift: int = 5,
        max_sequence_length: int = 512,
        t2v_boundary_ratio: float | None = 0.875,
        default_negative_prompt: str | None = None,
    ):
        """boundary_ratio / t2v_boundary_ratio: expert switch of the M2V / T2V pair (timesteps >= ratio * 1000
        use the high-noise expert). default_negative_prompt: used when a call gives none; None: Wan's."""
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            t2v_transformer=t2v_transformer,
            t2v_transformer_2=t2v_transformer_2,
        )
        if transformer_2 is None and t2v_transformer_2 is None:
            boundary_ratio = None
        if t2v_transformer_2 is None:
            t2v_boundary_ratio = None
        self.register_to_config(
            boundary_ratio=boundary_ratio,
            rope_shift=rope_shift,
            max_sequence_length=max_sequence_length,
            t2v_boundary_ratio=t2v_boundary_ratio,
            default_negative_prompt=default_negative_prompt,
        )
        self._warned_no_t2v = False
        for t in (transformer, transformer_2):
            if t is not None:
                install_memory_rope(t, rope_shift)
        self.vae_scale_factor_temporal = 2 ** sum(vae.config.temperal_downsample)
        self.vae_scale_factor_spatial = 2 ** len(vae.config.temperal_downsample)

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> torch.Tensor:
        """UMT5 hidden states, zero beyond each prompt's length (as Wan was trained)."""
        n = max_sequence_length or self.config.max_sequence_length
        tokens = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=n,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        hidden = self.text_encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        lengths = tokens.attention_mask.sum(dim=1)
        keep = torch.arange(n, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
        return hidden * keep[..., None].to(hidden.dtype)

    # ---------------------------------------------------------------- VAE
    def _latent_norm(self, device, dtype):
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean, device=device, dtype=dtype).view(1, z, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std, device=device, dtype=dtype).view(1, z, 1, 1, 1)
        return mean, inv_std

    @torch.no_grad()
    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, N, H, W) in [-1, 1] -> normalised latents (B, z, n, h, w), the posterior mode."""
        # The execution device, not self.vae.device: under model offload the VAE sits on the CPU until
        # diffusers' encode/decode hook moves it, and that hook does not move the input.
        latents = self.vae.encode(video.to(self._execution_device, self.vae.dtype)).latent_dist.mode().float()
        mean, inv_std = self._latent_norm(latents.device, latents.dtype)
        return (latents - mean) * inv_std

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_norm(latents.device, torch.float32)
        latents = latents.float() / inv_std + mean
        return self.vae.decode(latents.to(self._execution_device, self.vae.dtype), return_dict=False)[0].float().clamp(-1, 1)

    def encode_memory(self, images: Sequence, height: int, width: int) -> torch.Tensor:
        """Each memory image resized to the shot size and encoded alone as a one-frame video:
        (1, z, M, h, w). A batch of one-frame videos equals encoding them one by one."""
        video = to_video_tensor(images, height, width)  # (3, M, H, W)
        batch = video.permute(1, 0, 2, 3).unsqueeze(2)  # (M, 3, 1, H, W)
        # A few images per VAE call: ten 832x480 images at once peak at ~15 GiB of activations, more
        # than an 80 GB card has left beside both A14B experts and the text encoder (measured on H100).
        chunk = max(1, MEMORY_ENCODE_PIXELS // (height * width))
        latents = torch.cat([self.vae_encode(batch[i : i + chunk]) for i in range(0, batch.shape[0], chunk)])  # (M, z, 1, h, w)
        return latents.squeeze(2).permute(1, 0, 2, 3).unsqueeze(0)

    def encode_condition_video(self, motion, num_frames: int, height: int, width: int) -> torch.Tensor:
        """u: the VAE encoding of [motion frames, zeros...] (F frames); all zeros without motion."""
        cond = torch.zeros(3, num_frames, height, width)
        if motion is not None:
            m = to_video_tensor(motion, height, width)
            cond[:, : m.shape[1]] = m
        return self.vae_encode(cond.unsqueeze(0))

    # ---------------------------------------------------------------- LoRA sets
    def attach_lora(self, sets, fuse: str = "auto"):
        """Load the LoRA sets (storymem.lora.LoraSet) as named adapters on the M2V experts and return
        the AdapterStack (further adapters, e.g. speed LoRAs, stack on it). The T2V transformers get
        none: shot 1 by a separate T2V model runs without an M2V LoRA."""
        from .lora import AdapterStack

        if self.lora is None:
            if self.transformer_2 is not None:
                experts = {"high": self.transformer, "low": self.transformer_2}
            else:  # one transformer: the low-noise file is its LoRA
                experts = {"low": self.transformer}
            self.lora = AdapterStack(experts, fuse=fuse)
        for lora_set in sets:
            self.lora.add_set(lora_set)
        self.lora_sets = (*self.lora_sets, *sets)
        return self.lora

    @property
    def supported_transitions(self) -> frozenset[str]:
        """TransitionMode values the loaded sets serve (all three without sets)."""
        from .lora import supported_transitions

        return supported_transitions(self.lora_sets)

    def activate_lora(self, transition) -> str | None:
        """Switch the M2V experts to the set of a story's transition before its shot; returns the
        adapter name (None without sets). Raises ValueError naming settings.transition when no
        loaded set serves it. Every shot of a story uses its set, shot 1 too when no separate T2V
        model is loaded (it is then made by the M2V model without memory)."""
        from .lora import select_set

        chosen = select_set(self.lora_sets, getattr(transition, "value", transition))
        if chosen is None:
            return None
        self.lora.activate([chosen.name])
        return chosen.name

    # ---------------------------------------------------------------- call
    def shot_scheduler(
        self, num_inference_steps: int, shift: float, device, sigma_schedule: SigmaSchedule | str = SigmaSchedule.WAN
    ):
        """A fresh scheduler for one shot: UniPC on the chosen sigma grid, or the speed mode's sampler
        (which brings its own sigmas)."""
        if self.speed is not None and self.speed.sampler.kind != "unipc":
            from .speed import make_scheduler

            return make_scheduler(self.speed.sampler, self.scheduler.config, num_inference_steps, shift, device)
        return make_timesteps(self.scheduler, num_inference_steps, shift, sigma_schedule, device=device)

    @staticmethod
    def _denoise(model, branch: str, x, timestep, embeds):
        # One cache context per guidance branch: a step cache compares a branch only with itself.
        with model.cache_context(branch):
            return model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def _experts(self, mode: ShotMode):
        if mode == ShotMode.T2V and self.t2v_transformer is not None:
            return self.t2v_transformer, self.t2v_transformer_2, False
        return self.transformer, self.transformer_2, True

    def resolve_mode(self, memory, motion_frames, mode: ShotMode | str | None) -> ShotMode:
        n_motion = 0 if motion_frames is None else len(motion_frames)
        if mode is None:
            if n_motion:
                mode = {1: ShotMode.MI2V, 5: ShotMode.MM2V}.get(n_motion)
                if mode is None:
                    raise ValueError(f"motion_frames: 1 (MI2V) or 5 (MM2V) frames expected, got {n_motion}")
                return mode
            return ShotMode.M2V if memory else ShotMode.T2V
        mode = ShotMode(mode)
        if n_motion != mode.motion_frames:
            raise ValueError(f"motion_frames: mode {mode.value} needs {mode.motion_frames}, got {n_motion}")
        if mode == ShotMode.T2V and memory:
            raise ValueError("memory: mode t2v takes no memory")
        if mode == ShotMode.MR2V and not memory:
            raise ValueError("memory: mode mr2v needs reference images")
        return mode

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        memory: Sequence | None = None,
        motion_frames=None,
        mode: ShotMode | str | None = None,
        fix: int = 3,
        memory_mask: MemoryMask | str = MemoryMask.ONES,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 40,
        guidance_scale: float = 3.5,
        guidance_scale_2: float | None = None,
        memory_guidance_scale: float = 1.0,
        shift: float = 4.0,
        sigma_schedule: SigmaSchedule | str = SigmaSchedule.WAN,
        t2v_shift: float = 12.0,
        t2v_guidance_scale: float | None = None,
        t2v_guidance_scale_2: float | None = None,
        noise_offset: float = 0.0,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        max_sequence_length: int | None = None,
        step_callback: StepCallback | None = None,
        output_type: str = "np",
    ) -> StoryMemPipelineOutput:
        """Make one shot.

        memory: the memory bank's keyframes (uint8 images of any size; resized to the shot size).
        motion_frames: the previous shot's last 1 (MI2V) or 5 (MM2V) frames, for cut == False.
        mode: inferred when None (T2V without memory, M2V with memory, MI2V/MM2V with motion frames).
        step_callback(step, total) runs after every denoising step; an exception it raises stops the
        shot there (cancellation).
        memory_guidance_scale: guidance on memory, s_m > 1 adds an extra pass without memory per step,
        cond + (s_t - 1)(cond - uncond) + (s_m - 1)(cond - no_memory) on the shot frames; 1 (default)
        is plain text CFG, as the released LoRA is used.
        memory_mask: mask value of memory frames (MemoryMask; 'ones' as the authors' released inference).
        sigma_schedule: 'wan' (Wan's solver grid, the default) or 'diffusers' (UniPC's own flow grid).
        t2v_shift / t2v_guidance_scale(_2): sampling of a T2V shot made by the text-to-video model
        (shift 12 and boundary 0.875 for Wan2.2-T2V-A14B; guidance None: guidance_scale(_2)). Without a
        text-to-video model, a T2V shot is made by the M2V model with empty memory and M2V sampling,
        and the output's `notes` say so.
        noise_offset: per-channel offset of the initial noise (`offset_noise`); 0 (the default) is Wan's
        i.i.d. noise. Not a story setting: a sampling experiment (bench/identity_factors.py, bench/proof.py).
        """
        timings: dict[str, float] = {}
        memory = list(memory) if memory is not None else []
        mode = self.resolve_mode(memory, motion_frames, mode)
        ts, ss = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        if (num_frames - 1) % ts:
            raise ValueError(f"num_frames: must be {ts}n+1, got {num_frames}")
        multiple = ss * self.transformer.config.patch_size[1]
        if height % multiple or width % multiple:
            raise ValueError(f"height/width: must be multiples of {multiple}, got {height}x{width}")
        device = self._execution_device
        high, low, conditioned = self._experts(mode)
        if self.speed is not None:
            from .speed import check_shot

            check_shot(self.speed, num_inference_steps, guidance_scale, guidance_scale_2)
        guidance_scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        notes: list[str] = []
        if conditioned:
            boundary = self.config.boundary_ratio if low is not None else None
            if mode == ShotMode.T2V:
                notes.append(NO_T2V_NOTE)
                if not self._warned_no_t2v:
                    log.warning("%s (set model.t2v_path for the paper's shot 1)", NO_T2V_NOTE)
                    self._warned_no_t2v = True
        else:  # the text-to-video model, with its own sampling
            boundary = self.config.t2v_boundary_ratio if low is not None else None
            shift = t2v_shift
            if t2v_guidance_scale is not None:
                guidance_scale = t2v_guidance_scale
                guidance_scale_2 = t2v_guidance_scale if t2v_guidance_scale_2 is None else t2v_guidance_scale_2
        if memory_guidance_scale < 1.0:
            raise ValueError(f"memory_guidance_scale: must be >= 1 (1 = off), got {memory_guidance_scale}")
        if noise_offset < 0:
            raise ValueError(f"noise_offset: must be >= 0, got {noise_offset}")
        do_cfg = guidance_scale > 1.0 or (boundary is not None and guidance_scale_2 > 1.0)

        t0 = time.perf_counter()
        if negative_prompt is None:
            negative_prompt = self.config.default_negative_prompt or WAN_DEFAULT_NEGATIVE_PROMPT
        neg = negative_prompt
        embeds = self.encode_prompt([prompt, neg] if do_cfg else [prompt], max_sequence_length)
        dtype = high.dtype
        prompt_embeds = embeds[:1].to(device, dtype)
        negative_embeds = embeds[1:].to(device, dtype) if do_cfg else None
        timings["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        h, w = height // ss, width // ss
        f = (num_frames - 1) // ts + 1
        m = len(memory) if conditioned else 0
        condition = no_memory_condition = None
        if conditioned:
            mem_latents = self.encode_memory(memory, height, width) if m else None
            u = self.encode_condition_video(motion_frames if mode.motion_frames else None, num_frames, height, width)
            mask = build_mask(m, num_frames, h, w, mode, fix=fix, temporal_scale=ts, memory_mask=memory_mask)
            condition = build_condition(mem_latents, u, mask).to(device)
            if m and memory_guidance_scale != 1.0:
                no_memory_condition = build_condition(None, u, build_mask(0, num_frames, h, w, mode, fix=fix, temporal_scale=ts)).to(device)
        timings["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(0 if seed is None else int(seed))
        z = self.vae.config.z_dim
        latents = offset_noise((1, z, m + f, h, w), noise_offset, generator).to(device)
        scheduler = self.shot_scheduler(num_inference_steps, shift, device, sigma_schedule)
        for t in (high, low):
            if t is not None and getattr(t, "is_cache_enabled", False):
                t._reset_stateful_cache()  # a shot stopped early (cancel) leaves cached residuals behind
        boundary_t = None if boundary is None else boundary * scheduler.config.num_train_timesteps
        total = len(scheduler.timesteps)
        with memory_frames(high, m), (memory_frames(low, m) if low is not None else contextlib.nullcontext()):
            for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
                use_high = boundary_t is None or t >= boundary_t
                model = high if use_high else low
                scale = guidance_scale if use_high else guidance_scale_2
                x = latents if condition is None else torch.cat([latents, condition], dim=1)
                x = x.to(model.dtype)
                timestep = t.expand(1)
                noise = self._denoise(model, "cond", x, timestep, prompt_embeds)
                if do_cfg and scale != 1.0:
                    uncond = self._denoise(model, "uncond", x, timestep, negative_embeds)
                    guided = uncond + scale * (noise - uncond)
                else:
                    guided = noise
                if no_memory_condition is not None:
                    # The same shot latents seen without memory tokens (M = 0), as training's memory
                    # dropout showed them; only the shot frames are guided.
                    x0 = torch.cat([latents[:, :, m:], no_memory_condition], dim=1).to(model.dtype)
                    with memory_frames(model, 0):
                        plain = self._denoise(model, "no_memory", x0, timestep, prompt_embeds)
                    shot = guided[:, :, m:] + (memory_guidance_scale - 1.0) * (noise[:, :, m:] - plain)
                    guided = torch.cat([guided[:, :, :m], shot], dim=2)
                noise = guided
                latents = scheduler.step(noise.float(), t, latents, return_dict=False)[0]
                if step_callback is not None:
                    step_callback(i + 1, total)
        timings["denoise"] = time.perf_counter() - t0

        shot_latents = latents[:, :, m:]  # the memory part of the result is discarded
        made_by = "m2v" if conditioned else "t2v"
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return StoryMemPipelineOutput(
                frames=shot_latents, mode=mode.value, timings=timings, model=made_by, notes=notes
            )
        t0 = time.perf_counter()
        video = self.vae_decode(shot_latents)[0]  # (3, F, H, W)
        timings["decode"] = time.perf_counter() - t0
        self.maybe_free_model_hooks()
        if output_type == "pt":
            return StoryMemPipelineOutput(
                frames=video, mode=mode.value, timings=timings, model=made_by, notes=notes
            )
        frames = ((video.permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return StoryMemPipelineOutput(
            frames=frames, mode=mode.value, timings=timings, model=made_by, notes=notes
        )


def build_pipeline(cfg=None, speed=None):
    """The pipeline a process uses: local weights when configured, else the embedded tiny models.

    Loads the M2V LoRA sets on the experts (storymem.lora), then applies the speed mode (`speed`: a
    storymem.speed.SpeedConfig, None: exact), which places the models on the device (or sets up
    offloading); returns (pipeline, profile), the profile's defaults including the speed mode's."""
    from . import models
    from .config import ModelConfig
    from .lora import configured_sets
    from .speed import apply_speed, mode_defaults

    cfg = cfg or ModelConfig()
    sets = configured_sets(cfg)  # a missing file fails here, before any weights are read
    device = models.resolve_device(cfg)
    dtype = models.resolve_dtype(cfg, device)
    if cfg.embedded:
        components, profile = models.build_embedded(cfg)
    else:
        components, profile = models.load_local(cfg, dtype)
    pipe = StoryMemPipeline(
        **components,
        boundary_ratio=profile.boundary,
        rope_shift=cfg.rope_shift,
        max_sequence_length=profile.max_sequence_length,
        t2v_boundary_ratio=profile.t2v_boundary,
        default_negative_prompt=profile.defaults.get("negative_prompt"),
    )
    pipe.set_progress_bar_config(disable=True)
    if sets:
        pipe.attach_lora(sets)
    profile.transitions = pipe.supported_transitions

    def first_activation():  # a single set is fused here, once
        if sets:
            pipe.activate_lora(sorted(pipe.supported_transitions)[0])

    # Speed mode (storymem.speed): extra LoRAs, placement/offload (around the first activation), FP8,
    # compile, step caching.
    apply_speed(pipe, speed, device, offload=cfg.offload, model_compile=cfg.compile, activate=first_activation)
    profile.defaults.update(mode_defaults(speed))
    return pipe, profile
