"""The shipped tiny bundle keeps a held-out character through memory (issue 5's proof, in small).

bench/proof.py measures the same at full size (memory bank, generated first shots, more stories);
here: a rendered first appearance as memory, the next shots generated with and without it."""

import numpy as np
import pytest

from storymem import toyworld
from storymem.config import ModelConfig
from storymem.models import EMBEDDED_BUNDLE
from storymem.script import GenerationSettings


@pytest.fixture(scope="module")
def trained():
    from storymem.pipeline import build_pipeline

    assert EMBEDDED_BUNDLE.exists(), f"{EMBEDDED_BUNDLE}: the trained tiny bundle ships with the package"
    pipe, profile = build_pipeline(ModelConfig(device="cpu"))
    assert EMBEDDED_BUNDLE.name in profile.name
    return pipe, profile


def test_shipped_bundle_keeps_a_held_out_character_through_memory(trained):
    pipe, profile = trained
    s = GenerationSettings().resolve(profile.defaults)
    gen = dict(
        height=s.height, width=s.width, num_frames=s.num_frames, num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale, memory_guidance_scale=s.memory_guidance_scale, shift=s.shift,
    )
    stories = toyworld.make_stories(6, 3, seed=11, split="heldout")
    with_memory, without = [], []
    for i, story in enumerate(stories):
        first = toyworld.render_shot(story.character, story.shots[0], s.height, s.width, s.num_frames)
        memory = [first[0], first[s.num_frames // 2], first[-1]]
        for k in (1, 2):
            seed = 100 * i + k
            a = pipe(story.prompts[k], memory=memory, seed=seed, **gen).frames
            b = pipe(story.prompts[k], seed=seed, **gen).frames
            with_memory.append(toyworld.identity_error(a, first)["colour"])
            without.append(toyworld.identity_error(b, first)["colour"])
    mean_with, mean_without = float(np.mean(with_memory)), float(np.mean(without))
    # Measured 2026-11-26 on this bundle: see docs/proof.md for the full-size numbers.
    print(f"colour error with memory {mean_with:.3f}, without {mean_without:.3f}")
    assert mean_with < 0.7 * mean_without, (mean_with, mean_without)
    assert sum(a < b for a, b in zip(with_memory, without)) >= 0.75 * len(without), (with_memory, without)
