"""The proof that memory carries identity: held-out synthetic stories, with memory vs memory removed.

    .venv/bin/python bench/proof.py [--stories 16] [--shots 6] [--bundle FILE] [--out docs/proof.md]

Stories come from storymem.toyworld's held-out split: characters (shape, colours, pattern, size)
never seen in training, and prompts that name only the action and the background. Every shot goes
through the real StoryMemPipeline (build_pipeline with the shipped tiny bundle) and the real memory
bank (keyframes chosen with the embedded CLIP scorer, sink + sliding window), exactly as a story run.

Two settings:
* reference: the character's first appearance is the rendered first shot (its keyframes seed the
  memory, as a customised story does); shots 2..N are generated;
* generated: shot 1 is generated too (text only), then shots 2..N follow it.
With memory removed, shots 2..N are generated from their prompts alone (same seeds), by the bundle's
text-to-video transformer when it has one (as a story's shots without memory are).

Metric (pixel space, no pretrained network; storymem.toyworld.identity_error): the character is
segmented from the uniform background; colour error = distance of its mean RGB colour to that of
the first appearance (0..1), shape error = 1 - IoU of the centred silhouettes; identity match = the
share of shots whose character colour is nearer to its own story's first appearance than to any
other story's. Background error checks that the prompt's background is followed in both conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning threads lose on a shared CPU

import numpy as np

from storymem import toyworld
from storymem.config import ModelConfig, ScoringConfig
from storymem.proof import evaluate, reference_lines, story_settings

REPO = Path(__file__).resolve().parents[1]


def save_strip(path: Path, stories, runs_by_setting: dict, settings) -> None:
    """One story as middle frames: ground truth / with memory / without memory."""
    from PIL import Image

    h, w, f = settings.height, settings.width, settings.num_frames
    rows = [np.concatenate([s[f // 2] for s in toyworld.render_story(stories[0], h, w, f)], axis=1)]
    for cond in ("memory", "no_memory"):
        rows.append(np.concatenate([s[f // 2] for s in runs_by_setting[cond][0]], axis=1))
    img = np.concatenate(rows, axis=0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


TARGETS = {
    # issue 13: rendered first appearance; first appearance generated from text
    "reference": "colour error with memory <= 0.12, memory removed >= 0.25, shape error with memory below removed",
    "generated": "colour error with memory < 0.75 x removed, the character shown in >= 90% of shots with memory",
}


def meets(setting: str, res: dict) -> bool:
    m, r = res["memory"], res["no_memory"]
    if setting == "reference":
        return m["colour_error"] <= 0.12 and r["colour_error"] >= 0.25 and m["shape_error"] < r["shape_error"]
    return m["colour_error"] < 0.75 * r["colour_error"] and m["shots_with_character"] >= 0.9


def skipped(n: int) -> str:
    if n == 0:
        return ""
    return ", no keyframe from a shot's first frame" if n == 1 else f", no keyframe from a shot's first {n} frames"


def markdown(report: dict) -> str:
    seeds = list(report["draws"])
    lines = [
        "## Proof: memory keeps the character (synthetic world)",
        "",
        f"Held-out stories from `storymem.toyworld` ({report['stories']} stories x {report['shots']} shots a draw, "
        f"{len(seeds)} draws of stories: seeds {', '.join(seeds)}; the characters' shape, colours and pattern never "
        "occur in training and never in the prompts, which name only the action and the background). Every shot "
        "is made by the real `StoryMemPipeline` with the shipped tiny bundle and the real memory bank with the "
        "embedded scorer (keyframes by CLIP similarity, the quality filter, sink + window of at most "
        f"{report['max_memory_size']} frame{'s' if report['max_memory_size'] != 1 else ''}{skipped(report['keyframe_skip'])}; "
        f"memory guidance scale {report['memory_guidance_scale']:g}, text CFG as the "
        "model's defaults). Shots without memory (shot 1 when generated, and every shot with memory removed) are made "
        + ("by the bundle's text-to-video transformer, as Wan2.2-T2V makes them on real weights. " if report.get("t2v")
           else "by the M2V model with empty memory (the bundle has no text-to-video transformer). ")
        + "Lower error is better.",
        "",
        "| draw | first appearance | condition | colour error | colour error (visible) | shape error | identity match | character found | shots with it | memory frames | background error |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for seed in seeds:
        for setting, res in report["draws"][seed]["settings"].items():
            for cond, name in (("memory", "with memory"), ("no_memory", "memory removed")):
                r = res[cond]
                lines.append(
                    f"| {seed} | {setting} | {name} | {r['colour_error']:.3f} | {r['colour_error_visible']:.3f} | {r['shape_error']:.3f} | "
                    f"{r['identity_match']:.0%} | {r['found']:.0%} | {r['shots_with_character']:.0%} | {r['memory_frames']:.1f} | {r['background_error']:.3f} |"
                )
    lines += ["", "Targets (issue 13), per draw:", ""]
    for setting, text in TARGETS.items():
        verdicts = [f"{seed} {'met' if meets(setting, report['draws'][seed]['settings'][setting]) else 'NOT met'}"
                    for seed in seeds if setting in report["draws"][seed]["settings"]]
        if verdicts:
            lines.append(f"* `{setting}`: {text}: {'; '.join(verdicts)}.")
    ref = report["draws"][seeds[0]]["reference_lines"]
    lines += [
        "",
        f"For scale (draw {seeds[0]}), on ground-truth renders the colour error is {ref['same_character']:.3f} for the same "
        f"character in another shot ({ref['same_character_vae']:.3f} after the tiny VAE's round trip: the floor for a "
        f"generated shot against the rendered first appearance) and {ref['different_character']:.3f} between different "
        f"characters; identity match by chance is {1 / report['stories']:.0%}.",
        "",
        "* **first appearance `reference`**: shot 1 is the rendered character (its keyframes seed the memory); shots "
        "2..N are generated. **`generated`**: shot 1 is generated from text too, and shots 2..N must follow it; "
        "a story whose shot 1 shows no character scores 1 on every shot in both conditions.",
        "* **colour error**: distance between the mean colour of the character in shot k and in shot 1 (RGB in "
        "[0, 1], divided by sqrt 3; a shot where no character is found scores 1; **colour error (visible)** averages "
        "only the shots where one is found); **shape error**: 1 - IoU of the centred silhouettes; **identity match**: shots "
        "whose character is nearest in colour to their own story's first appearance; **character found**: the share "
        "of frames with a character; **shots with it**: shots where it is found in at least half of the frames; **memory frames**: the bank's size when a shot 2..N was made; **background "
        "error**: distance of the frame border's colour to the background the prompt names (text following).",
        "",
        "![one held-out story: ground truth, with memory, memory removed](proof_story.png)",
        "",
        f"Rerun: `{report['command']}` ({report['seconds']:.0f} s on {report['machine']}). Training: "
        "`scripts/train_embedded.py` (README, 'Evaluation and training').",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stories", type=int, default=16)
    p.add_argument("--shots", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[2026, 7], help="story sampling seeds (held-out split): one draw each")
    p.add_argument("--bundle", type=Path, default=None, help="embedded weights (default: the shipped bundle)")
    p.add_argument("--settings", nargs="+", default=["reference", "generated"], choices=["reference", "generated"])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "proof.md")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-guidance", type=float, default=None, help="memory guidance scale (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--max-memory-size", type=int, default=None, help="memory bank capacity (default: the model's)")
    p.add_argument("--noise-offset", type=float, default=0.0, help="per-channel offset of the initial noise (storymem.pipeline.offset_noise)")
    p.add_argument("--fix", type=int, default=None, help="memory sink size (default: the model's)")
    p.add_argument("--keyframe-skip", type=int, default=None, help="leading frames of a shot never taken as keyframes (default: the model's)")
    p.add_argument("--scorer", choices=["trained", "seeded"], default="trained", help="embedded scorer weights (ScoringConfig.embedded_scorer)")
    args = p.parse_args(argv)

    import torch

    from storymem.pipeline import build_pipeline
    from storymem.scoring import Scorer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe, profile = build_pipeline(ModelConfig(embedded_weights=args.bundle, device="cpu"))
    if "tiny_m2v" not in profile.name and args.bundle is None:
        print("warning: no trained bundle found; the numbers are those of random weights", file=sys.stderr)
    scorer = Scorer(ScoringConfig(clip_model="tiny", embedded_scorer=args.scorer))
    flags = {
        "memory_guidance_scale": args.memory_guidance,
        "num_inference_steps": args.steps,
        "max_memory_size": args.max_memory_size,
        "fix": args.fix,
        "keyframe_skip": args.keyframe_skip,
    }
    settings = story_settings(profile, **{k: v for k, v in flags.items() if v is not None})
    report = {"stories": args.stories, "shots": args.shots, "model": profile.name, "scorer": args.scorer, "draws": {}}
    report["memory_guidance_scale"] = settings.memory_guidance_scale
    report["max_memory_size"] = settings.max_memory_size
    report["keyframe_skip"] = settings.keyframe_skip
    report["t2v"] = profile.has_t2v
    strip = None
    for seed in args.seeds:
        stories = toyworld.make_stories(args.stories, args.shots, seed, split="heldout")
        draw = report["draws"][str(seed)] = {"settings": {}}
        for setting in args.settings:
            out = evaluate(pipe, scorer, stories, first=setting, settings=settings, noise_offset=args.noise_offset)
            draw["settings"][setting] = out["results"]
            strip = strip or (stories, out["runs"])
            for cond in ("memory", "no_memory"):
                r = out["results"][cond]
                print(
                    f"{seed} {setting:10s} {cond:10s} colour {r['colour_error']:.3f} (visible {r['colour_error_visible']:.3f}) "
                    f"shape {r['shape_error']:.3f} match {r['identity_match']:.2f} found {r['found']:.2f} shots {r['shots_with_character']:.2f} "
                    f"memory {r['memory_frames']:.1f} background {r['background_error']:.3f}", flush=True,
                )
        draw["reference_lines"] = reference_lines(pipe, stories, settings)
    report["seconds"] = time.perf_counter() - t0
    report["machine"] = f"{os.cpu_count()} CPU cores"
    report["command"] = ("python bench/proof.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    print(f"{report['seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report))
    if strip is not None:
        save_strip(args.out.parent / "proof_story.png", strip[0], strip[1], settings)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
