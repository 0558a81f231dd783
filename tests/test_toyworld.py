"""The synthetic world: rendering, identity hidden from prompts, held-out split, the pixel metric.
(The shipped tiny model keeping a held-out character through memory: tests/test_proof.py.)"""

import re

import numpy as np
import pytest

from storymem import toyworld as tw


def test_story_script_loads_and_its_reference_is_the_character():
    from storymem.script import StoryScript

    story = tw.make_stories(1, 4, seed=5, split="heldout")[0]
    plain = StoryScript.model_validate(story.script())
    assert [s.prompt for s in plain.shots] == story.prompts and not plain.reference_images
    custom = StoryScript.model_validate(story.script(reference=True))
    image = custom.reference_images[0].load()
    np.testing.assert_array_equal(image, tw.render_shot(story.character, story.shots[0])[6])
    assert tw.identity_error(image[None], tw.render_shot(story.character, story.shots[1]))["colour"] < 0.05


def test_render_shapes_colours_and_determinism():
    story = tw.make_stories(1, 3, seed=3, split="train")[0]
    shots = tw.render_story(story)
    assert len(shots) == 3 and all(s.shape == (13, 48, 64, 3) and s.dtype == np.uint8 for s in shots)
    np.testing.assert_array_equal(shots[0], tw.render_story(story)[0])
    for shot, spec in zip(shots, story.shots):
        corner = shot[0, 0, 0].astype(int)
        # The top row is the background at its lightest gradient step (x1.08).
        expected = np.clip(np.asarray(tw.BACKGROUNDS[spec.background]) * 1.08, 0, 255)
        assert np.abs(corner - expected).max() <= 2


def test_plain_character_has_its_body_colour():
    char = tw.Character("circle", "red", "red", "plain", 13)
    shot = tw.ToyShot("stands still", "blue", 0.5, 0.5, 0.3)
    frames = tw.render_shot(char, shot)
    mask = tw.character_mask(frames)
    assert 450 < mask[0].sum() < 600  # a radius-13 disc covers ~530 pixels
    inner = frames[0][mask[0]].astype(float).mean(axis=0)
    assert np.linalg.norm(inner - np.asarray(tw.COLOURS["red"])) < 25


def test_actions_move_the_character():
    char = tw.Character("square", "yellow", "cyan", "band", 10)
    xs = {}
    for action in ("moves left", "moves right", "stands still"):
        frames = tw.render_shot(char, tw.ToyShot(action, "navy", 0.5, 0.5, 0.4))
        m = tw.character_mask(frames)
        xs[action] = [np.nonzero(m[i])[1].mean() for i in (0, -1)]
    assert xs["moves left"][1] < xs["moves left"][0] - 10
    assert xs["moves right"][1] > xs["moves right"][0] + 10
    assert abs(xs["stands still"][1] - xs["stands still"][0]) < 1


def test_prompts_never_name_the_identity():
    identity_words = set(tw.COLOURS) | set(tw.SHAPES) | set(tw.PATTERNS)
    for story in tw.make_stories(30, 6, seed=0, split="any"):
        for prompt in story.prompts:
            words = set(re.findall(r"[a-z]+", prompt))
            assert not words & identity_words, prompt
            assert story.shots[0].background in prompt or any(b in prompt for b in tw.BACKGROUNDS)


def test_prompts_say_where_the_action_happens():
    assert tw.ToyShot("jumps", "blue", 0.3, 0.35, 0.3).where == "in the upper left"
    assert tw.ToyShot("jumps", "blue", 0.5, 0.5, 0.3).where == "in the middle"
    shot = tw.ToyShot("moves down", "grey", 0.7, 0.5, 0.3, template=1)
    assert shot.prompt == "on a grey background, the character moves down on the right"


def test_held_out_identities_never_occur_in_training():
    train = {s.character.key for s in tw.make_stories(200, 1, seed=1, split="train")}
    held = {s.character.key for s in tw.make_stories(50, 1, seed=2, split="heldout")}
    assert train and held and not train & held
    assert all(tw.Character(*k.split("/")[:4], int(k.split("/")[4])).split == "heldout" for k in held)


def test_identity_error_separates_characters():
    a = tw.Character("circle", "red", "white", "dot", 13)
    b = tw.Character("diamond", "cyan", "yellow", "plain", 10)
    s1 = tw.ToyShot("moves left", "blue", 0.5, 0.5, 0.4)
    s2 = tw.ToyShot("jumps", "olive", 0.4, 0.6, 0.3)
    same = tw.identity_error(tw.render_shot(a, s2), tw.render_shot(a, s1))
    other = tw.identity_error(tw.render_shot(b, s2), tw.render_shot(a, s1))
    assert same["colour"] < 0.05 and same["shape"] < 0.25 and same["found"] == 1.0
    assert other["colour"] > 0.2 and other["shape"] > same["shape"]
    empty = np.full((13, 48, 64, 3), 90, np.uint8)
    assert tw.identity_error(empty, tw.render_shot(a, s1)) == {"colour": 1.0, "shape": 1.0, "found": 0.0}


def test_training_set_manifest(tmp_path):
    from storymem.training import read_clip_manifest

    manifest = tw.write_training_set(tmp_path, num_stories=3, shots_per_story=2, seed=5)
    records = read_clip_manifest(manifest)
    assert len(records) == 6 and len({r.group_id for r in records}) == 3
    clip = np.load(tmp_path / records[0].path)
    assert clip.shape == (13, 48, 64, 3) and clip.dtype == np.uint8
    assert records[0].prompt == tw.make_stories(3, 2, seed=5)[0].prompts[0]
    mask = np.load(tmp_path / records[0].subject_mask)
    assert mask.shape == clip.shape[:3] and (mask == tw.character_mask(clip)).all() and mask.any()


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="shape"):
        tw.Character("star", "red", "red", "plain", 7)
    with pytest.raises(ValueError, match="background"):
        tw.ToyShot("jumps", "pink", 0.5, 0.5, 0.3)
    with pytest.raises(ValueError, match="split"):
        tw.make_stories(1, 1, 0, split="test")
