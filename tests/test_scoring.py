import json
from dataclasses import asdict

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from storymem.config import ScoringConfig
from storymem.scoring import LAION_HIDDEN, AestheticHead, Scorer, build_tiny_clip, tiny_clip_configs


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(ScoringConfig(clip_model="tiny", batch_size=3))


def structured_images() -> np.ndarray:
    """Images with distinct layouts (random noise all averages to the same thing)."""
    imgs = np.zeros((4, 48, 80, 3), dtype=np.uint8)
    imgs[0, ..., 0] = 255
    imgs[1, ..., 1] = 255
    imgs[2, :24] = 255
    xx = np.arange(80)[None, :, None]
    imgs[3] = (xx * 3 % 256).astype(np.uint8)
    return imgs


def test_deterministic_across_instances_and_rng_untouched(scorer):
    imgs = structured_images()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    other = Scorer(ScoringConfig(clip_model="tiny", batch_size=8))
    after = torch.rand(3)
    assert torch.equal(before, after)  # building the seeded models left the global RNG alone
    a, b = scorer.embed_images(imgs), other.embed_images(imgs)
    np.testing.assert_allclose(a, b, atol=1e-6)  # batch size 3 vs 8 must not matter either
    np.testing.assert_allclose(scorer.aesthetic(a), other.aesthetic(b), rtol=1e-5, atol=1e-6)  # scores ~10


def test_embeddings_shape_norm_and_similarity(scorer):
    imgs = structured_images()
    emb, aes = scorer.score_frames(imgs)
    assert emb.shape == (4, scorer.embed_dim) == (4, 64)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert aes.shape == (4,) and np.all(np.isfinite(aes))
    sim = emb @ emb.T
    off_diag = sim[~np.eye(4, dtype=bool)]
    assert off_diag.max() < 0.999
    same = scorer.embed_images(np.stack([imgs[2], imgs[2]]))
    assert float(same[0] @ same[1]) == pytest.approx(1.0, abs=1e-5)
    assert scorer.embed_images(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 64)


def test_list_of_mixed_sizes_matches_array(scorer):
    imgs = structured_images()
    as_list = scorer.embed_images([imgs[0], imgs[1], np.ascontiguousarray(imgs[2][:, :48]), imgs[3]])
    np.testing.assert_allclose(as_list[[0, 1, 3]], scorer.embed_images(imgs[[0, 1, 3]]), atol=1e-5)
    assert as_list.shape == (4, 64)


def test_crop_preprocessing_close_to_open_clip_transform():
    # image_resize='crop' (storymem eval): open_clip's own PIL pipeline (shortest side, bicubic,
    # centre crop, OpenAI mean/std).
    cropper = Scorer(ScoringConfig(clip_model="tiny", image_resize="crop"))
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 256, (12, 20, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96 x 160
    transform = open_clip.image_transform(64, is_train=False)
    for im in (img, np.ascontiguousarray(img.transpose(1, 0, 2))):
        ref = transform(Image.fromarray(im))
        ours = cropper._preprocess(torch.from_numpy(im)[None])[0]
        assert ours.shape == ref.shape == (3, 64, 64)
        # PIL's and torch's bicubic kernels differ slightly; a misaligned crop would be ~0.1.
        assert float((ours - ref).abs().mean()) < 0.01


def test_default_preprocessing_squashes_the_whole_frame(scorer):
    # The authors' keyframe selection: the whole frame resized to the square input, nothing cropped,
    # then open_clip's mean/std. Reference: PIL bicubic resize of the whole frame.
    assert ScoringConfig().image_resize == "squash"
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 256, (12, 20, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96 x 160
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    for im in (img, np.ascontiguousarray(img.transpose(1, 0, 2))):
        squashed = np.asarray(Image.fromarray(im).resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255.0
        ref = (torch.from_numpy(squashed).permute(2, 0, 1) - mean) / std
        ours = scorer._preprocess(torch.from_numpy(im)[None])[0]
        assert ours.shape == (3, 64, 64)
        assert float((ours - ref).abs().mean()) < 0.01
    # What only the frame's sides show changes the squashed input (a centre crop would never see it).
    sides = np.zeros((48, 128, 3), np.uint8)
    marked = sides.copy()
    marked[:, :20] = 255
    crop = Scorer(ScoringConfig(clip_model="tiny", image_resize="crop"))
    pair = np.stack([sides, marked])
    assert float(crop.embed_images(pair)[0] @ crop.embed_images(pair)[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(scorer.embed_images(pair)[0] @ scorer.embed_images(pair)[1]) < 0.999


def test_text_embeddings(scorer):
    t = scorer.embed_texts(["a red fox in the snow", "a city at night", "a red fox in the snow"])
    assert t.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert float(t[0] @ t[2]) == pytest.approx(1.0, abs=1e-5)
    assert float(t[0] @ t[1]) < 0.999
    with pytest.raises(ValueError, match="texts"):
        scorer.embed_texts("one string")


def test_bad_input_rejected(scorer):
    with pytest.raises(ValueError, match="frames"):
        scorer.embed_images(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        scorer.aesthetic(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="clip_weights"):
        Scorer(ScoringConfig(clip_model="tiny", clip_weights="/nonexistent/w.pt"))


def test_tiny_clip_weights_round_trip(tmp_path, scorer):
    imgs = structured_images()
    trained = build_tiny_clip(seed=7)
    path = tmp_path / "tiny.pt"
    torch.save(trained.state_dict(), path)
    loaded = Scorer(ScoringConfig(clip_model="tiny", clip_weights=path))
    with torch.inference_mode():
        direct = trained.encode_image(loaded._preprocess(torch.from_numpy(imgs)), normalize=True).numpy()
    np.testing.assert_allclose(loaded.embed_images(imgs), direct, atol=1e-6)
    assert not np.allclose(loaded.embed_images(imgs), scorer.embed_images(imgs), atol=1e-3)


def _set(cfg) -> dict:
    return {k: v for k, v in asdict(cfg).items() if v is not None}


def test_registered_architecture_loads_local_file(tmp_path, monkeypatch):
    # Register into copies of open_clip's registry so that the test leaves it as it was.
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    embed_dim, vision, text = tiny_clip_configs()
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "storymem-test-tiny.json").write_text(
        json.dumps({"embed_dim": embed_dim, "vision_cfg": _set(vision), "text_cfg": _set(text)})
    )
    open_clip.add_model_config(cfg_dir)
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in build_tiny_clip(seed=11).state_dict().items()}, str(weights))
    named = Scorer(ScoringConfig(clip_model="storymem-test-tiny", clip_weights=weights))
    assert not named.tiny
    same = Scorer(ScoringConfig(clip_model="tiny", clip_weights=weights))
    imgs = structured_images()
    np.testing.assert_allclose(named.embed_images(imgs), same.embed_images(imgs), atol=1e-5)
    texts = ["two friends on a boat"]
    np.testing.assert_allclose(named.embed_texts(texts), same.embed_texts(texts), atol=1e-5)


def test_aesthetic_weights_round_trip(tmp_path, scorer):
    emb = scorer.embed_images(structured_images())
    head = AestheticHead.seeded(64, (32, 16, 8, 4), seed=99)
    for name in ("head.pth", "head.safetensors"):
        path = tmp_path / name
        if name.endswith(".pth"):
            torch.save(head.state_dict(), path)
        else:
            from safetensors.torch import save_file

            save_file(head.state_dict(), str(path))
        loaded = Scorer(ScoringConfig(clip_model="tiny", aesthetic_weights=path))
        assert loaded.head.hidden == (32, 16, 8, 4)
        with torch.inference_mode():
            expected = head.eval()(torch.from_numpy(emb)).numpy()
        np.testing.assert_allclose(loaded.aesthetic(emb), expected, atol=1e-6)
        # The head normalises its input, so scale does not change the score.
        np.testing.assert_allclose(loaded.aesthetic(emb * 3.0), expected, atol=1e-5)
    assert not np.allclose(scorer.aesthetic(emb), expected, atol=1e-4)


def test_aesthetic_head_laion_layout_and_mismatch(tmp_path):
    head = AestheticHead(768)
    assert head.hidden == LAION_HIDDEN
    assert [k for k in head.state_dict() if k.endswith("weight")] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    wrong = tmp_path / "wrong.pth"
    torch.save(AestheticHead.seeded(32, (8, 8, 8, 8)).state_dict(), wrong)
    with pytest.raises(ValueError, match="aesthetic_weights"):
        Scorer(ScoringConfig(clip_model="tiny", aesthetic_weights=wrong))


def test_trained_embedded_scorer_tells_toy_characters_apart_and_drops_blank_frames():
    """The shipped toy-world scorer (scripts/train_embedded.py): visible characters score above the
    quality cut, the same frames faded to nothing below it; characters are nearer themselves."""
    from storymem import toyworld
    from storymem.config import EMBEDDED_QUALITY_THRESHOLD, EMBEDDED_SCORER, MemoryConfig
    from storymem.training.scorer_recipe import TOY_VISIBILITY_CUT, blend_toward_background, visibility_labels

    assert EMBEDDED_SCORER.is_file(), f"{EMBEDDED_SCORER}: the trained scorer ships with the package"
    cfg = ScoringConfig(clip_model="tiny")
    assert cfg.uses_trained_embedded
    assert MemoryConfig().resolved(cfg).quality_threshold == EMBEDDED_QUALITY_THRESHOLD
    assert MemoryConfig().resolved(ScoringConfig(clip_model="tiny", embedded_scorer="seeded")).quality_threshold is None
    trained = Scorer(cfg)
    stories = toyworld.make_stories(6, 2, seed=5, split="heldout")
    clips = np.stack([toyworld.render_shot(s.character, s.shots[0]) for s in stories])  # (6, 13, 48, 64, 3)
    blank = blend_toward_background(clips, np.zeros(len(clips)))
    assert visibility_labels(blank.reshape(-1, 48, 64, 3)).sum() == 0
    emb, visible_scores = trained.score_frames(clips.reshape(-1, 48, 64, 3))
    _, blank_scores = trained.score_frames(blank.reshape(-1, 48, 64, 3))
    assert (visible_scores >= TOY_VISIBILITY_CUT).mean() > 0.95, visible_scores
    assert (blank_scores < TOY_VISIBILITY_CUT).mean() > 0.95, blank_scores
    # The bank's stricter cut still takes most rendered frames and never a blank one.
    assert (visible_scores >= EMBEDDED_QUALITY_THRESHOLD).mean() > 0.5, visible_scores
    assert (blank_scores >= EMBEDDED_QUALITY_THRESHOLD).sum() == 0, blank_scores
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    char = np.repeat(np.arange(len(clips)), clips.shape[1])
    same = (char[:, None] == char[None, :]) & ~np.eye(len(char), dtype=bool)
    assert sim[same].mean() > sim[char[:, None] != char[None, :]].mean() + 0.3
    # The seeded scorer is what it was: every toy frame nearly alike (why the bank needed a trained one).
    seeded = Scorer(ScoringConfig(clip_model="tiny", embedded_scorer="seeded")).embed_images(clips.reshape(-1, 48, 64, 3))
    s = seeded / np.linalg.norm(seeded, axis=1, keepdims=True)
    assert (s @ s.T)[char[:, None] != char[None, :]].mean() > 0.85
    assert sim[char[:, None] != char[None, :]].mean() < 0.5


def test_toy_scorer_training_learns_visibility():
    """train_toy_scorer on a few toy clips: the visibility loss falls and blank frames score lower."""
    from storymem import toyworld
    from storymem.training.scorer_recipe import blend_toward_background, train_toy_scorer, visibility_labels

    stories = toyworld.make_stories(8, 1, seed=3, split="train")
    clips = np.stack([toyworld.render_shot(s.character, s.shots[0]) for s in stories])
    faded = blend_toward_background(clips, np.array([1.0, 0.0] * 4))
    frames = faded.reshape(-1, 48, 64, 3)
    chars = np.repeat(np.arange(len(clips)), clips.shape[1])
    visible = visibility_labels(frames)
    scorer = Scorer(ScoringConfig(clip_model="tiny", embedded_scorer="seeded"))
    history = train_toy_scorer(scorer, frames, chars, visible, steps=60, batch=32, lr=2e-3)
    assert np.mean(history["visibility"][-10:]) < 0.5 * np.mean(history["visibility"][:5])
    _, q = scorer.score_frames(frames)
    assert q[visible > 0.5].mean() > q[visible < 0.5].mean() + 3.0
