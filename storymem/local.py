"""One story in this process, without Ray: the CLI's `storymem run` and the library's quick path."""

from __future__ import annotations

import re
from pathlib import Path

from .config import StoryMemConfig
from .pipeline import build_pipeline
from .progress import ProgressBars
from .lora import configured_sets, supported_transitions
from .scoring import Scorer
from .script import StoryRequest, check_transition_supported
from .speed import check_settings
from .storage import LocalStore, StoryLayout
from .story import Manifest, PipelineGenerator, StoryRunner


def folder_story_id(script_name: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", script_name or "story").strip("-_")[:64]
    return slug or "story"


def run_story(
    request: StoryRequest,
    out_dir: str | Path,
    cfg: StoryMemConfig | None = None,
    progress: bool = True,
    pipeline=None,
    scorer=None,
    reference_base_dir=None,
) -> Manifest:
    """Generate (or resume) a story into `out_dir`: shots/, keyframes/, memory/, final.mp4,
    manifest.json. Pipeline and scorer may be passed in to reuse loaded models."""
    cfg = cfg or StoryMemConfig()
    if pipeline is None:
        # Refused before the weights load and before anything is written.
        check_transition_supported(request.settings, supported_transitions(configured_sets(cfg.model)))
        pipeline, profile = build_pipeline(cfg.model, cfg.speed)
        settings = request.settings.resolve(profile.defaults)
        check_settings(settings, cfg.speed)  # the mode's refusals (a CFG-distilled mode and guidance > 1)
        model_name = profile.name
    else:
        settings, model_name = request.settings, type(pipeline).__name__
    supported = getattr(pipeline, "supported_transitions", None)
    if supported is not None:
        check_transition_supported(settings, supported)
    scorer = scorer or Scorer(cfg.scoring)
    store = LocalStore(out_dir)
    layout = StoryLayout(folder_story_id(request.script.story_name), prefix="")
    bars = None
    if progress:
        from .story import read_manifest

        previous = read_manifest(store, layout)
        bars = ProgressBars(request.script.num_shots, settings.num_inference_steps, previous.shots_done if previous else 0)
    runner = StoryRunner(
        store,
        layout,
        request.script,
        settings,
        PipelineGenerator(pipeline),
        scorer,
        memory_cfg=cfg.memory,
        on_event=bars,
        model_name=model_name,
        reference_base_dir=reference_base_dir,
    )
    try:
        return runner.run()
    finally:
        if bars is not None:
            bars.close()
