"""ST-Bench metrics on constructed stories: known values, story loading, table and report."""

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from storymem.config import ScoringConfig
from storymem.evaluate import (
    Evaluator,
    FrameAverageEncoder,
    StoryVideos,
    VideoEncoder,
    add_eval_parser,
    consistency_scores,
    find_stories,
    load_story,
    load_video_encoder,
    run_eval,
    sample_frames,
    summary,
    write_report,
    write_metrics_table,
)
from storymem.scoring import Scorer
from storymem.stitch import write_video

RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class MeanColourEncoder:
    """A transparent VideoEncoder: a video is its mean RGB colour, a text the colour it names."""

    def embed_videos(self, videos):
        v = np.stack([np.asarray(x, np.float64).mean(axis=(0, 1, 2)) + 1e-6 for x in videos])
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def embed_texts(self, texts):
        t = np.stack([np.asarray(RGB[next(w for w in t.split() if w in RGB)]) + 1e-6 for t in texts])
        return (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)


def solid(colour, frames=6, size=(32, 32)):
    return np.tile(np.asarray(colour, np.uint8), (frames, *size, 1))


@pytest.fixture(scope="module")
def scorer():
    return Scorer(ScoringConfig(clip_model="tiny"))


def test_identical_shots_are_fully_consistent(scorer):
    rng = np.random.default_rng(0)
    shot = rng.integers(0, 255, (9, 32, 48, 3), dtype=np.uint8)
    story = StoryVideos("same", [shot, shot.copy(), shot.copy()], ["a cat", "a dog", "a bird"])
    m = Evaluator(scorer).evaluate_story(story)
    assert m.consistency == pytest.approx(1.0, abs=1e-5)
    assert m.consistency_top10 == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(m.similarity, np.ones((3, 3)), atol=1e-5)


def test_different_shots_are_less_consistent(scorer):
    rng = np.random.default_rng(1)
    shots = [rng.integers(0, 255, (9, 32, 48, 3), dtype=np.uint8) for _ in range(3)]
    shots[1] = shots[0].copy()
    m = Evaluator(scorer).evaluate_story(StoryVideos("mixed", shots, ["x", "x", "y"]))
    sim = m.similarity
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-5) and sim[0, 2] < 0.9999
    assert m.consistency == pytest.approx((sim[0, 1] + sim[0, 2] + sim[1, 2]) / 3, abs=1e-6)


def test_prompt_following_and_top_pairs_with_a_plugged_encoder(scorer):
    enc = MeanColourEncoder()
    assert isinstance(enc, VideoEncoder)
    shots = [solid((255, 0, 0)), solid((0, 255, 0)), solid((255, 0, 0)), solid((0, 0, 255))]
    prompts = ["a red room", "a green field", "red again", "blue sky"]
    m = Evaluator(scorer, enc, top_pairs=1).evaluate_story(StoryVideos("rgb", shots, prompts))
    assert m.shot_prompt_following == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-4)
    assert m.prompt_following_single == pytest.approx(1.0, abs=1e-4)
    # Pairs: only (0, 2) is identical; the other five are orthogonal colours.
    assert m.consistency == pytest.approx(1 / 6, abs=1e-4)
    # The most related pair by prompt is (0, 2) (both 'red'), whose videos are identical.
    assert m.consistency_top10 == pytest.approx(1.0, abs=1e-4)
    # Whole story: mean colour (1/2, 1/4, 1/4) vs the joined prompts' colour (red).
    expected = 0.5 / np.linalg.norm([0.5, 0.25, 0.25])
    assert m.prompt_following_global == pytest.approx(expected, abs=1e-3)


def test_consistency_scores_top_pairs_by_video():
    v = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]], dtype=np.float32)
    mean, top, sim = consistency_scores(v, top_k=2, by="video")
    pairs = [sim[i, j] for i in range(4) for j in range(i + 1, 4)]
    assert mean == pytest.approx(np.mean(pairs), abs=1e-6)
    assert top == pytest.approx((1.0 + 0.8) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="top_pairs_by"):
        consistency_scores(v, top_k=2, by="colour")
    with pytest.raises(ValueError, match="text_embeddings"):
        consistency_scores(v, top_k=2, by="prompt")


def test_aesthetic_quality_is_the_scaled_predictor_mean(scorer):
    rng = np.random.default_rng(2)
    shots = [rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    m = Evaluator(scorer, frames_per_shot=4).evaluate_story(StoryVideos("aq", shots, ["a", "b"]))
    per_shot = [float(scorer.score_frames(sample_frames(s, 4))[1].mean()) / 10 for s in shots]
    assert m.shot_aesthetic == pytest.approx(per_shot, abs=1e-6)
    assert m.aesthetic_quality == pytest.approx(np.mean(per_shot), abs=1e-6)


def test_frame_average_encoder_matches_mean_of_frames(scorer):
    rng = np.random.default_rng(3)
    video = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    emb = FrameAverageEncoder(scorer, frames_per_video=8).embed_videos([video])[0]
    mean = scorer.embed_images(video).mean(axis=0)
    np.testing.assert_allclose(emb, mean / np.linalg.norm(mean), atol=1e-6)
    with pytest.raises(ValueError, match="video_encoder"):
        load_video_encoder("nonsense", scorer)
    with pytest.raises(ValueError, match="video_encoder"):
        load_video_encoder("json:JSONEncoder", scorer)  # builds, but lacks the protocol's methods


def _write_story(folder, shots, prompts, runner_layout=True, overview=None):
    folder.mkdir(parents=True)
    shot_dir = folder / "shots" if runner_layout else folder
    shot_dir.mkdir(exist_ok=True)
    for k, shot in enumerate(shots):
        write_video(shot, shot_dir / f"{k:03d}.mp4", fps=8)
    script = {"story_name": folder.name, "shots": [{"prompt": p} for p in prompts]}
    if overview:
        script["story_overview"] = overview
    (folder / "script.json").write_text(json.dumps(script))


def test_load_story_layouts(tmp_path):
    a = [solid((200, 40, 40), 5), solid((40, 200, 40), 5)]
    _write_story(tmp_path / "runner", a, ["first", "second"])
    _write_story(tmp_path / "plain", a, ["first", "second", "third"], runner_layout=False)
    s = load_story(tmp_path / "runner")
    assert s.story_id == "runner" and s.prompts == ["first", "second"] and len(s.shots) == 2
    assert s.shots[0].shape == (5, 32, 32, 3)
    assert abs(int(s.shots[0][0, 16, 16, 0]) - 200) < 10  # lossy codec, close colour
    plain = load_story(tmp_path / "plain")  # an unfinished story: 2 of 3 shots
    assert plain.prompts == ["first", "second"]
    assert find_stories(tmp_path) == [tmp_path / "plain", tmp_path / "runner"]
    assert find_stories(tmp_path / "runner") == [tmp_path / "runner"]
    with pytest.raises(ValueError, match="no story folder"):
        find_stories(tmp_path / "runner" / "shots")


def test_eval_cli_writes_table_and_report(tmp_path, scorer):
    rng = np.random.default_rng(4)
    for name in ("s1", "s2"):
        shots = [rng.integers(0, 255, (9, 32, 48, 3), dtype=np.uint8) for _ in range(3)]
        _write_story(tmp_path / "stories" / name, shots, ["a", "b", "c"], overview="a story")
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", str(tmp_path / "stories"), "--out", str(tmp_path / "out"), "--clip-model", "tiny"])
    assert run_eval(args) == 0
    table = pq.read_table(tmp_path / "out" / "results.parquet")
    assert table.column("story_id").to_pylist() == ["s1", "s2"]
    assert np.array(table.column("similarity").to_pylist()[0]).shape == (3, 3)
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 + 2 * 2  # bars + per story (strip + heat map)
    bad = parser.parse_args(["eval", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")])
    assert run_eval(bad) == 2


def test_summary_table_and_report_from_metrics(tmp_path, scorer):
    enc = MeanColourEncoder()
    stories = [
        StoryVideos("one", [solid((255, 0, 0)), solid((255, 0, 0))], ["red", "red"]),
        StoryVideos("two", [solid((255, 0, 0)), solid((0, 255, 0))], ["red", "green"]),
    ]
    metrics = [Evaluator(scorer, enc).evaluate_story(s) for s in stories]
    mean = summary(metrics)
    assert mean["consistency"] == pytest.approx(0.5, abs=1e-4)  # 1 and 0
    path = write_metrics_table(metrics, tmp_path / "r.parquet")
    assert pq.read_table(path).column("consistency").to_pylist() == pytest.approx([1.0, 0.0], abs=1e-4)
    report = write_report(metrics, tmp_path / "r.html")
    assert "<img" in report.read_text() and "two" in report.read_text()
