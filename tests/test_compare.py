"""The demo's comparison outputs: a stored story mirrored into a `storymem run` folder, the
side-by-side video and the contact sheet of a story with memory and with memory removed."""

import json

import numpy as np
import pytest

from storymem.compare import (
    MEMORY_REMOVED,
    WITH_MEMORY,
    contact_sheet,
    memory_removed,
    mirror_story,
    read_run_shots,
    side_by_side_video,
    write_comparison,
)
from storymem.config import ModelConfig, StoryMemConfig
from storymem.pipeline import build_pipeline
from storymem.scoring import Scorer
from storymem.script import load_request
from storymem.stitch import probe_video, read_video
from storymem.storage import LocalStore, StoryLayout
from storymem.story import PipelineGenerator, StoryRunner

TINY = dict(width=48, height=32, num_frames=9, num_inference_steps=2, guidance_scale=2.0, seed=3)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """Two stories stored as the engine stores them (stories/<id>/...): as written, memory removed."""
    cfg = StoryMemConfig(model=ModelConfig(embedded_weights="random"))
    pipe, _ = build_pipeline(cfg.model)
    scorer = Scorer(cfg.scoring)
    store = LocalStore(tmp_path_factory.mktemp("bucket"))
    body = {
        "story_name": "pair",
        "shots": [{"prompt": f"shot {i}: a red square on grey", "cut": c} for i, c in enumerate((True, True, False))],
        "settings": TINY,
    }
    ids = {}
    for label, b in ((WITH_MEMORY, body), (MEMORY_REMOVED, memory_removed(body))):
        req = load_request(b)
        layout = StoryLayout(f"pair-{len(ids)}")
        StoryRunner(store, layout, req.script, req.settings, PipelineGenerator(pipe), scorer, cfg.memory).run()
        ids[label] = layout
    return store, ids


def test_memory_removed_request_keeps_every_other_setting():
    body = {"script": {"shots": [{"prompt": "a"}]}, "settings": {"seed": 5, "transition": "mm2v"}}
    removed = memory_removed(body)
    assert removed == {"script": body["script"], "settings": {"seed": 5, "transition": "mm2v", "use_memory": False}}
    assert "use_memory" not in body["settings"]  # the original is left alone
    assert load_request(removed).settings.use_memory is False and load_request(body).settings.use_memory is True
    assert memory_removed({"script": body["script"]})["settings"] == {"use_memory": False}
    with pytest.raises(ValueError, match="settings"):
        memory_removed({"script": body["script"], "settings": [1]})


def test_mirror_gives_a_run_folder(bucket, tmp_path):
    store, ids = bucket
    layout = ids[WITH_MEMORY]
    dest = mirror_story(store, layout, tmp_path / layout.story_id)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["state"] == "done" and manifest["final"] == "final.mp4"
    for shot in manifest["shots"]:
        # Keys are relative to the folder, as in a `storymem run` folder, and name files that exist.
        for key in [shot["video"], shot["memory_after"], shot["memory_state"], *(kf["key"] for kf in shot["keyframes"])]:
            assert not key.startswith("stories/") and (dest / key).is_file(), key
    assert (dest / "shots" / "001.mp4").read_bytes() == store.get_bytes(layout.shot(1))
    assert (dest / "memory" / "002.npz").read_bytes() == store.get_bytes(layout.memory_state(2))
    assert json.loads((dest / "script.json").read_text())["story_name"] == "pair"
    with pytest.raises(ValueError, match="manifest"):
        mirror_story(store, StoryLayout("never-stored"), tmp_path / "none")


def test_side_by_side_video_and_contact_sheet(bucket, tmp_path):
    from PIL import Image

    store, ids = bucket
    runs = {label: mirror_story(store, layout, tmp_path / layout.story_id) for label, layout in ids.items()}
    shots = {label: read_run_shots(folder)[0] for label, folder in runs.items()}
    assert [len(s) for s in shots.values()] == [3, 3]

    video = side_by_side_video(runs, tmp_path / "sbs.mp4", scale=2)
    info = probe_video(video)
    assert info["frames"] == 3 * 9 and info["fps"] == 16
    assert info["width"] == 2 * 2 * 48 + 6 and info["height"] == 2 * 32 + 18
    frames = read_video(video)
    # Shot 2, frame 4: the left panel is the with-memory run's, the right one memory removed (after the gap).
    left = frames[9 + 4, 18:, : 2 * 48]
    right = frames[9 + 4, 18:, 2 * 48 + 6 :]
    a, b = shots[WITH_MEMORY][1][4], shots[MEMORY_REMOVED][1][4]
    small = lambda x: x[::2, ::2].astype(int)
    assert np.abs(small(left) - a).mean() < np.abs(small(left) - b).mean()
    assert np.abs(small(right) - b).mean() < np.abs(small(right) - a).mean()

    files = write_comparison(runs, tmp_path / "both")
    assert probe_video(files["side by side"])["frames"] == 3 * 9 and Image.open(files["contact sheet"]).size[1] == 2 * (3 * 32 + 18) + 6
    board = files["storyboard"].read_text()  # the page of the run with memory, the other run beside it
    assert files["storyboard"].parent == runs[WITH_MEMORY] and MEMORY_REMOVED in board

    sheet = Image.open(contact_sheet(runs, tmp_path / "sheet.png", scale=2))
    assert sheet.size == (150 + 3 * 2 * 48 + 2 * 6, 2 * (2 * 32 + 18) + 6)
    row1 = np.asarray(sheet.convert("RGB"))[18 : 18 + 64, 150 + 96 + 6 : 150 + 2 * 96 + 6]  # row 1, shot 2's middle frame
    np.testing.assert_allclose(row1[::2, ::2].astype(int), shots[WITH_MEMORY][1][4].astype(int), atol=1)
