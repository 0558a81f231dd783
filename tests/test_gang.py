"""A generator gang on local Ray: 2 gloo ranks in one placement group make the frames one process makes."""

from __future__ import annotations

import numpy as np
import pytest

from storymem.config import EngineConfig, ModelConfig
from storymem.parallel import ParallelConfig
from storymem.script import GenerationSettings
from storymem.story import ShotRequest

SETTINGS = GenerationSettings(height=48, width=64, num_frames=5, num_inference_steps=3, guidance_scale=2.0,
                              memory_guidance_scale=2.0, seed=5)


def _request(index=1):
    rng = np.random.default_rng(index)
    memory = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(2)]
    return ShotRequest(story="s", index=index, prompt="a red fox runs", mode="m2v", seed=5, settings=SETTINGS, memory=memory)


def _stream(leader, request, token):
    import ray

    steps, frames = [], None
    for ref in leader.generate.remote(request, token):
        item = ray.get(ref)
        if isinstance(item, np.ndarray):
            frames = item
        elif "step" in item:
            steps.append(item["step"])
    return steps, frames


def test_gang_of_two_equals_one_process_and_a_lost_rank_loses_the_generator(ray_local):
    import ray

    from actors._common import ACTOR_LOST
    from actors.gang import release_gang, spawn_gang
    from storymem.pipeline import build_pipeline

    pipe, _ = build_pipeline(ModelConfig())
    want = pipe(**_request().pipeline_kwargs()).frames
    parallel = ParallelConfig(ulysses_degree=2, collective_timeout_s=60)
    leader, pg = spawn_gang(ModelConfig(), None, parallel, EngineConfig(cpus_per_generator=2), "gen-0.1", threads=1)
    try:
        info = ray.get(leader.info.remote(), timeout=300)
        assert info["name"] == "gen-0.1"
        steps, frames = _stream(leader, _request(), "t1")
        assert steps == [1, 2, 3]
        assert frames.shape == want.shape
        assert np.abs(frames.astype(int) - want.astype(int)).max() <= 1
        # a follower dies: the next shot loses the generator (the director retries it elsewhere)
        follower = ray.get(leader.__ray_call__.remote(lambda self: self.followers[0]))
        ray.kill(follower, no_restart=True)
        with pytest.raises(ACTOR_LOST):
            _stream(leader, _request(2), "t2")
    finally:
        release_gang(leader, pg)


def test_gang8_manifest_is_one_gang_per_pod():
    from pathlib import Path

    import yaml

    from storymem.config import StoryMemConfig

    config_map, patch = yaml.safe_load_all((Path(__file__).resolve().parents[1] / "cluster" / "gang8.yaml").read_text())
    data = yaml.safe_load(config_map["data"]["storymem.yaml"])
    cfg = StoryMemConfig.model_validate(data)
    group = next(g for g in patch["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu8")
    gpus = int(group["rayStartParams"]["num-gpus"])
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpus == limits["nvidia.com/gpu"] == cfg.parallel.world_size == cfg.engine.gpus_per_generator == 8
    assert cfg.engine.num_generators == group["replicas"]
    assert 40 % cfg.parallel.ulysses_degree == 0  # Wan 14B heads


@pytest.mark.slow
def test_engine_runs_a_story_on_a_gang(ray_local, s3_server):
    """The pool leases a 2-rank gang like a single generator: a whole story through the engine."""
    import time
    import uuid

    import ray

    from actors import start_engine
    from storymem.config import StoryMemConfig

    storage = s3_server.storage_config(f"gang-{uuid.uuid4().hex[:12]}", retries=2, backoff_s=0.1)
    cfg = StoryMemConfig(
        storage=storage,
        engine={"num_generators": 1, "cpus_per_generator": 2, "num_scorers": 1, "namespace": f"gang-{uuid.uuid4().hex[:8]}"},
        parallel={"ulysses_degree": 2, "collective_timeout_s": 60},
    )
    engine = start_engine(cfg)
    try:
        script = {"story_name": "gang", "settings": {"width": 64, "height": 48, "num_frames": 5, "num_inference_steps": 3},
                  "shots": [{"prompt": "a red fox runs", "cut": True}, {"prompt": "the fox sleeps", "cut": True}]}
        from storymem.service.intake import normalise  # the engine takes validated requests only

        request = normalise(script, profile=ray.get(engine.profile.remote(), timeout=120))
        story = ray.get(engine.submit.remote(request), timeout=60)["id"]
        deadline = time.monotonic() + 300
        while (status := ray.get(engine.status.remote(story), timeout=60))["state"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["state"] == "done", status.get("error")
        assert ray.get(engine.health.remote(), timeout=60)["generators"] == 1
        # the generator is a gang: one placement group of 2 bundles (one per rank)
        gangs = [g for g in ray.util.placement_group_table().values()
                 if g["name"].endswith("-gang") and g["state"] == "CREATED"]
        assert [len(g["bundles"]) for g in gangs] == [2]
    finally:
        ray.kill(engine, no_restart=True)
