"""The shipped tiny bundle keeps a held-out character through memory (issue 13's proof, in small).

bench/proof.py measures the same at full size (16 stories x 6 shots, two draws; docs/proof.md);
here a few held-out stories go through the same code (storymem.proof: the real pipeline, the real
memory bank with the trained embedded scorer), in both settings."""

import pytest

# Measured on this draw (8 stories x 4 shots) with the shipped bundle (the fourth bundle's M2V experts and
# its text-to-video transformer, which makes the shots without memory, continued at 3x on the character;
# 2026-12-04): reference 0.125 with memory, 0.238 removed, shape 0.245 vs 0.332; generated 0.125 vs 0.184,
# shape 0.261 vs 0.362, the character in 100% of shots with memory (the T2V before the continuation:
# 0.215 and 0.156 removed). Issue 13's targets hold on both
# docs draws at full size (docs/proof.md: 16 stories x 6 shots); a draw of 24 shots is noisier, so the
# bounds hold what the bundle does here, with room for float noise, so that a worse bundle fails (the
# second bundle scored 0.179 with memory on the first 5 of these stories). 8 stories, not 5: the 90%
# bound then allows two shots without the character, not one.
REFERENCE_WITH, REFERENCE_REMOVED, REFERENCE_RATIO = 0.15, 0.20, 0.65
GENERATED_SHOWN = 0.9

from storymem import toyworld
from storymem.config import ModelConfig, ScoringConfig
from storymem.models import EMBEDDED_BUNDLE


@pytest.fixture(scope="module")
def trained():
    from storymem.pipeline import build_pipeline
    from storymem.proof import story_settings
    from storymem.scoring import Scorer

    assert EMBEDDED_BUNDLE.exists(), f"{EMBEDDED_BUNDLE}: the trained tiny bundle ships with the package"
    pipe, profile = build_pipeline(ModelConfig(device="cpu"))
    assert EMBEDDED_BUNDLE.name in profile.name
    scorer = Scorer(ScoringConfig(clip_model="tiny"))
    assert scorer.cfg.uses_trained_embedded
    settings = story_settings(profile)
    # A draw other than the docs' two (2026, 7): the proof must hold for any draw.
    stories = toyworld.make_stories(8, 4, seed=11, split="heldout")
    return pipe, scorer, settings, stories


def _run(trained, first):
    from storymem.proof import evaluate

    pipe, scorer, settings, stories = trained
    res = evaluate(pipe, scorer, stories, first=first, settings=settings)["results"]
    m, r = res["memory"], res["no_memory"]
    print(f"{first}: colour {m['colour_error']:.3f} vs {r['colour_error']:.3f} removed, shape {m['shape_error']:.3f} vs "
          f"{r['shape_error']:.3f}, shots with the character {m['shots_with_character']:.0%} vs {r['shots_with_character']:.0%}")
    return m, r


def test_rendered_first_appearance_is_kept_through_memory(trained):
    m, r = _run(trained, "reference")
    assert m["memory_frames"] >= 1
    assert m["colour_error"] <= REFERENCE_WITH and r["colour_error"] >= REFERENCE_REMOVED, (m, r)
    assert m["colour_error"] < REFERENCE_RATIO * r["colour_error"], (m, r)
    assert m["shape_error"] < r["shape_error"], (m, r)


def test_generated_first_appearance_keeps_a_character_in_memory_shots(trained):
    """Shot 1 from text: the bank holds its first frame after frame 0 with a clearly visible character
    (the trained scorer's quality filter), memory-conditioned shots still draw one in most shots, and
    they are closer to shot 1's character than shots made without memory."""
    m, r = _run(trained, "generated")
    assert m["memory_frames"] >= 0.8  # a story whose shot 1 shows no character has an empty bank
    assert m["shots_with_character"] >= GENERATED_SHOWN, m
    assert m["colour_error"] < r["colour_error"], (m, r)
    assert m["shape_error"] < r["shape_error"], (m, r)  # the text-to-video model's shapes vary; memory keeps shot 1's
