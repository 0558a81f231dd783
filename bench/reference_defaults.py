"""How much each of the authors' inference defaults changes a shot of the embedded tiny model.

    .venv/bin/python bench/reference_defaults.py [--shots 4] [--memory 5] [--random]

For one M2V shot (the shipped tiny bundle, its profile's size/steps/guidance, a held-out toyworld
character rendered as `--memory` memory frames) the shot is made with the previous defaults and
with each new default switched on alone, then all together:

* memory mask: every memory frame 1 ('ones') vs window frames (after fix = 3) 2 ('sink_window');
* sigma grid: Wan's linspace(0.999, 0, n+1)[:-1] ('wan') vs diffusers' linspace(1, 1/1000, n+1)[:-1];
* negative prompt: Wan's Chinese default vs the English paraphrase used before (the tiny tokenizer
  spells no Chinese, so on this model the new one is mostly <unk> tokens).

It prints the mean absolute difference from the old-defaults shot, on the sampled latents and on
the decoded frames (0..255), with the difference a change of seed makes as the scale, averaged over
`--shots` stories. Runs in about a minute on 2 CPU cores (8 steps; `--steps 40` about five).
Measured results: docs/reference.md.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from storymem import toyworld
from storymem.config import ModelConfig
from storymem.pipeline import build_pipeline
from storymem.script import WAN_DEFAULT_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT_EN, GenerationSettings

OLD = dict(memory_mask="sink_window", sigma_schedule="diffusers", negative_prompt=WAN_NEGATIVE_PROMPT_EN)
CHANGES = {
    "memory mask (ones)": dict(memory_mask="ones"),
    "sigma grid (wan)": dict(sigma_schedule="wan"),
    "negative prompt (Wan's)": dict(negative_prompt=WAN_DEFAULT_NEGATIVE_PROMPT),
    "all three": dict(memory_mask="ones", sigma_schedule="wan", negative_prompt=WAN_DEFAULT_NEGATIVE_PROMPT),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shots", type=int, default=4, help="stories (one measured shot each)")
    p.add_argument("--memory", type=int, default=5, help="memory frames (> fix = 3 so the mask matters)")
    p.add_argument("--random", action="store_true", help="random tiny weights instead of the shipped bundle")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the profile's)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    pipe, profile = build_pipeline(ModelConfig(device="cpu", embedded_weights="random" if args.random else None))
    s = GenerationSettings().resolve(profile.defaults)
    if args.steps:
        s = s.model_copy(update={"num_inference_steps": args.steps})
    base = dict(
        height=s.height, width=s.width, num_frames=s.num_frames, num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale, memory_guidance_scale=s.memory_guidance_scale, shift=s.shift, fix=s.fix,
    )  # fmt: skip
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in ["seed + 1 (scale)", *CHANGES]}
    for i, story in enumerate(toyworld.make_stories(args.shots, 2, seed=5, split="heldout")):
        first = toyworld.render_shot(story.character, story.shots[0], s.height, s.width, s.num_frames)
        memory = [first[j] for j in np.linspace(0, s.num_frames - 1, args.memory).round().astype(int)]

        def shot(seed=100 + i, **over):
            kw = {**base, **OLD, **over}
            lat = pipe(story.prompts[1], memory=memory, seed=seed, output_type="latent", **kw).frames
            with torch.no_grad():
                video = pipe.vae_decode(lat)[0]  # as the pipeline decodes, without the uint8 rounding
            return lat, ((video + 1.0) * 127.5).numpy().astype(np.float64)

        ref_lat, ref_pix = shot()
        lat, pix = shot(seed=101 + i)
        rows["seed + 1 (scale)"].append((float((lat - ref_lat).abs().mean()), float(np.abs(pix - ref_pix).mean())))
        for name, over in CHANGES.items():
            lat, pix = shot(**over)
            rows[name].append((float((lat - ref_lat).abs().mean()), float(np.abs(pix - ref_pix).mean())))

    print(f"model {profile.name}, {s.width}x{s.height}x{s.num_frames}, {s.num_inference_steps} steps, "
          f"M = {args.memory}, {args.shots} shots; mean |new - old|")  # fmt: skip
    print(f"| change | latent | pixels (0..255) |\n| --- | --- | --- |")
    for name, vals in rows.items():
        lat, pix = np.mean(vals, axis=0)
        print(f"| {name} | {lat:.4f} | {pix:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
