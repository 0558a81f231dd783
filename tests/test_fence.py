"""One writer per story: two runs of one story on the real S3 server (SeaweedFS). The later run
claims the manifest with a conditional PUT; the stale one is fenced at its next commit and writes
nothing more, whatever it was doing."""

from __future__ import annotations

import threading

import pytest

from storymem.config import ModelConfig, StoryMemConfig
from storymem.pipeline import build_pipeline
from storymem.progress import Phase
from storymem.scoring import Scorer
from storymem.script import GenerationSettings, load_script
from storymem.storage import PreconditionFailed, StoryLayout
from storymem.story import PipelineGenerator, StoryFenced, StoryRunner, read_manifest_versioned

SETTINGS = GenerationSettings(width=48, height=32, num_frames=9, num_inference_steps=3, seed=5)
SCRIPT = {"story_name": "Fence", "shots": [{"prompt": "a lamp"}, {"prompt": "the lamp glows"}]}


def test_conditional_put_on_the_s3_server(s3_store):
    first = s3_store.put_if("fence/a.json", b"one", match=None)
    with pytest.raises(PreconditionFailed):
        s3_store.put_if("fence/a.json", b"again", match=None)  # If-None-Match: * on an existing object
    second = s3_store.put_if("fence/a.json", b"two", match=first)
    with pytest.raises(PreconditionFailed):
        s3_store.put_if("fence/a.json", b"stale", match=first)  # If-Match on an old version
    assert s3_store.get_versioned("fence/a.json") == (b"two", second)


def test_two_directors_on_one_story_only_the_later_commits(s3_store):
    cfg = StoryMemConfig(model=ModelConfig(embedded_weights="random"))
    pipe, _ = build_pipeline(cfg.model)
    scorer = Scorer(cfg.scoring)
    script = load_script(SCRIPT)
    layout = StoryLayout("fence-story")
    paused, go = threading.Event(), threading.Event()

    def hold_in_shot_0(event):
        if event.phase == Phase.DENOISE and event.shot == 0 and not paused.is_set():
            paused.set()
            go.wait(120)

    def runner(on_event=None):
        return StoryRunner(s3_store, layout, script, SETTINGS, PipelineGenerator(pipe), scorer, on_event=on_event)

    stale = runner(hold_in_shot_0)
    outcome = {}

    def run_stale():
        try:
            outcome["manifest"] = stale.run()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    thread = threading.Thread(target=run_stale)
    thread.start()
    assert paused.wait(120), "the first run never reached shot 0"
    later = runner()  # e.g. the engine replaced a director it thought dead
    done = later.run()
    assert done.state == "done" and done.shots_done == 2 and done.attempt == later.attempt_id
    committed, etag = read_manifest_versioned(s3_store, layout)
    shot0_etag = s3_store.get_versioned(layout.shot(0))[1]
    go.set()
    thread.join(120)
    assert isinstance(outcome.get("error"), StoryFenced), outcome
    after, etag_after = read_manifest_versioned(s3_store, layout)
    assert etag_after == etag and after == committed  # the stale run wrote no manifest
    assert s3_store.get_versioned(layout.shot(0))[1] == shot0_etag  # nor over a committed shot
    assert after.attempt == later.attempt_id and after.state == "done"
