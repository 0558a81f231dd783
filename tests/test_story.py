"""The story loop and `storymem run`: a whole story to a playable video, resume, determinism."""

import json
import subprocess
import sys

import numpy as np
import pytest

from storymem.config import ModelConfig, StoryMemConfig
from storymem.local import run_story
from storymem.memory import MemoryBank
from storymem.pipeline import build_pipeline
from storymem.scoring import Scorer
from storymem.script import GenerationSettings, load_script
from storymem.stitch import probe_video, read_video
from storymem.storage import LocalStore, StoryLayout
from storymem.story import PipelineGenerator, StoryRunner, read_manifest

TINY = dict(width=48, height=32, num_frames=9, num_inference_steps=3, guidance_scale=2.0)


def _script(cuts=(True, False, True), transition="mi2v"):
    return {
        "story_name": "Test story",
        "shots": [{"prompt": f"shot {i}: a small robot in a garden", "cut": c} for i, c in enumerate(cuts)],
        "settings": {**TINY, "transition": transition, "seed": 7},
    }


@pytest.fixture(scope="module")
def models():
    cfg = StoryMemConfig(model=ModelConfig(embedded_weights="random"))
    pipe, _ = build_pipeline(cfg.model)
    return cfg, pipe, Scorer(cfg.scoring)


def _run(models, tmp_path, script, name="out"):
    from storymem.script import load_request

    cfg, pipe, scorer = models
    return run_story(load_request(script), tmp_path / name, cfg, progress=False, pipeline=pipe, scorer=scorer)


@pytest.mark.parametrize("transition,drop", [("none", 0), ("mi2v", 1), ("mm2v", 5)])
def test_story_video_drops_overlap_frames(models, tmp_path, transition, drop):
    manifest = _run(models, tmp_path, _script(transition=transition))
    assert manifest.state == "done"
    assert [r.drop for r in manifest.shots] == [0, drop, 0]
    expected_modes = ["t2v", {"none": "m2v", "mi2v": "mi2v", "mm2v": "mm2v"}[transition], "m2v"]
    assert [r.mode for r in manifest.shots] == expected_modes
    info = probe_video(tmp_path / "out" / "final.mp4")
    assert info["frames"] == 3 * 9 - drop == manifest.final_frames
    assert info["codec"] == "h264" and info["fps"] == 16
    # The shots were encoded for a clean cut, so the final video is their packets, not a re-encode:
    # it decodes to exactly the stored shots' frames after the drops.
    assert manifest.stitch["method"] == "remux" and manifest.stitch["reason"] is None
    kept = [read_video(tmp_path / "out" / r.video)[r.drop :] for r in manifest.shots]
    np.testing.assert_array_equal(read_video(tmp_path / "out" / "final.mp4"), np.concatenate(kept))


def test_story_artifacts_and_memory_record(models, tmp_path):
    manifest = _run(models, tmp_path, _script())
    out = tmp_path / "out"
    for r in manifest.shots:
        assert (out / r.video).exists() and (out / r.memory_after).exists() and (out / r.memory_state).exists()
        for kf in r.keyframes:
            assert (out / kf["key"]).exists()
    assert manifest.shots[0].memory_used == []  # shot 1 is text-to-video
    assert len(manifest.shots[1].memory_used) >= 1  # shot 2 saw shot 1's keyframes
    # The stored bank after shot 2 is the memory shot 3 was conditioned on.
    bank = MemoryBank.from_bytes((out / manifest.shots[1].memory_state).read_bytes())
    assert bank.describe() == manifest.shots[2].memory_used
    # The tail kept for shot 2 (cut=False, MI2V) is exactly shot 1's last frame.
    bank0 = MemoryBank.from_bytes((out / manifest.shots[0].memory_state).read_bytes())
    assert bank0.tail is not None and len(bank0.tail) == 1
    assert json.loads((out / "manifest.json").read_text())["state"] == "done"


def test_same_seed_same_video_and_resume(models, tmp_path):
    first = _run(models, tmp_path, _script(), "a")
    ref = read_video(tmp_path / "a" / "final.mp4")
    # Resume: delete shot 3's commit from the manifest, as if the process died after shot 2.
    store = LocalStore(tmp_path / "a")
    layout = StoryLayout("Test-story", prefix="")
    manifest = read_manifest(store, layout)
    manifest.shots = manifest.shots[:2]
    manifest.state, manifest.final = "running", None
    store.put_bytes(layout.manifest, manifest.model_dump_json().encode())
    (tmp_path / "a" / "final.mp4").unlink()

    calls = []
    cfg, pipe, scorer = models

    class Counting(PipelineGenerator):
        def generate(self, request, step_callback=None):
            calls.append(request.index)
            return super().generate(request, step_callback)

    from storymem.script import load_request

    req = load_request(_script())
    runner = StoryRunner(store, layout, req.script, req.settings, Counting(pipe), scorer, cfg.memory)
    resumed = runner.run()
    assert calls == [2]  # only the unfinished shot was made
    assert resumed.state == "done"
    np.testing.assert_array_equal(read_video(tmp_path / "a" / "final.mp4"), ref)
    # A fresh run with the same seed gives the same video.
    _run(models, tmp_path, _script(), "b")
    np.testing.assert_array_equal(read_video(tmp_path / "b" / "final.mp4"), ref)
    assert first.shots[0].seed == 7 and first.shots[2].seed == 9


def test_a_different_script_in_the_same_folder_is_refused(models, tmp_path):
    _run(models, tmp_path, _script())
    other = _script()
    other["shots"][0]["prompt"] = "something else"
    with pytest.raises(ValueError, match="different script"):
        _run(models, tmp_path, other)


def test_cancel_between_steps_commits_nothing_more(models, tmp_path):
    cfg, pipe, scorer = models
    from storymem.script import load_request

    req = load_request(_script())
    store = LocalStore(tmp_path / "c")
    layout = StoryLayout("c", prefix="")
    events = []
    flag = {"cancel": False}

    def on_event(e):
        events.append(e)
        if e.shot == 1 and e.phase.value == "denoise" and e.step == 1:
            flag["cancel"] = True

    runner = StoryRunner(
        store, layout, req.script, req.settings, PipelineGenerator(pipe), scorer, cfg.memory,
        on_event=on_event, is_cancelled=lambda: flag["cancel"],
    )
    manifest = runner.run()
    assert manifest.state == "cancelled" and manifest.shots_done == 1
    assert not store.exists(layout.shot(1)) and not store.exists(layout.final)
    assert events[-1].phase.value == "cancelled"


def test_cli_run_three_shots_playable_mp4(tmp_path):
    script = tmp_path / "story.json"
    script.write_text(json.dumps(_script()))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "storymem.cli", "run", str(script), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    info = probe_video(out / "final.mp4")
    assert info["frames"] == 3 * 9 - 1 and info["width"] == 48 and info["height"] == 32
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shots"]] == [0, 1, 2]
    assert all(set(s["timings"]) >= {"text", "encode", "denoise", "decode", "score", "write"} for s in manifest["shots"])


def test_cli_run_bad_script_leaves_no_output(tmp_path):
    bad = _script()
    bad["shots"][0]["cut"] = False
    script = tmp_path / "bad.json"
    script.write_text(json.dumps(bad))
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "storymem.cli", "run", str(script), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "shots.0.cut" in proc.stderr
    assert not out.exists()


def test_st_bench_story_settings_resolve_to_the_embedded_profile():
    from storymem.models import TinyWanConfig

    script = load_script(_st_bench("cat.json"))
    settings = GenerationSettings().resolve(TinyWanConfig().defaults)
    assert settings.width == TinyWanConfig().defaults["width"] and script.num_shots == 10
    explicit = GenerationSettings(width=832).resolve(TinyWanConfig().defaults)
    assert explicit.width == 832


def _st_bench(name):
    from pathlib import Path
    import os

    root = Path(os.environ.get("STORYMEM_ST_BENCH", Path(__file__).resolve().parents[2] / "shared" / "st-bench"))
    return root / name
