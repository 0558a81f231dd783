"""`storymem board`: the storyboard page of a `storymem run` folder, opened from disk (file://, no
server) in headless Chromium: the shot and final videos play, the keyframes decode, and the page
shows as many shots, keyframes and memory entries as the run's files hold."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storymem.board import BoardError, story_view, write_board
from tests.browser_util import load_images, play_videos

SCRIPT = {
    "story_name": "Board check",
    "story_overview": "A character on a purple background.",
    "shots": [
        {"prompt": "on a purple background, the character stands still in the upper right"},
        {"prompt": "the character moves down on the left on a purple background", "cut": False},
        {"prompt": "on a purple background, the character jumps in the lower right"},
    ],
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-shot story made by `storymem run` on the embedded model."""
    root = tmp_path_factory.mktemp("board")
    script = root / "story.json"
    script.write_text(json.dumps(SCRIPT))
    settings = root / "settings.json"
    settings.write_text(json.dumps({"num_inference_steps": 3}))  # the embedded model's other defaults
    out = root / "run"
    proc = subprocess.run([sys.executable, "-m", "storymem.cli", "run", str(script), "--out", str(out), "--quiet",
                           "--settings", str(settings)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_board_cli_refuses_a_folder_without_a_manifest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "storymem.cli", "board", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "manifest.json" in proc.stderr and str(tmp_path) in proc.stderr
    assert not (tmp_path / "board.html").exists()
    with pytest.raises(BoardError, match="not a folder"):
        write_board(tmp_path / "missing")


def test_story_view_links_only_what_the_manifest_names(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    view = story_view(run_dir)
    assert [s["video"] for s in view["shots"]] == [s["video"] for s in manifest["shots"]] == [
        f"shots/{k:03d}.mp4" for k in range(3)
    ]
    assert view["final"] == "final.mp4" and view["script"]["story_overview"] == SCRIPT["story_overview"]
    for shot, record in zip(view["shots"], manifest["shots"]):
        assert [k["frame"] for k in shot["keyframes"]] == [k["frame"] for k in record["keyframes"]]
        assert all((run_dir / k["url"]).is_file() for k in shot["keyframes"])
        # Keyframe scores are recorded: the aesthetic of each, similarity to the previous one.
        assert all(isinstance(k["aesthetic"], float) for k in record["keyframes"])
        if record["keyframes"]:
            assert record["keyframes"][0]["similarity_prev"] is None
        # Every memory entry a shot was conditioned on is a keyframe of an earlier shot, linked to its file.
        for m in shot["memory_used"]:
            assert m["shot"] < shot["index"] and m["slot"] in ("sink", "window")
            assert m["url"] == next(k["url"] for k in view["shots"][m["shot"]]["keyframes"] if k["frame"] == m["frame"])
    described = json.loads((run_dir / "memory" / "002.json").read_text())
    assert described["conditioned_on"] == manifest["shots"][2]["memory_used"]


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(path.resolve().as_uri())
    page.wait_for_selector(".sb-shot")
    return page, errors


@pytest.mark.slow
def test_board_page_plays_every_video_and_shows_the_memory_from_disk(run_dir, browser, artifacts):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    board = write_board(run_dir)
    assert board == run_dir / "board.html"
    page, errors = _open(browser, board)
    try:
        fps = manifest["settings"]["fps"]
        shots = play_videos(page, ".sb-shot video")
        assert len(shots) == 3
        for video, record in zip(shots, manifest["shots"]):
            assert video["src"].endswith(record["video"]) and video["src"].startswith("file://")
            assert video["readyState"] >= 2 and video["played"] is True, video
            assert video["duration"] == pytest.approx(record["frames"] / fps, abs=1.5 / fps)
        (final,) = play_videos(page, ".sb-final video")
        assert final["src"].endswith("final.mp4") and final["played"] is True
        assert final["duration"] == pytest.approx(manifest["final_frames"] / fps, abs=1.5 / fps)

        added = load_images(page, ".sb-shot .sb-keyframe img")
        assert len(added) == sum(len(s["keyframes"]) for s in manifest["shots"]) >= 1
        assert all(i["width"] == manifest["settings"]["width"] for i in added), added
        used = load_images(page, ".sb-shot .sb-memory img")
        assert len(used) == sum(len(s["memory_used"]) for s in manifest["shots"])
        assert all(i["width"] > 0 for i in used)
        sinks = page.locator(".sb-shot .sb-memory.sb-slot-sink").count()
        assert sinks == sum(m["slot"] == "sink" for s in manifest["shots"] for m in s["memory_used"])
        assert page.locator(".sb-timeline tbody tr").count() == 3
        assert page.locator(".sb-script li").count() == 3

        # A keyframe's origin: its shot and frame, and the later shots conditioned on it.
        first = next(s for s in manifest["shots"] if s["keyframes"])
        frame = first["keyframes"][0]["frame"]
        page.locator(f'.sb-shot .sb-keyframe[data-origin="{first["index"]}:{frame}"]').first.click()
        inspector = page.locator(".sb-inspector")
        assert inspector.is_visible()
        assert f"Shot {first['index'] + 1}, frame {frame}" in inspector.locator("h3").inner_text()
        users = [s["index"] for s in manifest["shots"] if any((m["shot"], m["frame"]) == (first["index"], frame)
                                                                for m in s["memory_used"])]  # fmt: skip
        text = inspector.inner_text()
        assert all(f"shot {u + 1} (" in text for u in users)
        # Marked wherever it appears: where it was added and where it was used, in the cards and the timeline.
        assert page.locator(".sb-thumb.sb-picked").count() == 2 * (1 + len(users))
        page.screenshot(path=str(artifacts / "board-run.png"), full_page=True)
        assert not errors, errors
    finally:
        page.close()


@pytest.mark.slow
def test_board_compares_a_run_without_memory_shot_by_shot(run_dir, browser, artifacts, tmp_path):
    # The comparison run sits in another folder; its files are linked relative to the board.
    other = tmp_path / "no memory #2"  # a name that must be escaped in a URL
    shutil.copytree(run_dir, other)
    (other / "board.html").unlink(missing_ok=True)
    board = write_board(run_dir, compare_dir=other)
    page, errors = _open(browser, board)
    try:
        videos = play_videos(page, ".sb-shot video")
        assert len(videos) == 6 and all(v["played"] is True for v in videos), videos
        assert sum("/no%20memory%20%232/shots/" in v["src"] for v in videos) == 3
        finals = play_videos(page, ".sb-final video")
        assert [f["src"].rsplit("/", 2)[-2] for f in finals] == ["run", "no%20memory%20%232"]
        labels = page.locator(".sb-shot figcaption").all_inner_texts()
        assert labels.count("with memory") == 3 and labels.count("without memory") == 3
        page.screenshot(path=str(artifacts / "board-compare.png"), full_page=True)
        assert not errors, errors
    finally:
        page.close()


@pytest.mark.slow
def test_board_of_an_unfinished_run_shows_what_is_committed(run_dir, browser, tmp_path):
    # A run stopped after two shots, whose script holds markup: the page shows the two shots, the
    # third as not made, no final video, and the prompts as text.
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["shots"] = manifest["shots"][:2]
    manifest.update(state="cancelled", final=None, final_frames=None, error="cancelled by request")
    hostile = "</script><!--<script>window.pwned=1</script> <b>bold</b>"
    manifest["shots"][0]["prompt"] = hostile
    (partial / "manifest.json").write_text(json.dumps(manifest))
    (partial / "final.mp4").unlink()
    page, errors = _open(browser, write_board(partial))
    try:
        assert page.locator(".sb-shot.sb-done").count() == 2 and page.locator(".sb-shot.sb-pending").count() == 1
        assert page.locator(".sb-final video").count() == 0 and "not made yet" in page.inner_text(".sb-final")
        assert page.inner_text("#sb-shot-0 .sb-prompt") == hostile
        assert page.evaluate("window.pwned") is None and page.locator(".sb-shot b").count() == 0
        assert "cancelled by request" in page.inner_text(".sb-head")
        assert len(play_videos(page, ".sb-shot video")) == 2
        assert not errors, errors
    finally:
        page.close()


def test_stored_story_reads_a_service_story_and_inlines_references(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from storymem.board import stored_story
    from storymem.storage import LocalStore, StoryLayout

    store = LocalStore(tmp_path)
    assert stored_story(store, "s1") == {"script": None, "settings": None}  # queued: nothing stored yet
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    layout = StoryLayout("s1")
    script = {**SCRIPT, "reference_images": [{"data": png, "path": None}, {"data": None, "path": "hero.png"}]}
    store.put_bytes(layout.script, json.dumps(script).encode())
    store.put_bytes(layout.settings, json.dumps({"fps": 12}).encode())
    got = stored_story(store, "s1")
    assert got["settings"] == {"fps": 12}
    assert [s["prompt"] for s in got["script"]["shots"]] == [s["prompt"] for s in SCRIPT["shots"]]
    assert [s["cut"] for s in got["script"]["shots"]] == [True, False, True]
    assert got["script"]["reference_images"] == [f"data:image/png;base64,{png}", None]  # a path is never read
