"""Every speed mode (storymem.speed) on one toy-world story, embedded model, CPU.

    .venv/bin/python bench/modes.py [--shots 4] [--stories 1] [--modes exact cached fast ...] [--json FILE]

Prints `mode | steps | transformer forwards per shot | seconds per shot | latent drift vs exact |
identity colour error (toy world)`; `--json FILE` writes `{mode: {steps, forwards_per_shot,
seconds_per_shot, drift, colour_error}}` (plus a few extra keys).

The story is a held-out storymem.toyworld story with a reference first appearance: shot 1 is the
rendered character, three of its frames (first, middle, last) are the memory of every later shot, so
each mode sees the same memory and its shots compare one for one with exact's.

* forwards per shot: full transformer forwards, counted as calls of the last block's feed-forward
  (a block the step cache skips does not run it), summed over both experts;
* seconds per shot: the fastest shot of the mode (generation + decode; the least disturbed by other
  work on a shared machine);
* drift: mean |latents - exact's latents| / mean |exact's latents| over the shot latents (0: same);
* colour error: storymem.toyworld.identity_error of each generated shot against the rendered first
  appearance (mean character colour distance, 0..1; bench/proof.py's metric).

On the embedded model `fast` runs the LightX2V recipe (Euler, 4 fixed sigmas, shift 5, no CFG) without
a distilled LoRA (none exists for the tiny model), so its row shows the sampler's cost and the quality a
non-distilled model loses at 4 steps, not the distilled quality; `compiled` is eager on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from storymem import toyworld
from storymem.config import ModelConfig
from storymem.pipeline import build_pipeline
from storymem.script import GenerationSettings
from storymem.speed import SpeedConfig, preset

# name -> (speed mode, settings that differ from the profile's defaults)
MODES: dict[str, tuple[SpeedConfig, dict]] = {
    "exact": (preset("exact"), {}),
    "exact, no CFG": (preset("exact"), {"guidance_scale": 1.0, "memory_guidance_scale": 1.0}),
    "cached (0.05)": (preset("cached"), {}),
    "cached (0.2)": (SpeedConfig(cache={"kind": "first_block", "threshold": 0.2}), {}),
    "fast": (preset("fast"), {}),
    "fast + memory guidance": (preset("fast"), {"memory_guidance_scale": 3.0}),
    "lowvram": (preset("lowvram"), {}),
    "compiled": (preset("compiled"), {}),
}


class ForwardCounter:
    def __init__(self, pipe):
        self.n = 0
        for t in (pipe.transformer, pipe.transformer_2):
            if t is not None:
                t.blocks[-1].ffn.register_forward_pre_hook(self._bump)

    def _bump(self, *_):
        self.n += 1


def run_mode(name: str, speed: SpeedConfig, extra: dict, stories, shots_ref: dict | None):
    pipe, profile = build_pipeline(ModelConfig(), speed)
    values = {k: v for k, v in profile.defaults.items() if k in GenerationSettings.model_fields}
    values.update(extra)
    s = GenerationSettings(**values)
    gen = dict(height=s.height, width=s.width, num_frames=s.num_frames, num_inference_steps=s.num_inference_steps,
               guidance_scale=s.guidance_scale, guidance_scale_2=s.guidance_scale_2,
               memory_guidance_scale=s.memory_guidance_scale, shift=s.shift, fix=s.fix)
    count = ForwardCounter(pipe)
    latents, colour, seconds, forwards = {}, [], [], []
    for i, story in enumerate(stories):
        first = toyworld.render_shot(story.character, story.shots[0], s.height, s.width, s.num_frames)
        memory = [first[0], first[len(first) // 2], first[-1]]
        reference = toyworld.identity_descriptor(first)
        for k in range(1, len(story.shots)):
            count.n = 0
            t0 = time.perf_counter()
            out = pipe(story.prompts[k], memory=memory, seed=1000 * i + k, output_type="latent", **gen)
            video = pipe.vae_decode(out.frames)[0]
            seconds.append(time.perf_counter() - t0)
            forwards.append(count.n)
            frames = ((video.permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            colour.append(toyworld.identity_error(frames, reference)["colour"])
            latents[(i, k)] = out.frames
    drift = None
    if shots_ref is not None:
        d = [float((latents[key] - ref).abs().mean() / ref.abs().mean()) for key, ref in shots_ref.items()]
        drift = float(np.mean(d))
    row = dict(steps=s.num_inference_steps, forwards_per_shot=float(np.mean(forwards)),
               seconds_per_shot=float(np.min(seconds)), drift=drift, colour_error=float(np.mean(colour)),
               guidance_scale=s.guidance_scale, memory_guidance_scale=s.memory_guidance_scale, shots=len(seconds))
    return row, latents


def table(rows: dict) -> str:
    head = "| mode | steps | transformer forwards per shot | seconds per shot | latent drift vs exact | identity colour error (toy world) |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        drift = "-" if r["drift"] is None else f"{r['drift']:.3f}"
        lines.append(f"| {name} | {r['steps']} | {r['forwards_per_shot']:g} | {r['seconds_per_shot']:.2f} | {drift} | {r['colour_error']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stories", type=int, default=1)
    p.add_argument("--shots", type=int, default=4, help="shots per story, the rendered first one included")
    p.add_argument("--seed", type=int, default=2026, help="story sampling seed (held-out split)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stories = toyworld.make_stories(args.stories, args.shots, args.seed, split="heldout")
    names = ["exact"] + [m for m in args.modes if m != "exact"]
    rows, ref = {}, None
    for name in names:
        speed, extra = MODES[name]
        t0 = time.perf_counter()
        rows[name], latents = run_mode(name, speed, extra, stories, ref)
        if ref is None:
            ref, rows[name]["drift"] = latents, 0.0
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(f"{args.stories} held-out toy stor{'y' if args.stories == 1 else 'ies'} x {args.shots - 1} generated shots, "
          f"embedded model, {torch.get_num_threads()} CPU threads\n")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
