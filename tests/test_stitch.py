from __future__ import annotations

import numpy as np
import pytest

from storymem import stitch as st


def _video(num_frames: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients (codec-friendly, so the PSNR bound is meaningful), distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        for c in range(3):
            v = 127 + 100 * np.sin(x / 9.0 + y / 13.0 * (c + 1) + phase[c] + 0.3 * t)
            frames[t, :, :, c] = v.astype(np.uint8)
    return frames


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_write_read_round_trip(tmp_path, backend):
    frames = _video(12, seed=1)
    path = tmp_path / "v.mp4"
    with st.VideoWriter(path, fps=16, crf=18, backend=backend) as writer:
        writer.write(frames)
    out = st.read_video(path)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert _psnr(out, frames) > 30
    # The decoded video follows the input frame by frame, not just on average.
    for t in range(len(frames)):
        assert _psnr(out[t], frames[t]) > _psnr(out[t], frames[(t + 6) % len(frames)])
    info = st.probe_video(path)
    assert info == {"frames": 12, "fps": 16.0, "width": 64, "height": 48, "codec": "h264"}
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary file left behind


def test_write_video_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "v.mp4"
    st.write_video(_video(4, seed=2), path)
    first = path.read_bytes()
    with pytest.raises(ValueError, match="width"):
        st.write_video(_video(4, width=63), path)
    assert path.read_bytes() == first  # a failed write leaves the old file intact
    st.write_video(_video(6, seed=3), path, fps=8)
    assert st.probe_video(path)["frames"] == 6 and st.probe_video(path)["fps"] == 8.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.mp4"]


@pytest.mark.parametrize(("height", "width", "field"), [(47, 64, "height"), (48, 65, "width")])
def test_odd_size_rejected(tmp_path, height, width, field):
    with pytest.raises(ValueError, match=field):
        st.write_video(_video(2, height=height, width=width), tmp_path / "v.mp4")
    with pytest.raises(ValueError, match=field):
        st.encode_video(_video(2, height=height, width=width))
    assert not (tmp_path / "v.mp4").exists()


def test_bad_frames_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        st.write_video(_video(2).astype(np.float32), tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="shape"):
        st.write_video(np.zeros((2, 8, 8, 4), np.uint8), tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="fps"):
        st.write_video(_video(2), tmp_path / "v.mp4", fps=0)


def test_encode_video_playable():
    frames = _video(10, seed=4)
    data = st.encode_video(frames, fps=24)
    assert data[4:8] == b"ftyp"
    info = st.probe_video(data)
    assert info["codec"] == "h264" and info["fps"] == 24.0
    assert (info["frames"], info["height"], info["width"]) == (10, 48, 64)
    assert _psnr(st.read_video(data), frames) > 30


@pytest.mark.parametrize(
    ("cut", "transition", "expected"),
    [
        (True, "none", 0),
        (True, "mi2v", 0),
        (True, "mm2v", 0),
        (False, "none", 0),
        (False, "mi2v", 1),
        (False, "mm2v", 5),
        (False, "MM2V", 5),
    ],
)
def test_overlap_frames_table(cut, transition, expected):
    assert st.overlap_frames(cut, transition) == expected


def test_overlap_frames_accepts_enum():
    from enum import Enum

    class Mode(str, Enum):
        MI2V = "mi2v"
        MM2V = "mm2v"

    assert st.overlap_frames(False, Mode.MM2V) == 5
    assert st.overlap_frames(False, Mode.MI2V) == 1
    with pytest.raises(ValueError, match="transition"):
        st.overlap_frames(False, "i2v")
    with pytest.raises(ValueError, match="cut"):
        st.overlap_frames("no", "mi2v")


def test_stitch_drops():
    shots = [_video(9, seed=10), _video(7, seed=11), _video(8, seed=12)]
    drops = [0, 1, 5]
    out = st.stitch(shots, drops)
    assert len(out) == sum(map(len, shots)) - sum(drops)
    np.testing.assert_array_equal(out[0], shots[0][0])
    np.testing.assert_array_equal(out[len(shots[0])], shots[1][drops[1]])
    np.testing.assert_array_equal(out[len(shots[0]) + len(shots[1]) - drops[1]], shots[2][drops[2]])
    np.testing.assert_array_equal(out[-1], shots[2][-1])


@pytest.mark.parametrize(
    ("drops", "field"),
    [([1, 0], r"drops\[0\]"), ([0], "drops"), ([0, 7], r"drops\[1\]"), ([0, -1], r"drops\[1\]")],
)
def test_stitch_bad_drops(drops, field):
    with pytest.raises(ValueError, match=field):
        st.stitch([_video(3), _video(7)], drops)


def test_stitch_size_mismatch():
    with pytest.raises(ValueError, match=r"shots\[1\]"):
        st.stitch([_video(3), _video(3, height=32)], [0, 0])


def test_stitch_files_matches_stitch_to_file(tmp_path):
    shots = [_video(9, seed=20), _video(6, seed=21), _video(8, seed=22)]
    drops = [0, 1, 5]
    expected = sum(map(len, shots)) - sum(drops)

    n_arrays = st.stitch_to_file(shots, drops, tmp_path / "a.mp4", fps=16)
    stored = [tmp_path / "s0.mp4", st.encode_video(shots[1]), tmp_path / "s2.mp4"]
    st.write_video(shots[0], stored[0])
    st.write_video(shots[2], stored[2])
    n_files = st.stitch_files(stored, drops, tmp_path / "b.mp4", fps=16)

    assert n_arrays == n_files == expected
    a, b = st.read_video(tmp_path / "a.mp4"), st.read_video(tmp_path / "b.mp4")
    assert len(a) == len(b) == expected
    reference = st.stitch(shots, drops)
    assert _psnr(a, reference) > 30 and _psnr(b, reference) > 28  # b went through two encodes
    # Shot boundaries land where the drops put them.
    boundary = len(shots[0])
    assert _psnr(b[boundary], shots[1][drops[1]]) > _psnr(b[boundary], shots[1][0])


def test_stitch_files_rejects_drop_beyond_shot(tmp_path):
    data = st.encode_video(_video(4))
    with pytest.raises(ValueError, match=r"drops\[1\]"):
        st.stitch_files([data, data], [0, 4], tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_encoding_is_deterministic(tmp_path, backend):
    """Same frames, same bytes, whatever ran before (a resumed story re-stitches and must match).
    32x32 noise is a size where x264's macroblock tree used to vary run to run."""
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (25, 32, 32, 3), dtype=np.uint8)
    other = st.encode_video(rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
    digests = set()
    for i in range(6):
        st.read_video(other)  # churn the codec's heap between encodes
        path = tmp_path / f"{i}.mp4"
        with st.VideoWriter(path, backend=backend) as writer:
            writer.write(frames)
        digests.add(path.read_bytes())
    assert len(digests) == 1


# ----------------------------------------------------------------- remux


def _stored(shots, drops, backend="auto", **kw):
    """The shots as the story runner stores them: an IDR frame where each shot's kept part begins."""
    return [_encode(frames, backend=backend, keyframes=[d] if d else None, **kw) for frames, d in zip(shots, drops)]


def _encode(frames, backend="auto", **kw):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shot.mp4"
        with st.VideoWriter(path, backend=backend, **kw) as writer:
            writer.write(frames)
        return path.read_bytes()


def _kept(stored, drops):
    return np.concatenate([st.read_video(v)[d:] for v, d in zip(stored, drops)])


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_remuxed_story_decodes_to_exactly_the_kept_frames(tmp_path, backend):
    # Cuts, MI2V (drop 1) and MM2V (drop 5) continuations in one video.
    shots = [_video(13, seed=30 + k) for k in range(6)]
    drops = [0, 1, 0, 5, 5, 1]
    stored = _stored(shots, drops, backend=backend)
    # The forced IDR frame holds: the shot alone still decodes (and its frames before the cut are
    # not needed after it, which the equality below checks: the final never sees them).
    report = st.stitch_videos(stored, drops, tmp_path / "final.mp4")
    assert report.method == "remux" and report.reason is None
    assert report.frames == sum(map(len, shots)) - sum(drops)
    final = st.read_video(tmp_path / "final.mp4")
    np.testing.assert_array_equal(final, _kept(stored, drops))
    info = st.probe_video(tmp_path / "final.mp4")
    assert info["frames"] == report.frames and info["fps"] == 16.0 and info["codec"] == "h264"
    # Same shots -> same bytes, for the shots and for the final video.
    assert _stored(shots, drops, backend=backend) == stored
    st.stitch_videos(stored, drops, tmp_path / "again.mp4")
    assert (tmp_path / "again.mp4").read_bytes() == (tmp_path / "final.mp4").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.mp4", "final.mp4"]


def test_cut_off_a_keyframe_falls_back_to_reencoding(tmp_path):
    shots = [_video(13, seed=40), _video(13, seed=41), _video(13, seed=42)]
    drops = [0, 5, 1]
    stored = [st.encode_video(s) for s in shots]  # no IDR at frames 5 and 1 (shots stored before)
    with pytest.raises(st.RemuxUnsupported, match="shot 1: frame 5.*not an IDR"):
        st.stitch_videos(stored, drops, tmp_path / "final.mp4", method="remux")
    assert list(tmp_path.iterdir()) == []  # the failed remux left nothing
    report = st.stitch_videos(stored, drops, tmp_path / "final.mp4")
    assert report.method == "reencode" and "not an IDR keyframe" in report.reason
    final = st.read_video(tmp_path / "final.mp4")
    assert final.shape == (39 - 6, 48, 64, 3)
    assert _psnr(final, _kept(stored, drops)) > 30  # the same frames, one generation further


@pytest.mark.parametrize(
    ("kw", "differ"), [({"crf": 30}, "extradata"), ({"fps": 8}, "frame rate")]
)
def test_shots_with_other_codec_parameters_are_reencoded(tmp_path, kw, differ):
    shots = [_video(9, seed=50), _video(9, seed=51), _video(9, seed=52)]
    drops = [0, 1, 0]
    stored = _stored(shots[:2], drops[:2]) + [_encode(shots[2], **kw)]
    report = st.stitch_videos(stored, drops, tmp_path / "final.mp4", fps=16)
    assert report.method == "reencode" and report.reason.startswith("shot 2:") and differ in report.reason
    assert report.as_dict()["method"] == "reencode" and st.probe_video(tmp_path / "final.mp4")["frames"] == 26
    # Without the odd shot the same shots remux.
    assert st.stitch_videos(stored[:2], drops[:2], tmp_path / "two.mp4").method == "remux"
