"""Several devices per shot: one shot's transformer forwards split over a gang of ranks.

Every rank of a `torch.distributed` process group builds the same pipeline and runs the same shot
(same seed, so the same noise, text embeddings and VAE latents); diffusers' context parallelism
(`enable_parallelism(ContextParallelConfig(ulysses_degree, ring_degree))`) splits each transformer
forward along the token sequence and gathers the output, so every rank holds the whole result and
rank 0 returns the frames. Wan's `_cp_plan` keys on module names: the memory RoPE that M2V installs
keeps the name `rope`, so its tables are split like Wan's own (checked: tests/test_parallel.py).

NCCL on GPUs, gloo on CPUs. Cancellation is collective (`collective_step_callback`): a rank that
stopped alone would leave the others waiting in the next all-to-all.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field


class ParallelConfig(BaseModel):
    """How many ranks make one shot, and how they split it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ulysses_degree: int = Field(
        1, ge=1, le=64,
        description="Ulysses sequence parallel degree: attention heads are redistributed by all-to-all, so it "
        "must divide the head count (Wan 14B: 40 heads: 2, 4, 5, 8). Best within one NVLink domain.",
    )
    ring_degree: int = Field(
        1, ge=1, le=64,
        description="Ring attention degree (key/value blocks passed around a ring); needs an attention backend "
        "that returns the log-sum-exp (flash/cuDNN on GPU; not diffusers' native backend on CPU).",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend: 'auto' is nccl with GPUs, gloo without."
    )
    collective_timeout_s: float = Field(
        300.0, gt=0, le=7200,
        description="How long a rank waits in a collective before failing the shot (a dead rank fails the shot "
        "after this instead of hanging the gang).",
    )

    @property
    def world_size(self) -> int:
        """Ranks per gang (one device each)."""
        return self.ulysses_degree * self.ring_degree


def resolve_backend(cfg: ParallelConfig) -> str:
    import torch

    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(cfg: ParallelConfig, rank: int, master_addr: str, master_port: int) -> None:
    """Join the gang's process group (TCP rendezvous at rank 0's address); each rank takes its GPU."""
    import torch
    import torch.distributed as dist

    backend = resolve_backend(cfg)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=cfg.world_size,
        timeout=datetime.timedelta(seconds=cfg.collective_timeout_s),
    )


@contextlib.contextmanager
def _cpu_device_count():
    """diffusers 0.42's `_resolve_parallel_config` takes `rank % torch.accelerator.device_count()`, which
    divides by zero on a machine without an accelerator; on such a machine every rank is 'cpu' anyway."""
    import torch

    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(pipe, cfg: ParallelConfig) -> None:
    """Split every transformer of the pipeline over the process group (call after placement)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    if not dist.is_initialized():
        raise RuntimeError("parallel: torch.distributed is not initialised (init_process_group first)")
    if dist.get_world_size() != cfg.world_size:
        raise ValueError(f"parallel: the process group has {dist.get_world_size()} ranks, the config {cfg.world_size}")
    for t in (pipe.transformer, pipe.transformer_2, pipe.t2v_transformer, pipe.t2v_transformer_2):
        if t is None:
            continue
        heads = t.config.num_attention_heads
        if heads % cfg.ulysses_degree:
            raise ValueError(f"parallel.ulysses_degree: {cfg.ulysses_degree} does not divide the {heads} attention heads")
        with _cpu_device_count():
            t.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cfg.ulysses_degree, ring_degree=cfg.ring_degree))


def check_shot_size(pipe, cfg: ParallelConfig, num_frames: int, height: int, width: int, memory: int) -> None:
    """Refuse a shot whose token count the gang cannot split evenly, naming the field."""
    ts, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    p = pipe.transformer.config.patch_size
    tokens = ((num_frames - 1) // ts + 1 + memory) * (height // ss // p[1]) * (width // ss // p[2])
    if tokens % cfg.world_size:
        raise ValueError(
            f"height/width: {tokens} tokens (with {memory} memory frames) do not split over {cfg.world_size} ranks"
        )


def collective_step_callback(inner: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    """A step callback every rank runs: when any rank's `inner` raises (cancellation), all ranks stop at
    the same step, each raising; rank 0's exception is the one the caller sees."""
    import torch
    import torch.distributed as dist

    def callback(step: int, total: int) -> None:
        error: BaseException | None = None
        if inner is not None:
            try:
                inner(step, total)
            except BaseException as e:  # noqa: BLE001 - re-raised below on every rank
                error = e
        flag = torch.tensor([1.0 if error is not None else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if flag.item() > 0:
            from .story import StoryCancelled

            raise StoryCancelled("another rank of the gang stopped the shot")

    return callback


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def default_master_addr() -> str:
    return os.environ.get("MASTER_ADDR", "127.0.0.1")
