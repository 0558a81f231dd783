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
from storymem.service.contract import StoryState
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


def test_shot_records_say_how_shots_were_made(models, tmp_path):
    from storymem.pipeline import NO_T2V_NOTE

    manifest = _run(models, tmp_path, _script(transition="mm2v", cuts=(True, False)))
    first, second = manifest.shots
    # No text-to-video model in the embedded profile: shot 1 is the M2V model with empty memory, and says so.
    assert (first.mode, first.model, first.notes) == ("t2v", "m2v", [NO_T2V_NOTE])
    assert (second.mode, second.model, second.notes) == ("mm2v", "m2v", [])
    # Keyframes come from the frames the final video keeps (after the 5 MM2V overlap frames).
    assert second.drop == 5 and all(kf["frame"] >= 5 for kf in second.keyframes)
    assert manifest.version == 2 and manifest.settings["memory_mask"] == "ones"


def test_keyframes_skip_the_leading_frames_of_every_shot(models, tmp_path):
    """settings.keyframe_skip: no shot gives a keyframe from its first frames (MI2V's dropped frame
    is within them); 0, the method's rule, starts at frame 0, and the embedded profile defaults to 1."""
    script = _script(cuts=(True, False, True))
    script["settings"]["keyframe_skip"] = 0
    method = _run(models, tmp_path, script, "skip0")
    assert [kf["frame"] for kf in method.shots[0].keyframes][:1] == [0]  # frame 0 passes the quality filter
    script["settings"]["keyframe_skip"] = 3
    manifest = _run(models, tmp_path, script, "skip3")
    assert manifest.settings["keyframe_skip"] == 3
    frames = [[kf["frame"] for kf in r.keyframes] for r in manifest.shots]
    assert frames[0] and min(min(f) for f in frames if f) >= 3, frames
    _, profile = build_pipeline(ModelConfig(embedded_weights="random"))
    assert GenerationSettings().resolve(profile.defaults).keyframe_skip == 1


def test_customised_story_with_references_of_any_size(models, tmp_path):
    """MR2V with three references of different sizes and aspect ratios (portrait, landscape,
    square): every shot completes, at the first reference's aspect ratio."""
    from PIL import Image

    rng = np.random.default_rng(0)
    refs = []
    for i, (h, w) in enumerate(((72, 40), (30, 64), (50, 50))):  # portrait first
        path = tmp_path / f"ref{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        refs.append({"path": str(path)})
    script = _script(cuts=(True, False, True, False), transition="mi2v")
    script["reference_images"] = refs
    script["settings"]["size_from_reference"] = True  # area 48 x 32 (explicit), aspect of ref0
    manifest = _run(models, tmp_path, script)
    assert manifest.state == "done" and [r.mode for r in manifest.shots] == ["mr2v", "mi2v", "m2v", "mi2v"]
    assert (manifest.settings["width"], manifest.settings["height"]) == (32, 48)  # portrait, 16-multiples
    info = probe_video(tmp_path / "out" / "final.mp4")
    assert (info["width"], info["height"], info["frames"]) == (32, 48, 4 * 9 - 2)
    assert [d["source"] for d in manifest.shots[0].memory_used] == ["reference"] * 3
    assert {(d["height"], d["width"]) for d in manifest.shots[1].memory_used} >= {(72, 40), (30, 64), (50, 50)}
    # A landscape first reference, and an explicit size that wins over the reference (sizes are
    # decided when the manifest is created).
    from storymem.script import load_request

    cfg, pipe, scorer = models
    for name, first, explicit, size in (("landscape", 1, False, (64, 32)), ("fixed", 0, True, (48, 32))):
        script["reference_images"] = refs[first:]
        if explicit:
            del script["settings"]["size_from_reference"]
        req = load_request(script)
        runner = StoryRunner(LocalStore(tmp_path / name), StoryLayout(name, prefix=""), req.script, req.settings,
                             PipelineGenerator(pipe), scorer, cfg.memory)  # fmt: skip
        opened = runner.open()
        assert (opened.settings["width"], opened.settings["height"]) == size, name


def test_same_seed_same_video_and_resume(models, tmp_path):
    first = _run(models, tmp_path, _script(), "a")
    ref = read_video(tmp_path / "a" / "final.mp4")
    # Resume: delete shot 3's commit from the manifest, as if the process died after shot 2.
    store = LocalStore(tmp_path / "a")
    layout = StoryLayout("Test-story", prefix="")
    manifest = read_manifest(store, layout)
    manifest.shots = manifest.shots[:2]
    manifest.state, manifest.final = StoryState.RUNNING, None
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
    from storymem.models import EMBEDDED_NEGATIVE_PROMPT, TinyWanConfig

    script = load_script(_st_bench("cat.json"))
    settings = GenerationSettings().resolve(TinyWanConfig().defaults)
    assert settings.width == TinyWanConfig().defaults["width"] and script.num_shots == 10
    explicit = GenerationSettings(width=832).resolve(TinyWanConfig().defaults)
    assert explicit.width == 832
    # The shipped bundle's training: window memory frames 2, an English negative prompt (its
    # tokenizer spells no Chinese). A story can still ask for the authors' values.
    assert (settings.memory_mask, settings.negative_prompt) == ("sink_window", EMBEDDED_NEGATIVE_PROMPT)
    assert settings.sigma_schedule == "wan"
    assert GenerationSettings(memory_mask="ones").resolve(TinyWanConfig().defaults).memory_mask == "ones"


def test_a_story_begun_before_version_2_resumes_as_it_began(models, tmp_path):
    from storymem.script import WAN_NEGATIVE_PROMPT_EN, load_request
    from storymem.story import Manifest, script_digest

    cfg, pipe, scorer = models
    req = load_request(_script())
    store, layout = LocalStore(tmp_path / "old"), StoryLayout("old", prefix="")
    old = req.settings.model_dump(mode="json")
    for key in ("memory_mask", "sigma_schedule", "t2v_shift", "t2v_guidance_scale", "size_from_reference"):
        del old[key]  # what a version-1 manifest recorded
    manifest = Manifest(version=1, story_id="old", script_sha256=script_digest(req.script), shots_total=3, settings=old)
    store.put_bytes(layout.manifest, manifest.model_dump_json().encode())
    runner = StoryRunner(store, layout, req.script, req.settings, PipelineGenerator(pipe), scorer, cfg.memory)
    opened = runner.open()
    s = runner.settings
    assert (s.memory_mask, s.sigma_schedule, s.t2v_shift, s.negative_prompt) == ("sink_window", "diffusers", 4.0, WAN_NEGATIVE_PROMPT_EN)
    assert opened.version == 2 and opened.settings["memory_mask"] == "sink_window"


def _st_bench(name):
    from pathlib import Path
    import os

    root = Path(os.environ.get("STORYMEM_ST_BENCH", Path(__file__).resolve().parents[2] / "shared" / "st-bench"))
    return root / name
