"""A shot split over 2 gloo processes (diffusers Ulysses context parallelism) equals one process."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from storymem.config import ModelConfig
from storymem.parallel import ParallelConfig, collective_step_callback, enable_context_parallel, free_port, init_process_group
from storymem.pipeline import build_pipeline

SHOT = dict(height=48, width=64, num_frames=5, num_inference_steps=3, guidance_scale=2.0, memory_guidance_scale=2.0, seed=7)


def _memory():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(2)]


def _rank(rank: int, port: int, out: str, cancel_at: int | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    cfg = ParallelConfig(ulysses_degree=2)
    init_process_group(cfg, rank, "127.0.0.1", port)
    try:
        pipe, _ = build_pipeline(ModelConfig())
        enable_context_parallel(pipe, cfg)
        # the memory RoPE replaced Wan's under the same name, so Wan's plan put its split hook on it
        for t in (pipe.transformer, pipe.transformer_2):
            assert type(t.rope).__name__ == "MemoryRotaryPosEmbed"
            assert t.rope._diffusers_hook.get_hook("cp_input---rope") is not None

        def stop(step, total):
            if cancel_at is not None and rank == 1 and step == cancel_at:
                raise RuntimeError("rank 1 stops")

        try:
            res = pipe("a red fox runs", memory=_memory(), output_type="latent", step_callback=collective_step_callback(stop), **SHOT)
            if rank == 0:
                torch.save(res.frames, out)
        except BaseException as e:  # noqa: BLE001 - reported to the parent through the file
            if rank == 0:
                torch.save({"error": f"{type(e).__name__}: {e}"}, out)
    finally:
        torch.distributed.destroy_process_group()


def _gang(tmp_path, cancel_at=None):
    ctx = mp.get_context("spawn")
    port, out = free_port(), str(tmp_path / "rank0.pt")
    procs = [ctx.Process(target=_rank, args=(r, port, out, cancel_at)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, p.exitcode
    return torch.load(out)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    pipe, _ = build_pipeline(ModelConfig())
    want = pipe("a red fox runs", memory=_memory(), output_type="latent", **SHOT).frames
    got = _gang(tmp_path)
    assert isinstance(got, torch.Tensor), got
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def test_a_rank_that_stops_stops_the_whole_gang(tmp_path):
    got = _gang(tmp_path, cancel_at=2)
    assert isinstance(got, dict) and "StoryCancelled" in got["error"], got


def test_parallel_config_world_size_and_head_check():
    assert ParallelConfig(ulysses_degree=4, ring_degree=2).world_size == 8
    with pytest.raises(Exception, match="ulysses_degree"):
        ParallelConfig(ulysses_degree=0)
