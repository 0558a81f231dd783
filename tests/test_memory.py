import io
import math

import numpy as np
import pytest

from storymem.config import MemoryConfig
from storymem.memory import MemoryBank, MemoryFrame, select_keyframes


def on_circle(degrees, dim: int = 8) -> np.ndarray:
    """Unit vectors in the first two coordinates: cosine similarity = cos(angle difference)."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    out = np.zeros((len(rad), dim), dtype=np.float32)
    out[:, 0], out[:, 1] = np.cos(rad), np.sin(rad)
    return out


def reference_select(emb, quality, memory, cfg: MemoryConfig) -> list[int]:
    """Plain restatement of method.md, independent of the library's code path."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    n = len(emb)
    if not isinstance(cfg.quality_threshold, float):  # None, or 'auto' with no scorer known
        ok = list(range(n))
    else:
        ok = [i for i in range(n) if quality[i] >= cfg.quality_threshold]
        if not ok:
            return []
    steps = 0
    while True:
        th = cfg.threshold_start - steps * cfg.threshold_step
        chosen = [ok[0]]
        for i in ok[1:]:
            if float(np.dot(emb[i], emb[chosen[-1]])) < th:
                chosen.append(i)
        if len(chosen) <= cfg.max_keyframes_per_shot:
            break
        steps += 1
    if memory is not None and len(memory):
        mem = memory / np.linalg.norm(memory, axis=1, keepdims=True)
        chosen = [i for i in chosen if max(float(np.dot(emb[i], m)) for m in mem) <= cfg.dedupe_threshold]
    return sorted(chosen)


def test_threshold_lowered_until_cap():
    # Consecutive frames 26 degrees apart: cos 26 = 0.8988 < 0.9, so 0.9 keeps all five frames.
    emb = on_circle([0, 26, 52, 78, 104])
    cfg = MemoryConfig()
    assert cfg.max_keyframes_per_shot == 3
    at_start = select_keyframes(emb, None, None, cfg.model_copy(update={"max_keyframes_per_shot": 16}))
    assert at_start == [0, 1, 2, 3, 4]
    # At 0.89 a frame must be > arccos(0.89) = 27.1 degrees from the last keyframe: every other one.
    assert math.degrees(math.acos(0.89)) > 26
    assert select_keyframes(emb, None, None, cfg) == [0, 2, 4]


def test_matches_reference_loop_on_random_embeddings():
    rng = np.random.default_rng(3)
    cfg = MemoryConfig(max_keyframes_per_shot=3, threshold_start=0.9, threshold_step=0.01)
    hit_lowering = 0
    for _ in range(20):
        base = rng.normal(size=16)
        emb = (base + rng.normal(scale=0.5, size=(24, 16))).astype(np.float32)
        got = select_keyframes(emb, None, None, cfg)
        assert got == reference_select(emb, None, None, cfg)
        assert 1 <= len(got) <= 3
        unn = select_keyframes(emb, None, None, cfg.model_copy(update={"max_keyframes_per_shot": 16}))
        hit_lowering += len(unn) > 3
    assert hit_lowering > 0  # the cases exercised the threshold loop


def test_quality_filter_excludes_low_frames():
    emb = on_circle([0, 60, 120, 180])
    quality = np.array([1.0, 5.0, 0.5, 5.0])
    cfg = MemoryConfig(quality_threshold=3.0, max_keyframes_per_shot=4)
    got = select_keyframes(emb, quality, None, cfg)
    # The first passing frame (1) starts the chain even though frame 0 comes earlier.
    assert got == [1, 3]
    assert got == reference_select(emb, quality, None, cfg)


def test_first_keyframe_is_first_passing_frame():
    emb = on_circle([0, 1, 2, 3, 4, 5])  # all near-identical: only the chain's start survives
    quality = np.array([0.0, 0.0, 4.0, 9.0, 9.0, 9.0])
    assert select_keyframes(emb, quality, None, MemoryConfig(quality_threshold=3.0)) == [2]


def test_no_frame_passing_quality_gives_no_keyframe():
    # As the authors' selection: a shot none of whose frames is good enough leaves memory as it was
    # (the best of the bad frames is not taken).
    emb = on_circle([0, 90, 180, 270])
    quality = np.array([0.1, 0.7, 0.3, 0.2])
    cfg = MemoryConfig(quality_threshold=3.0)
    assert select_keyframes(emb, quality, None, cfg) == [] == reference_select(emb, quality, None, cfg)
    bank = MemoryBank(max_size=10, fix=3)
    assert bank.update(0, shot_video(num_frames=4), emb, quality, cfg, tail_frames=1) == []
    assert len(bank) == 0 and bank.tail.shape == (1, 8, 10, 3)  # the tail is still kept for MI2V


def test_quality_threshold_auto_follows_the_scorer(tmp_path):
    from storymem.config import EMBEDDED_QUALITY_THRESHOLD, LAION_AESTHETIC_THRESHOLD, ScoringConfig, StoryMemConfig

    assert MemoryConfig().quality_threshold == "auto"
    # The trained embedded scorer (a head that scores toy-character visibility 0 or 10): its cut.
    assert StoryMemConfig().memory.quality_threshold == EMBEDDED_QUALITY_THRESHOLD == 7.5
    # The seeded one (random aesthetic head): no filter.
    seeded = StoryMemConfig(scoring=ScoringConfig(embedded_scorer="seeded"))
    assert seeded.memory.quality_threshold is None
    weights = tmp_path / "aesthetic.pth"
    weights.write_bytes(b"")
    cfg = StoryMemConfig(scoring=ScoringConfig(aesthetic_weights=weights))
    assert cfg.memory.quality_threshold == LAION_AESTHETIC_THRESHOLD == 4.5
    explicit = StoryMemConfig(scoring=ScoringConfig(aesthetic_weights=weights), memory=MemoryConfig(quality_threshold=6.0))
    assert explicit.memory.quality_threshold == 6.0
    off = StoryMemConfig(scoring=ScoringConfig(aesthetic_weights=weights), memory=MemoryConfig(quality_threshold=None))
    assert off.memory.quality_threshold is None
    # Unresolved 'auto' (no scorer known) filters nothing, even with quality given.
    assert select_keyframes(on_circle([0, 90]), np.array([-5.0, -5.0]), None, MemoryConfig()) == [0, 1]


def test_quality_required_when_threshold_set():
    with pytest.raises(ValueError, match="quality"):
        select_keyframes(on_circle([0, 90]), None, None, MemoryConfig(quality_threshold=1.0))


def test_dedupe_against_memory():
    emb = on_circle([0, 90, 180])
    memory = on_circle([91, 300])  # cos(1 deg) > 0.9 to frame 1; frame 0 is at cos 60 = 0.5
    cfg = MemoryConfig()
    assert select_keyframes(emb, None, None, cfg) == [0, 1, 2]
    got = select_keyframes(emb, None, memory, cfg)
    assert got == [0, 2]
    assert got == reference_select(emb, None, memory, cfg)
    assert select_keyframes(emb, None, np.zeros((0, 8), np.float32), cfg) == [0, 1, 2]


def test_bad_embeddings_rejected():
    with pytest.raises(ValueError, match="embeddings"):
        select_keyframes(np.zeros(4), None, None, MemoryConfig())
    with pytest.raises(ValueError, match="memory_embeddings"):
        select_keyframes(on_circle([0, 90]), None, np.ones((2, 3)), MemoryConfig())


# -- bank ------------------------------------------------------------------------------------------


def frame(shot: int, idx: int, dim: int = 8, size=(4, 6)) -> MemoryFrame:
    rng = np.random.default_rng(shot * 100 + idx + 7)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    emb = rng.normal(size=dim).astype(np.float32)
    return MemoryFrame(img, emb / np.linalg.norm(emb), shot=shot, frame=idx, source="keyframe")


def test_sink_and_window_eviction():
    bank = MemoryBank(max_size=10, fix=3)
    added = [frame(i // 3, i % 3) for i in range(15)]
    for k in range(0, 15, 3):
        bank.add(added[k : k + 3])
    kept = [(f.shot, f.frame) for f in bank.frames]
    expected = [(i // 3, i % 3) for i in [0, 1, 2, 8, 9, 10, 11, 12, 13, 14]]
    assert kept == expected
    assert len(bank) == 10
    assert [d["slot"] for d in bank.describe()] == ["sink"] * 3 + ["window"] * 7
    assert bank.embeddings().shape == (10, 8)


def test_pure_window_and_full_sink():
    bank = MemoryBank(max_size=4, fix=0)
    bank.add([frame(0, i) for i in range(7)])
    assert [f.frame for f in bank.frames] == [3, 4, 5, 6]
    sink_only = MemoryBank(max_size=2, fix=2)
    sink_only.add([frame(0, i) for i in range(5)])
    assert [f.frame for f in sink_only.frames] == [0, 1]


def test_invalid_bank_arguments():
    with pytest.raises(ValueError, match="max_size"):
        MemoryBank(max_size=0)
    with pytest.raises(ValueError, match="fix"):
        MemoryBank(max_size=3, fix=4)
    with pytest.raises(ValueError, match="embedding"):
        MemoryFrame(np.zeros((2, 2, 3), np.uint8), np.ones(4, np.float32), 0, 0, "keyframe")
    with pytest.raises(ValueError, match="image"):
        MemoryFrame(np.zeros((2, 2), np.uint8), np.eye(4, dtype=np.float32)[0], 0, 0, "keyframe")


def shot_video(num_frames=12, h=8, w=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_frames, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("tail_frames", [0, 1, 5])
def test_update_selects_adds_and_keeps_tail(tail_frames):
    video = shot_video()
    # Three distinct poses, four frames each: the chain picks the first frame of each.
    emb = on_circle([0] * 4 + [90] * 4 + [180] * 4)
    bank = MemoryBank(max_size=10, fix=3)
    chosen = bank.update(2, video, emb, None, MemoryConfig(), tail_frames=tail_frames)
    assert chosen == [0, 4, 8]
    assert [(f.shot, f.frame, f.source) for f in bank.frames] == [(2, i, "keyframe") for i in (0, 4, 8)]
    assert all(np.array_equal(f.image, video[f.frame]) for f in bank.frames)
    assert bank.frames[0].image.shape == (8, 10, 3)  # kept at arrival resolution
    if tail_frames == 0:
        assert bank.tail is None
    else:
        assert np.array_equal(bank.tail, video[-tail_frames:])
    # The same poses again: all three are already in memory and are skipped.
    assert bank.update(3, shot_video(seed=1), emb, None, MemoryConfig(), tail_frames=1) == []
    assert len(bank) == 3


def test_keyframes_come_from_the_frames_the_story_keeps():
    # A MM2V shot repeats the previous shot's last 5 frames first; the final video drops them, so
    # keyframes are chosen among frames 5.. only, and reported by their index in the stored shot.
    video = shot_video(num_frames=13)
    emb = on_circle([0] * 5 + [90] * 4 + [180] * 4)  # frames 0..4 distinct and first: chosen when not trimmed
    quality = np.array([9.0] * 5 + [1.0, 5.0, 5.0, 5.0] + [5.0] * 4)
    cfg = MemoryConfig(quality_threshold=3.0)
    assert MemoryBank().update(1, video, emb, quality, cfg, tail_frames=0) == [0, 6, 9]
    bank = MemoryBank()
    chosen = bank.update(1, video, emb, quality, cfg, tail_frames=0, skip=5)
    assert chosen == [6, 9]  # frame 5 fails quality; 6 starts the chain, 9 is the next distinct pose
    assert [(f.shot, f.frame) for f in bank.frames] == [(1, 6), (1, 9)]
    assert all(np.array_equal(f.image, video[f.frame]) for f in bank.frames)
    # MI2V drops one frame.
    assert MemoryBank().update(1, video, on_circle([0] + [90] * 12), None, MemoryConfig(), tail_frames=0, skip=1) == [1]
    with pytest.raises(ValueError, match="skip"):
        MemoryBank().update(1, video, emb, None, MemoryConfig(), tail_frames=0, skip=13)


def test_dedupe_against_an_evicted_keyframe():
    bank = MemoryBank(max_size=2, fix=0)
    bank.update(0, shot_video(num_frames=2), on_circle([0, 0]), None, MemoryConfig(), tail_frames=0)
    bank.update(1, shot_video(num_frames=2), on_circle([90, 90]), None, MemoryConfig(), tail_frames=0)
    bank.update(2, shot_video(num_frames=2), on_circle([180, 180]), None, MemoryConfig(), tail_frames=0)
    assert [f.shot for f in bank.frames] == [1, 2]  # shot 0's keyframe (0 degrees) was evicted
    assert bank.history == [(0, 0), (1, 0), (2, 0)]
    # A pose 1 degree from the evicted keyframe is still a duplicate of what the story saved.
    restored = MemoryBank.from_bytes(bank.to_bytes())  # and the bank's saved state remembers it
    for b in (bank, restored):
        assert b.update(3, shot_video(num_frames=2), on_circle([1, 1]), None, MemoryConfig(), tail_frames=0) == []
        assert b.update(4, shot_video(num_frames=2), on_circle([45, 45]), None, MemoryConfig(), tail_frames=0) == [0]
        assert b.history[-1] == (4, 0)


def test_references_stay_in_sink():
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (16, 12, 3), dtype=np.uint8), rng.integers(0, 256, (6, 20, 3), dtype=np.uint8)]
    bank = MemoryBank(max_size=4, fix=2)
    bank.add_references(refs, on_circle([0, 90]))
    for shot in range(3):
        bank.add([frame(shot, 0), frame(shot, 1)])
    desc = bank.describe()
    assert [(d["shot"], d["source"], d["slot"]) for d in desc[:2]] == [(-1, "reference", "sink")] * 2
    assert [(d["shot"], d["frame"]) for d in desc[2:]] == [(2, 0), (2, 1)]
    assert np.array_equal(bank.images()[1], refs[1])


def _filled_bank() -> MemoryBank:
    rng = np.random.default_rng(5)
    bank = MemoryBank(max_size=5, fix=2)
    bank.add_references([rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)], on_circle([33]))
    bank.update(0, shot_video(seed=2), on_circle([0] * 6 + [120] * 6), None, MemoryConfig(), tail_frames=5)
    return bank


def test_save_load_round_trip(tmp_path):
    bank = _filled_bank()
    for restored in (
        MemoryBank.from_bytes(bank.to_bytes()),
        MemoryBank.load(io.BytesIO(bank.to_bytes())),
        (bank.save(tmp_path / "m.npz"), MemoryBank.load(tmp_path / "m.npz"))[1],
        (bank.save(str(tmp_path / "s.npz")), MemoryBank.load(str(tmp_path / "s.npz")))[1],
    ):
        assert (restored.max_size, restored.fix) == (5, 2)
        assert restored.describe() == bank.describe()
        for a, b in zip(restored.frames, bank.frames):
            assert a.image.dtype == np.uint8 and a.image.tobytes() == b.image.tobytes()
            assert a.image.shape == b.image.shape
            assert a.embedding.dtype == np.float32 and a.embedding.tobytes() == b.embedding.tobytes()
        assert restored.tail.tobytes() == bank.tail.tobytes() and restored.tail.shape == (5, 8, 10, 3)
        assert restored.history == bank.history
        assert restored.saved_embeddings().tobytes() == bank.saved_embeddings().tobytes()
    empty = MemoryBank.from_bytes(MemoryBank(max_size=3, fix=1).to_bytes())
    assert len(empty) == 0 and empty.tail is None and empty.max_size == 3


def test_version_1_state_still_loads():
    bank = _filled_bank()
    arrays = {k: v for k, v in bank._arrays().items() if not k.startswith("history_")}
    arrays["version"] = np.array(1, dtype=np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    old = MemoryBank.from_bytes(buf.getvalue())
    assert old.describe() == bank.describe()
    assert old.history == [(f.shot, f.frame) for f in bank.frames]  # what memory held then


def test_corrupted_or_wrong_file_raises(tmp_path):
    data = bytearray(_filled_bank().to_bytes())
    with pytest.raises(ValueError, match="memory state"):
        MemoryBank.from_bytes(bytes(data[: len(data) // 2]))
    mid = len(data) // 3
    data[mid : mid + 64] = bytes(64)
    with pytest.raises(ValueError, match="memory state"):
        MemoryBank.from_bytes(bytes(data))
    with pytest.raises(ValueError, match="memory state"):
        MemoryBank.from_bytes(b"not a memory bank")
    other = io.BytesIO()
    np.savez_compressed(other, x=np.arange(3))
    with pytest.raises(ValueError, match="memory state"):
        MemoryBank.from_bytes(other.getvalue())
