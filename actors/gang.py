"""A shot generator made of N ranks in one Ray placement group (several GPUs per shot).

The pool leases a gang like a single generator: its handle is the leader (rank 0), a
`ShotGenerator` with the same methods (`generate` stream, `cancel`, `info`, `profile_info`). The
leader creates the other ranks (`GangFollower`, owned by it, so they die with it) in the bundles of
the gang's placement group, and all ranks join one torch.distributed group (NCCL on GPUs, gloo on
CPUs) and enable diffusers' context parallelism on their transformers (storymem.parallel). Per shot
the leader hands the request to every follower, runs its own share with the others, and streams the
steps and rank 0's frames to the caller.

A rank that dies fails the attempt: the leader exits at once, so the director sees a lost generator
(and retries the shot elsewhere) and the pool's monitor rebuilds the gang (`release_gang`, then a new
`spawn_gang`).
"""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from storymem.config import EngineConfig, ModelConfig
from storymem.parallel import (
    ParallelConfig,
    check_shot_size,
    collective_step_callback,
    enable_context_parallel,
    free_port,
    init_process_group,
)
from storymem.speed import SpeedConfig

from ._common import ACTOR_LOST, get
from .generator import ShotGenerator

log = logging.getLogger(__name__)


def _build_rank(model_cfg: ModelConfig, speed: SpeedConfig | None, parallel: ParallelConfig, rank: int, addr: str, port: int):
    from storymem.pipeline import build_pipeline

    init_process_group(parallel, rank, addr, port)
    pipe, profile = build_pipeline(model_cfg, speed)
    enable_context_parallel(pipe, parallel)
    return pipe, profile


@ray.remote(max_restarts=0)
class GangFollower:
    """Rank r > 0: runs every shot the leader hands it, in step with the others; returns nothing."""

    def __init__(self, model_cfg, speed, parallel: ParallelConfig, rank: int, addr: str, port: int, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.rank = rank
        self.pipe, _ = _build_rank(model_cfg, speed, parallel, rank, addr, port)

    def ready(self) -> int:
        return self.rank

    def follow(self, kwargs: dict) -> None:
        # Frames come from rank 0; this rank stops after the last step (no decode).
        kwargs = dict(kwargs, output_type="latent")
        try:
            self.pipe(**kwargs, step_callback=collective_step_callback(None))
        except Exception as e:  # the leader reports the shot's error; this rank's copy is noise
            log.info("rank %d: shot stopped: %s", self.rank, type(e).__name__)


class GangPipe:
    """The leader's pipeline: fans each call out to the followers, runs rank 0's share, collects."""

    def __init__(self, pipe, followers: list, parallel: ParallelConfig):
        self.pipe, self.followers, self.parallel = pipe, followers, parallel

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, step_callback=None, **kwargs):
        memory = kwargs.get("memory") or []
        check_shot_size(self.pipe, self.parallel, kwargs["num_frames"], kwargs["height"], kwargs["width"], len(memory))
        refs = [f.follow.remote(kwargs) for f in self.followers]
        try:
            return self.pipe(**kwargs, step_callback=collective_step_callback(step_callback))
        finally:
            try:
                get(refs, timeout=self.parallel.collective_timeout_s)
            except (*ACTOR_LOST, ray.exceptions.GetTimeoutError) as e:
                # A lost rank leaves this process group unusable: exit, so that the caller sees a lost
                # generator (and retries the shot) and the pool rebuilds the whole gang.
                log.error("gang rank lost (%s): the leader exits so the gang is rebuilt", type(e).__name__)
                os._exit(1)


class GangLeader(ShotGenerator):
    """Rank 0: a ShotGenerator whose pipeline is the gang's."""

    def __init__(self, model_cfg, name, threads, speed, parallel: ParallelConfig, pg, rank_options: dict):
        self.parallel, self.pg, self.rank_options, self.threads = parallel, pg, rank_options, threads
        super().__init__(model_cfg, name, threads, speed)

    def _build(self, model_cfg, speed):
        addr, port = ray.util.get_node_ip_address(), free_port()
        self.followers = [
            GangFollower.options(
                **self.rank_options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(model_cfg, speed, self.parallel, r, addr, port, self.threads)
            for r in range(1, self.parallel.world_size)
        ]
        pipe, profile = _build_rank(model_cfg, speed, self.parallel, 0, addr, port)
        get([f.ready.remote() for f in self.followers])
        return GangPipe(pipe, self.followers, self.parallel), profile


GangLeaderActor = ray.remote(concurrency_groups={"control": 4}, max_restarts=0)(GangLeader)


def rank_options(engine: EngineConfig, parallel: ParallelConfig) -> dict:
    """Ray resources of one rank: the generator's GPUs and CPUs split evenly over the gang."""
    n = parallel.world_size
    return {"num_cpus": engine.cpus_per_generator / n, "num_gpus": engine.gpus_per_generator / n}


def spawn_gang(model_cfg: ModelConfig, speed: SpeedConfig | None, parallel: ParallelConfig, engine: EngineConfig,
               name: str, threads: int | None = None):
    """A new gang: its placement group (one bundle per rank, packed on one node: NVLink) and its leader
    handle. Returns (leader, placement_group); the leader answers `info` once every rank is built."""
    opts = rank_options(engine, parallel)
    bundle = {"CPU": opts["num_cpus"]} | ({"GPU": opts["num_gpus"]} if opts["num_gpus"] else {})
    pg = placement_group([dict(bundle) for _ in range(parallel.world_size)], strategy="STRICT_PACK", name=f"{name}-gang")
    leader = GangLeaderActor.options(
        **opts, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    ).remote(model_cfg, name, threads, speed, parallel, pg, opts)
    return leader, pg


def release_gang(leader, pg) -> None:
    """Kill a gang: the leader (its followers are owned by it) and the placement group."""
    try:
        ray.kill(leader, no_restart=True)
    except Exception:  # already dead
        pass
    try:
        remove_placement_group(pg)
    except Exception:  # already removed
        pass
