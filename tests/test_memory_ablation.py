"""GenerationSettings.use_memory=False: the story loop's 'memory removed' ablation (bench/proof.py's
condition) gives exactly the pipeline called without memory, shot 1 and transitions unchanged."""

import numpy as np
import pytest

from storymem.config import ModelConfig, StoryMemConfig
from storymem.memory import MemoryBank
from storymem.pipeline import build_pipeline
from storymem.scoring import Scorer
from storymem.script import load_request
from storymem.storage import LocalStore, StoryLayout
from storymem.story import PipelineGenerator, StoryRunner

TINY = dict(width=48, height=32, num_frames=9, num_inference_steps=3, guidance_scale=2.0)


class Recording(PipelineGenerator):
    """Keeps every request and its exact frames (the stored MP4s are lossy)."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.calls = []

    def generate(self, request, step_callback=None):
        result = super().generate(request, step_callback)
        self.calls.append((request, result.frames))
        return result


@pytest.fixture(scope="module")
def models():
    cfg = StoryMemConfig(model=ModelConfig(embedded_weights="random"))
    pipe, _ = build_pipeline(cfg.model)
    return cfg, pipe, Scorer(cfg.scoring)


def _story(models, folder, use_memory):
    cfg, pipe, scorer = models
    req = load_request({
        "story_name": "ablation",
        "shots": [{"prompt": f"shot {i}: a small robot in a garden", "cut": c} for i, c in enumerate((True, False, True))],
        "settings": {**TINY, "transition": "mi2v", "seed": 7, "use_memory": use_memory},
    })
    generator = Recording(pipe)
    store = LocalStore(folder)
    runner = StoryRunner(store, StoryLayout("s", prefix=""), req.script, req.settings, generator, scorer, cfg.memory)
    return runner.run(), generator.calls, store


def test_memory_removed_equals_the_pipeline_without_memory(models, tmp_path):
    _, pipe, _ = models
    with_memory, calls_on, _ = _story(models, tmp_path / "on", True)
    removed, calls_off, store = _story(models, tmp_path / "off", False)
    assert removed.state == "done"
    assert [r.mode for r in with_memory.shots] == ["t2v", "mi2v", "m2v"]
    assert [r.mode for r in removed.shots] == ["t2v", "mi2v", "t2v"]  # the M2V shot is made from text alone
    assert all(r.memory_used == [] for r in removed.shots)
    assert all(not request.memory for request, _ in calls_off)

    s = dict(TINY, guidance_scale_2=None, memory_guidance_scale=1.0, shift=4.0)
    prompts = [f"shot {i}: a small robot in a garden" for i in range(3)]
    np.testing.assert_array_equal(calls_off[0][1], calls_on[0][1])  # shot 1 unchanged
    # The transition keeps its motion frame (shot 1's last frame), only memory goes.
    transition = pipe(prompts[1], motion_frames=calls_off[0][1][-1:], seed=8, **s).frames
    np.testing.assert_array_equal(calls_off[1][1], transition)
    plain = pipe(prompts[2], seed=9, **s).frames
    np.testing.assert_array_equal(calls_off[2][1], plain)
    # With memory the same shot differs: the ablation removes something the story used.
    assert np.abs(calls_on[2][1].astype(int) - plain.astype(int)).mean() > 1.0

    # The bank is still kept and stored: the run shows what memory would have held.
    after_first = MemoryBank.from_bytes(store.get_bytes(removed.shots[0].memory_state)).describe()
    reference = MemoryBank.from_bytes((tmp_path / "on" / with_memory.shots[0].memory_state).read_bytes()).describe()
    assert after_first == reference and len(after_first) >= 1
    assert all(store.exists(r.memory_state) for r in removed.shots)
