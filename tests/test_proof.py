"""The shipped tiny bundle keeps a held-out character through memory (issue 13's proof, in small).

bench/proof.py measures the same at full size (16 stories x 6 shots, two draws; docs/proof.md);
here a few held-out stories go through the same code (storymem.proof: the real pipeline, the real
memory bank with the trained embedded scorer), in both settings."""

import pytest

# Measured on this draw with the shipped (fourth) bundle and the bank cut of 7.5 (2026-12-03): reference
# 0.130 with memory, 0.265 removed (the second bundle: 0.179 vs 0.369); generated 0.171 vs 0.159, the
# character in 93% of shots with memory (the cut of 9: 0.136, 100%; the second bundle: 80%). Of issue 13's
# targets, 90% of generated shots is met here and on both docs draws, 0.12 on both docs draws but not on
# this smaller one, 0.75 x removed nowhere (docs/proof.md, docs/identity.md).
# The bounds hold what the bundle does, with room for float noise, so that a worse bundle (the
# second and third included) fails.
REFERENCE_WITH, REFERENCE_REMOVED, REFERENCE_RATIO = 0.15, 0.25, 0.55
GENERATED_SHOWN = 0.9

from storymem import toyworld
from storymem.config import ModelConfig, ScoringConfig
from storymem.models import EMBEDDED_BUNDLE


@pytest.fixture(scope="module")
def trained():
    from storymem.pipeline import build_pipeline
    from storymem.proof import generation_kwargs
    from storymem.scoring import Scorer

    assert EMBEDDED_BUNDLE.exists(), f"{EMBEDDED_BUNDLE}: the trained tiny bundle ships with the package"
    pipe, profile = build_pipeline(ModelConfig(device="cpu"))
    assert EMBEDDED_BUNDLE.name in profile.name
    scorer = Scorer(ScoringConfig(clip_model="tiny"))
    assert scorer.cfg.uses_trained_embedded
    gen, max_memory = generation_kwargs(profile)
    # A draw other than the docs' two (2026, 7): the proof must hold for any draw.
    stories = toyworld.make_stories(5, 4, seed=11, split="heldout")
    return pipe, scorer, gen, max_memory, stories


def _run(trained, first):
    from storymem.proof import evaluate

    pipe, scorer, gen, max_memory, stories = trained
    res = evaluate(pipe, scorer, stories, first=first, gen=gen, max_memory=max_memory)["results"]
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
    """Shot 1 from text: the bank holds its first frame with a clearly visible character (the trained
    scorer's quality filter), and memory-conditioned shots still draw one in most shots."""
    m, r = _run(trained, "generated")
    assert m["memory_frames"] >= 0.8  # a story whose shot 1 shows no character has an empty bank
    assert m["shots_with_character"] >= GENERATED_SHOWN, m
