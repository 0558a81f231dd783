"""More than one node: a `ray.cluster_utils.Cluster` (a head and two worker raylets on this
machine), generators only on the workers, artifacts only through S3. Removing the node that holds
the generator mid-story: the story finishes on the other node with the very same video.

The cluster runs in a subprocess, so that this test does not disturb the session's local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, logging, os, sys, tempfile, time, uuid
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import numpy as np, ray
from ray.cluster_utils import Cluster
from actors import start_engine
from actors.client import EngineClient
from storymem.config import EngineConfig, StoryMemConfig
from storymem.s3server import LocalS3Server
from storymem.stitch import read_video
from storymem.storage import S3Store, StoryLayout

STORY = {"shots": [{"prompt": "a kite over a hill"}, {"prompt": "the kite dives", "cut": False},
                   {"prompt": "the kite lands"}],
         "settings": {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 12, "seed": 3}}
out = {}
# Cluster() writes the head's address to Ray's default temp dir whatever temp_dir it is given; a fresh
# machine has none yet.
os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
with LocalS3Server(sys.argv[1]) as s3:
    s3.storage_config().export_credentials()  # every raylet started below inherits the keys
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 200 * 1024**2,
        "temp_dir": tempfile.mkdtemp(prefix="rc-"), "node_ip_address": "127.0.0.1"})
    # Two CPUs a worker: the scorer (1 CPU) may land on a worker too, and its generator must still fit.
    workers = [cluster.add_node(num_cpus=2, resources={"gen": 1}, object_store_memory=100 * 1024**2)
               for _ in range(2)]
    ray.init(address=cluster.address, logging_level=logging.ERROR, log_to_driver=False)
    cfg = StoryMemConfig(storage=s3.storage_config("mn-" + uuid.uuid4().hex[:8]), engine=EngineConfig(
        num_generators=1, generator_resources={"gen": 1}, cpus_per_scorer=1, namespace="mn",
        step_timeout_s=60))
    engine = start_engine(cfg)
    client = EngineClient(engine, cfg=cfg)
    store = S3Store(cfg.storage)
    base = client.submit(STORY)
    out["baseline"] = client.wait(base, progress=False, timeout=300).state.value
    story = client.submit(STORY)
    for e in client.events(story):
        if e.phase.value == "denoise" and e.shot == 1:
            break
    gen = ray.get(engine.internals.remote())["pool"]["generators"][0]
    victim = [w for w in workers if w.node_id == gen["node"]]
    out["on_worker"] = bool(victim)
    cluster.remove_node(victim[0])  # the raylet, its generator and everything else on it
    status = client.wait(story, progress=False, timeout=300)
    out["state"], out["error"] = status.state.value, status.error
    gen_after = ray.get(engine.internals.remote())["pool"]["generators"][0]
    out["moved"] = gen_after["node"] not in (None, gen["node"])
    a = read_video(store.get_bytes(StoryLayout(base).final))
    b = read_video(store.get_bytes(StoryLayout(story).final))
    out["same"] = bool(a.shape == b.shape and np.array_equal(a, b))
    ray.shutdown()
    cluster.shutdown()
print(json.dumps(out))
'''


def test_node_holding_the_generator_removed_mid_story(tmp_path):
    # Ray resolves 127.0.0.1 in a bootstrap address to the machine's own IP, which this sandbox's
    # loopback-only network does not route; with this flag (read at import, so in the subprocess and
    # the raylets it starts) every node and the driver stay on 127.0.0.1.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "s3")], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["baseline"] == "done" and out["on_worker"]
    assert out["state"] == "done", out["error"]
    assert out["moved"] and out["same"]
