"""Per-shot time breakdown of the one-process story loop.

Runs a short story through StoryRunner (the loop the CLI and the Ray director share) on two CPU
model sizes and prints, per configuration, the mean seconds per shot spent in text encoding,
memory/condition encoding (VAE), denoising, VAE decoding, scoring (CLIP + aesthetic + keyframe
selection) and writing (MP4, keyframes, memory state, manifest).

    python bench/shot_breakdown.py [--shots 4] [--story ../shared/st-bench/cat.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from storymem.config import ModelConfig, StoryMemConfig
from storymem.models import TinyWanConfig, build_embedded
from storymem.pipeline import StoryMemPipeline
from storymem.scoring import Scorer
from storymem.script import GenerationSettings, load_script
from storymem.storage import LocalStore, StoryLayout
from storymem.story import PipelineGenerator, StoryRunner

PHASES = ["text", "encode", "denoise", "decode", "score", "write"]

CONFIGS = {
    # The embedded default (what the demo and tests run).
    "tiny (embedded)": (TinyWanConfig(), None),
    # A larger CPU config: 4 blocks of 4x32 heads, 128x96, 33 frames, 10 steps.
    "larger CPU": (
        TinyWanConfig(heads=4, head_dim=32, layers=4, ffn_dim=256, text_dim=64, vae_base_dim=16),
        dict(width=128, height=96, num_frames=33, num_inference_steps=10, guidance_scale=3.5),
    ),
}


def run(name: str, tiny: TinyWanConfig, settings_over: dict | None, script, shots: int) -> dict:
    components, profile = build_embedded(ModelConfig(embedded_weights="random") if settings_over else ModelConfig(), tiny)
    pipe = StoryMemPipeline(**components, boundary_ratio=profile.boundary, max_sequence_length=profile.max_sequence_length)
    pipe.set_progress_bar_config(disable=True)
    settings = GenerationSettings().resolve(settings_over or profile.defaults)
    script = script.model_copy(update={"shots": script.shots[:shots]})
    with tempfile.TemporaryDirectory() as tmp:
        runner = StoryRunner(
            LocalStore(tmp), StoryLayout("bench", prefix=""), script, settings,
            PipelineGenerator(pipe), Scorer(StoryMemConfig().scoring),
        )
        t0 = time.perf_counter()
        manifest = runner.run()
        wall = time.perf_counter() - t0
    per_phase = {p: statistics.mean(r.timings.get(p, 0.0) for r in manifest.shots) for p in PHASES}
    return {
        "config": name,
        "size": f"{settings.width}x{settings.height}x{settings.num_frames}",
        "steps": settings.num_inference_steps,
        "params_M": sum(p.numel() for p in pipe.transformer.parameters()) / 1e6,
        **per_phase,
        "shot_s": sum(per_phase.values()),
        "story_wall_s": wall,
        "shots": len(manifest.shots),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_story = Path(__file__).resolve().parents[2] / "shared" / "st-bench" / "cat.json"
    ap.add_argument("--story", type=Path, default=Path(os.environ.get("STORYMEM_BENCH_STORY", default_story)))
    ap.add_argument("--shots", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    script = load_script(args.story)
    rows = [run(name, tiny, over, script, args.shots) for name, (tiny, over) in CONFIGS.items()]
    head = ["config", "size", "steps", "params_M", *PHASES, "shot_s", "story_wall_s", "shots"]
    print(f"threads={torch.get_num_threads()}  story={args.story.name}  (seconds per shot, mean)")
    print(" | ".join(f"{h:>14}" for h in head))
    for r in rows:
        cells = [f"{r[h]:>14.3f}" if isinstance(r[h], float) else f"{str(r[h]):>14}" for h in head]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
