"""The synthetic proof that memory carries identity (bench/proof.py runs it at full size, tests/test_proof.py
in small): held-out toy-world stories made shot by shot through the real StoryMemPipeline and the real
memory bank, with memory and with memory removed, measured in pixel space (storymem.toyworld)."""

from __future__ import annotations

import numpy as np

from . import toyworld
from .config import MemoryConfig
from .memory import MemoryBank
from .script import GenerationSettings


def story_settings(profile, **overrides) -> GenerationSettings:
    """A proof story's settings on this model: `overrides` as a story would set them, the model's
    defaults for the rest, validated together (e.g. a sink larger than the bank is refused)."""
    return GenerationSettings(**overrides).resolve(profile.defaults)


def pipeline_kwargs(s: GenerationSettings) -> dict:
    """The StoryMemPipeline keyword arguments a story with these settings generates a shot with."""
    return dict(
        height=s.height,
        width=s.width,
        num_frames=s.num_frames,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        memory_guidance_scale=s.memory_guidance_scale,
        shift=s.shift,
        fix=s.fix,
        memory_mask=s.memory_mask,  # the profile's: the shipped bundle was trained with window frames masked 2
        sigma_schedule=s.sigma_schedule,
        # used when the model has a text-to-video transformer (it then makes every shot without memory)
        t2v_shift=s.t2v_shift,
        t2v_guidance_scale=s.t2v_guidance_scale,
    )


def run_story(pipe, scorer, story: toyworld.ToyStory, *, memory: bool, first: str, settings: GenerationSettings,
              seed: int, noise_offset: float = 0.0, bank_sizes: list | None = None):
    """Frames of every shot; shot 0 is the first appearance (rendered or generated). bank_sizes, when
    given, gets the number of memory frames each shot 2..N was conditioned on. noise_offset: the
    pipeline's (a measurement knob, not a story setting)."""
    mcfg = MemoryConfig().resolved(scorer.cfg)  # the quality filter a story run with this scorer applies
    bank = MemoryBank(max_size=settings.max_memory_size, fix=settings.fix)
    skip = settings.keyframe_skip  # every proof shot is a cut: no MI2V/MM2V overlap to drop
    gen = {**pipeline_kwargs(settings), "noise_offset": noise_offset}
    h, w, f = settings.height, settings.width, settings.num_frames
    if first == "reference":
        shots = [toyworld.render_shot(story.character, story.shots[0], h, w, f)]
    else:
        shots = [pipe(story.prompts[0], seed=seed, **gen).frames]
    if memory:
        bank.update(0, shots[0], *scorer.score_frames(shots[0]), mcfg, tail_frames=0, skip=skip)
    for k in range(1, len(story.shots)):
        if bank_sizes is not None:
            bank_sizes.append(len(bank) if memory else 0)
        out = pipe(story.prompts[k], memory=bank.images() if memory else None, seed=seed + k, **gen).frames
        shots.append(out)
        if memory:
            bank.update(k, out, *scorer.score_frames(out), mcfg, tail_frames=0, skip=skip)
    return shots


def background_error(frames: np.ndarray, background: str) -> float:
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1).reshape(-1, 3)
    want = np.asarray(toyworld.BACKGROUNDS[background], dtype=np.float64)
    return float(np.linalg.norm(np.median(border, axis=0) - want) / (255.0 * np.sqrt(3.0)))


def evaluate(pipe, scorer, stories, *, first: str, settings: GenerationSettings, seed: int = 0,
             noise_offset: float = 0.0) -> dict:
    """Per condition: mean colour/shape error of shots 2..N against shot 1, identity match, found, background."""
    results: dict = {}
    runs, sizes = {}, {}
    for cond in ("memory", "no_memory"):
        sizes[cond] = []
        runs[cond] = [
            run_story(pipe, scorer, s, memory=cond == "memory", first=first, settings=settings, seed=seed + 100 * i,
                      noise_offset=noise_offset, bank_sizes=sizes[cond])
            for i, s in enumerate(stories)
        ]
    for cond, story_shots in runs.items():
        firsts = [toyworld.identity_descriptor(shots[0]) for shots in story_shots]
        colour, shape, found, match, bg = [], [], [], [], []
        for i, (story, shots) in enumerate(zip(stories, story_shots)):
            for k in range(1, len(shots)):
                err = toyworld.identity_error(shots[k], firsts[i])
                colour.append(err["colour"])
                shape.append(err["shape"])
                found.append(err["found"])
                d = toyworld.identity_descriptor(shots[k])
                if d.found > 0 and len(stories) > 1:
                    dist = [np.linalg.norm(d.colour - r.colour) if r.found > 0 else np.inf for r in firsts]
                    match.append(float(int(np.argmin(dist)) == i))
                else:
                    match.append(0.0)
                bg.append(background_error(shots[k], story.shots[k].background))
        visible = [c for c, f in zip(colour, found) if f > 0]
        results[cond] = {
            "colour_error": float(np.mean(colour)),
            # Only shots where a character was found: a missing one scores 1 above, which would flatter memory.
            "colour_error_visible": float(np.mean(visible)) if visible else 1.0,
            "shape_error": float(np.mean(shape)),
            "identity_match": float(np.mean(match)),
            "found": float(np.mean(found)),
            # A shot shows the character when it is found in at least half of its frames.
            "shots_with_character": float(np.mean([f >= 0.5 for f in found])),
            "background_error": float(np.mean(bg)),
            "shots": len(colour),
            "memory_frames": float(np.mean(sizes[cond])),
            "colour_error_per_shot": [round(c, 4) for c in colour],
        }
    return {"results": results, "runs": runs}


def autoencode(pipe, frames: np.ndarray) -> np.ndarray:
    """frames through the model's VAE and back (what the best possible generation would look like)."""
    import torch

    from storymem.pipeline import to_video_tensor

    f, h, w, _ = frames.shape
    with torch.no_grad():
        video = pipe.vae_decode(pipe.vae_encode(to_video_tensor(frames, h, w).unsqueeze(0)))[0]
    return ((video.permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def reference_lines(pipe, stories, settings: GenerationSettings) -> dict:
    """The metric on ground truth: the same character in another shot (rendered, and through the
    VAE: the floor a generated shot can reach) and a different character."""
    h, w, f = settings.height, settings.width, settings.num_frames
    renders = [toyworld.render_story(s, h, w, f) for s in stories]
    same = [toyworld.identity_error(r[k], r[0])["colour"] for r in renders for k in range(1, len(r))]
    vae = [toyworld.identity_error(autoencode(pipe, r[k]), r[0])["colour"] for r in renders for k in range(1, len(r))]
    other = [
        toyworld.identity_error(renders[(i + 1) % len(renders)][k], renders[i][0])["colour"]
        for i in range(len(renders))
        for k in range(1, len(renders[i]))
    ]
    return {"same_character": float(np.mean(same)), "same_character_vae": float(np.mean(vae)), "different_character": float(np.mean(other))}
