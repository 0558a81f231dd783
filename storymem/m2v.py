"""Memory-to-Video conditioning on diffusers' WanTransformer3DModel.

Three pieces turn a Wan image-to-video transformer into M2V (method.md, 'M2V conditioning'):

* `MemoryRotaryPosEmbed` replaces the transformer's rotary module so that the M memory latent
  frames placed before the shot get temporal positions -M*S, ..., -S and the shot 0..f-1.
  diffusers' own module slices a table of non-negative positions, so it cannot express this.
* `build_mask` makes the 4-channel mask: 1 for memory frames and conditioned frames, 0 for frames
  to generate, laid out like Wan I2V's mask (`MemoryMask.SINK_WINDOW`: window memory frames 2).
* `build_condition` stacks [mask | memory latents, u] into the 20-channel (4 + z) condition that is
  concatenated to the noisy latent (36 channels for Wan's z = 16).

The transformer itself is not rewritten: its forward is diffusers' own.
"""

from __future__ import annotations

import contextlib
from enum import Enum

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformer3DModel

from .script import MemoryMask


class ShotMode(str, Enum):
    """How one shot is conditioned."""

    T2V = "t2v"  # no memory, plain text-to-video (shot 1)
    M2V = "m2v"  # memory only
    MI2V = "mi2v"  # memory + previous shot's last frame
    MM2V = "mm2v"  # memory + previous shot's last 5 frames
    MR2V = "mr2v"  # reference images as memory (shot 1 of a customised story); same tensors as M2V

    @property
    def motion_frames(self) -> int:
        return {ShotMode.MI2V: 1, ShotMode.MM2V: 5}.get(self, 0)


class MemoryRotaryPosEmbed(WanRotaryPosEmbed):
    """Wan's 3-D RoPE with explicit temporal positions for memory frames.

    `num_memory_frames` (M) is set per call through `memory_frames()`; the first M latent frames of
    the input get positions -(M - i) * shift, the rest 0, 1, 2, .... With M = 0 it equals diffusers'
    module exactly.
    """

    def __init__(self, attention_head_dim, patch_size, max_seq_len, theta: float = 10000.0, shift: int = 5):
        super().__init__(attention_head_dim, patch_size, max_seq_len, theta)
        self.theta = theta
        self.shift = shift
        self.num_memory_frames = 0
        self._cache: dict = {}

    @classmethod
    def from_wan(cls, rope: WanRotaryPosEmbed, shift: int = 5) -> "MemoryRotaryPosEmbed":
        theta = getattr(rope, "theta", 10000.0)
        new = cls(rope.attention_head_dim, rope.patch_size, rope.max_seq_len, theta, shift)
        return new.to(rope.freqs_cos.device)

    def temporal_positions(self, num_latent_frames: int) -> torch.Tensor:
        m = self.num_memory_frames
        if m > num_latent_frames:
            raise ValueError(f"num_memory_frames ({m}) exceeds the latent frames of the input ({num_latent_frames})")
        memory = -self.shift * torch.arange(m, 0, -1, dtype=torch.float64)
        shot = torch.arange(num_latent_frames - m, dtype=torch.float64)
        return torch.cat([memory, shot])

    def _temporal_freqs(self, ppf: int, device: torch.device):
        key = (ppf, self.num_memory_frames, self.shift, device)
        if key not in self._cache:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cos, sin = get_1d_rotary_pos_embed(
                self.t_dim,
                self.temporal_positions(ppf).to(dtype),
                self.theta,
                use_real=True,
                repeat_interleave_real=True,
                freqs_dtype=dtype,
            )
            self._cache = {key: (cos.to(device), sin.to(device))}
        return self._cache[key]

    def forward(self, hidden_states: torch.Tensor):
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        if pph > self.max_seq_len or ppw > self.max_seq_len:
            raise ValueError(f"spatial size {pph}x{ppw} patches exceeds the RoPE table ({self.max_seq_len})")

        t_cos, t_sin = self._temporal_freqs(ppf, self.freqs_cos.device)
        split = [self.t_dim, self.h_dim, self.w_dim]
        _, h_cos, w_cos = self.freqs_cos.split(split, dim=1)
        _, h_sin, w_sin = self.freqs_sin.split(split, dim=1)

        def grid(t, h, w):
            return torch.cat(
                [
                    t.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                    h[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                    w[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
                ],
                dim=-1,
            ).reshape(1, ppf * pph * ppw, 1, -1)

        return grid(t_cos.to(h_cos.dtype), h_cos, w_cos), grid(t_sin.to(h_sin.dtype), h_sin, w_sin)


def install_memory_rope(transformer: WanTransformer3DModel, shift: int = 5) -> MemoryRotaryPosEmbed:
    """Swap the transformer's rotary module for the memory-aware one (idempotent)."""
    if isinstance(transformer.rope, MemoryRotaryPosEmbed):
        transformer.rope.shift = shift
        return transformer.rope
    transformer.rope = MemoryRotaryPosEmbed.from_wan(transformer.rope, shift)
    return transformer.rope


@contextlib.contextmanager
def memory_frames(transformer: WanTransformer3DModel, m: int):
    """Within the block, the first `m` latent frames of every forward are memory frames."""
    rope = transformer.rope
    if not isinstance(rope, MemoryRotaryPosEmbed):
        if m == 0:
            yield
            return
        raise ValueError("the transformer has no memory RoPE; call install_memory_rope() first")
    previous = rope.num_memory_frames
    rope.num_memory_frames = m
    try:
        yield
    finally:
        rope.num_memory_frames = previous


def pixel_mask(
    num_memory: int, num_frames: int, mode: ShotMode | str, fix: int = 3, memory_mask: MemoryMask | str = MemoryMask.ONES
) -> torch.Tensor:
    """The per-pixel-frame mask of M + F entries, before the temporal grouping.

    Memory frames are 1 (`MemoryMask.ONES`, the authors' released inference); with
    `MemoryMask.SINK_WINDOW` those after the first `fix` (the window) are 2 instead."""
    mode, memory_mask = ShotMode(mode), MemoryMask(memory_mask)
    mask = torch.ones(num_memory + num_frames)
    if memory_mask == MemoryMask.SINK_WINDOW and num_memory > fix:
        mask[fix:num_memory] = 2.0
    mask[num_memory:] = 0.0
    k = mode.motion_frames
    if k:
        if k > num_frames:
            raise ValueError(f"{mode.value} needs {k} conditioning frames but the shot has {num_frames}")
        mask[num_memory : num_memory + k] = 1.0
    return mask


def build_mask(
    num_memory: int,
    num_frames: int,
    latent_height: int,
    latent_width: int,
    mode: ShotMode | str = ShotMode.M2V,
    fix: int = 3,
    temporal_scale: int = 4,
    memory_mask: MemoryMask | str = MemoryMask.ONES,
) -> torch.Tensor:
    """The mask channels: (temporal_scale, M + f, h, w) with f = (F - 1) / temporal_scale + 1.

    The first M + 1 pixel-frame entries are repeated `temporal_scale` times because the causal VAE
    encodes each memory image and the first video frame on its own; then every group of
    `temporal_scale` consecutive entries becomes the channels of one latent frame. `fix` matters
    only with `memory_mask=SINK_WINDOW`.
    """
    if (num_frames - 1) % temporal_scale:
        raise ValueError(f"num_frames ({num_frames}) must be {temporal_scale}n+1")
    m = pixel_mask(num_memory, num_frames, mode, fix, memory_mask)
    head = torch.repeat_interleave(m[: num_memory + 1], temporal_scale)
    m = torch.cat([head, m[num_memory + 1 :]])
    latent_frames = m.numel() // temporal_scale
    m = m.view(latent_frames, temporal_scale).transpose(0, 1)  # (4, M + f)
    return m[:, :, None, None].expand(temporal_scale, latent_frames, latent_height, latent_width).contiguous()


def build_condition(
    memory_latents: torch.Tensor | None,
    video_latents: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Channel condition (B, 4 + z, M + f, h, w) = [mask | memory latents, u].

    memory_latents: (B, z, M, h, w) or None; video_latents (u): (B, z, f, h, w); mask: (4, M + f, h, w).
    """
    latents = video_latents if memory_latents is None else torch.cat([memory_latents, video_latents], dim=2)
    if mask.shape[1] != latents.shape[2]:
        raise ValueError(f"mask covers {mask.shape[1]} latent frames, latents have {latents.shape[2]}")
    mask = mask.to(latents.device, latents.dtype).unsqueeze(0).expand(latents.shape[0], -1, -1, -1, -1)
    return torch.cat([mask, latents], dim=1)
