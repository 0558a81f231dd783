"""Train the embedded tiny StoryMem models on the synthetic world and ship them.

    .venv/bin/python scripts/train_embedded.py [--workdir DIR] [--out storymem/assets/tiny_m2v.safetensors]

Stages (each skipped when its output is already in --workdir, so an interrupted run continues):
1. render the training stories (storymem.toyworld, identities of the 'train' split only);
2. train the tiny AutoencoderKLWan on reconstruction (a random one reconstructs nothing), then fold
   its latent statistics into it so the pipeline's latent normalisation gives unit-scale latents;
3. train the M2V transformer from scratch with storymem.training (full training, memory from other
   shots of the same story, velocity loss on shot frames only, sigma uniform over the whole range);
   the text encoder stays frozen random;
4. write the bundle (models.save_bundle format) to --out, the transformer in both expert slots;
   with the stage 't2v' (not in the default --stages), also train a text-to-video transformer from
   scratch on the same clips (TrainConfig.task 't2v': text-only, 16 input channels), which the bundle
   then carries for the shots without memory (docs/identity.md, "A text-to-video transformer");
5. train the embedded scorer (storymem.training.scorer_recipe: the tiny CLIP image tower and the
   aesthetic head, on training clips through the trained VAE, some faded toward their background)
   and write it to --scorer-out, which ScoringConfig's embedded_scorer 'trained' loads.

--init-from BUNDLE continues a bundle instead (its VAE and transformer; stages 2 and the fresh
transformer are skipped): the shipped bundle is the first bundle's recipe plus three such
continuations, the last two on one memory frame, the last with the character's latent cells
weighted in the loss (--subject-weight; README, 'Evaluation and training').

One transformer serves both experts: at this size a model per half of the noise range would see
half the data each for no gain, and the pipeline's two-expert switch still runs on the demo.
--device cuda trains on a GPU (same recipe; the trainer autocasts the transformer to bf16 there).
Seeded: a rerun with the same arguments trains the same way (up to float nondeterminism).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

# Threads that spin while waiting lose badly on a shared 2-core machine; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from storymem import models, toyworld
from storymem.config import EMBEDDED_QUALITY_THRESHOLD, EMBEDDED_SCORER, ModelConfig, ScoringConfig
from storymem.models import TinyWanConfig
from storymem.training import TrainConfig, Trainer, fresh_copy, grow_transformer, normalise_vae_latents, reinit_autoencoder, train_vae
from storymem.training.vae_recipe import vae_round_trip

log = logging.getLogger("train_embedded")
REPO = Path(__file__).resolve().parents[1]
STAGES = {"transformer", "t2v", "scorer"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/storymem-train-embedded"))
    p.add_argument("--out", type=Path, default=models.EMBEDDED_BUNDLE)
    p.add_argument(
        "--init-from", type=Path, default=None,
        help="continue training this bundle (its VAE and transformer) instead of training both from scratch",
    )
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: TinyWanConfig's; with --init-from, grows the bundle's)")
    p.add_argument("--ffn-dim", type=int, default=None, help="feed-forward units per block (same rules as --layers)")
    p.add_argument("--warmup-steps", type=int, default=200, help="linear warm-up steps of each transformer stage (M2V and t2v)")
    p.add_argument("--scorer-out", type=Path, default=EMBEDDED_SCORER)
    p.add_argument("--scorer-clips", type=int, default=400, help="training clips the scorer sees (13 frames each)")
    p.add_argument("--scorer-steps", type=int, default=600)
    p.add_argument(
        "--stages", default="transformer,scorer",
        help="what to train after the data and the VAE (always made or loaded from --workdir), comma-separated: "
        "transformer (the M2V experts), t2v (a text-to-video transformer for shots without memory), scorer",
    )
    p.add_argument("--t2v-steps", type=int, default=3000, help="optimizer steps of the t2v stage (from scratch)")
    p.add_argument("--t2v-lr", type=float, default=4e-3, help="peak learning rate of the t2v stage")
    p.add_argument(
        "--t2v-continue", action="store_true",
        help="the t2v stage continues the text-to-video transformer of --init-from instead of a fresh one",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stories", type=int, default=400, help="training stories")
    p.add_argument("--shots", type=int, default=5, help="shots (clips) per training story")
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--vae-long-steps", type=int, default=200, help="VAE steps on whole clips (phase 2)")
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--vae-batch", type=int, default=6)
    p.add_argument("--steps", type=int, default=3500, help="transformer optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--max-memory", type=int, default=4, help="most memory frames of a training sample")
    p.add_argument("--motion-prob", type=float, default=0.5, help="share of samples conditioned on their first frame (MI2V)")
    p.add_argument("--memory-dropout", type=float, default=0.1, help="share of steps without memory")
    p.add_argument("--first-frame-weight", type=float, default=1.0, help="loss weight of a shot's first latent frame")
    p.add_argument("--subject-weight", type=float, default=1.0, help="loss weight of the character's latent cells (TrainConfig.subject_loss_weight)")
    p.add_argument("--noise-offset", type=float, default=0.0, help="per-channel noise offset in training (TrainConfig.noise_offset; 0 in the shipped recipe, docs/identity.md)")
    p.add_argument("--timestep-shift", type=float, default=1.0, help="TrainConfig.timestep_shift: 1 draws sigma uniformly (the shipped recipe), > 1 favours high noise")
    p.add_argument("--threads", type=int, default=1, help="1 when other jobs share a 2-core machine; 2 on an idle one (0.39-0.46 s a step against 0.50)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="TrainConfig.compile: torch.compile the training step (on 2 CPU cores an M2V step 0.38 s against 0.43 s, a T2V step 0.32 against 0.33)")
    p.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds for the transformer stage: timed over steps 10..30, --steps becomes what fits (the cosine follows)",
    )
    return p.parse_args(argv)


def load_clips(manifest: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    paths = pq.read_table(manifest).column("path").to_pylist()
    return np.stack([np.load(manifest.parent / p) for p in paths])


def stage_data(args, size) -> Path:
    data = args.workdir / "data"
    # The prompts are part of the data: a change of wording re-renders (the clips come out identical).
    params = {"stories": args.stories, "shots": args.shots, "seed": args.seed, "sizes": list(toyworld.SIZES),
              "prompt": toyworld.ToyShot("jumps", "blue", 0.3, 0.3, 0.3).prompt, "same_place": toyworld.SAME_PLACE_SHARE, "subject_masks": True, **size}
    marker = data / "params.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return data / "manifest.parquet"
    if data.exists():
        shutil.rmtree(data)
    t0 = time.perf_counter()
    manifest = toyworld.write_training_set(
        data, args.stories, args.shots, seed=args.seed, height=size["height"], width=size["width"], num_frames=size["num_frames"]
    )
    marker.write_text(json.dumps(params))
    log.info("rendered %d clips in %.1fs", args.stories * args.shots, time.perf_counter() - t0)
    return manifest


def _vae_phase(args, vae, clips: np.ndarray, path: Path, steps: int, lr: float, batch: int, crop: tuple, tag: int) -> dict:
    """One reconstruction phase on random crops (frames, height, width), cached in `path`."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        vae.load_state_dict(load_file(str(path)))
        return {}
    n, f, h, w, _ = clips.shape
    crop_f, crop_h, crop_w = crop

    def sample_batch(step: int) -> torch.Tensor:
        rng = np.random.default_rng([args.seed, tag, step])
        out = []
        for i in rng.choice(n - 64, size=batch, replace=False):  # the last 64 clips are held out
            t0, y0, x0 = rng.integers(0, f - crop_f + 1), rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
            out.append(clips[i, t0 : t0 + crop_f, y0 : y0 + crop_h, x0 : x0 + crop_w])
        x = torch.from_numpy(np.stack(out)).float() / 127.5 - 1.0  # (B, F, H, W, 3)
        return x.permute(0, 4, 1, 2, 3).contiguous().to(args.device)

    t0 = time.perf_counter()
    losses = train_vae(vae, sample_batch, steps, lr=lr)
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(path))
    return {f"vae{tag}_seconds": round(time.perf_counter() - t0, 1), f"vae{tag}_last_loss": round(float(np.mean(losses[-20:])), 4)}


def stage_vae(args, components, clips: np.ndarray) -> dict:
    """Train the VAE in two phases, then fold its latent statistics into it.

    Phase 1: 5-frame crops (the first frame and one 4-frame chunk: cheap, learns the spatial code);
    phase 2: whole 13-frame clips, so that the causal encoder/decoder also learn the chunks that
    follow a chunk (their cache comes from 4 frames, not from the first one)."""
    vae = reinit_autoencoder(fresh_copy(components["vae"], args.seed + 100), args.seed + 100).to(args.device)
    previous = args.workdir / "vae_report.json"
    report = json.loads(previous.read_text()) if previous.exists() else {}  # a cached phase keeps its timing
    report.update(_vae_phase(args, vae, clips, args.workdir / "vae_phase1.safetensors", args.vae_steps, args.vae_lr, args.vae_batch, (5, 40, 48), 7))
    n_frames = clips.shape[1]
    report.update(
        _vae_phase(args, vae, clips, args.workdir / "vae_trained.safetensors", args.vae_long_steps, args.vae_lr * 0.7, 4, (n_frames, 40, 48), 8)
    )
    vae.eval().requires_grad_(False)
    held = torch.from_numpy(clips[-64:]).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).to(args.device)
    mean, std = normalise_vae_latents(vae, held)
    with torch.no_grad():
        recon = vae.decode(vae.encode(held[:16]).latent_dist.mode()).sample
    rec = ((recon.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    errs = [toyworld.identity_error(rec[i], clips[-64 + i])["colour"] for i in range(16)]
    report.update(
        vae_psnr_db=round(float(10 * np.log10(4.0 / float((recon - held[:16]).pow(2).mean()))), 2),
        vae_identity_colour_error=round(float(np.mean(errs)), 4),
        latent_std_before_fold=[round(float(s), 3) for s in std],
    )
    (args.workdir / "vae_report.json").write_text(json.dumps(report, indent=2))
    log.info("vae: %s", report)
    return {"vae": vae.cpu()}


def stage_scorer(args, vae, clips: np.ndarray, manifest: Path) -> dict:
    """Train the embedded scorer on clips through the trained VAE; a quarter of them faded to at most
    half strength and a quarter to at least half (blank, faint and clear characters alike)."""
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from storymem.scoring import Scorer, embedded_scorer_state
    from storymem.training.scorer_recipe import TOY_VISIBILITY_CUT, blend_toward_background, train_toy_scorer, visibility_labels

    t0 = time.perf_counter()
    groups = pq.read_table(manifest).column("group_id").to_pylist()
    label_of = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    rng = np.random.default_rng([args.seed, 11])
    n = len(clips)
    held = np.arange(n - 64, n)  # the VAE's held-out clips
    pick = np.concatenate([rng.choice(n - 64, size=min(args.scorer_clips, n - 64), replace=False), held])
    u = rng.random(len(pick))
    alphas = np.where(u < 0.5, 1.0, np.where(u < 0.75, rng.uniform(0.0, 0.5, len(pick)), rng.uniform(0.5, 1.0, len(pick))))
    faded = blend_toward_background(clips[pick], alphas)
    video = vae_round_trip(vae.to(args.device).eval(), faded)
    vae.cpu()
    frames = video.reshape(-1, *video.shape[2:])
    chars = np.repeat([label_of[groups[i]] for i in pick], video.shape[1])
    visible = visibility_labels(frames)
    train = np.arange(len(frames)) < (len(pick) - len(held)) * video.shape[1]
    scorer = Scorer(ScoringConfig(clip_model="tiny", embedded_scorer="seeded", device=args.device))
    train_toy_scorer(scorer, frames[train], chars[train], visible[train], args.scorer_steps, seed=args.seed)
    emb, score = scorer.score_frames(frames[~train])
    v, c = visible[~train] > 0.5, chars[~train]
    kept = score >= TOY_VISIBILITY_CUT
    bank_kept = score >= EMBEDDED_QUALITY_THRESHOLD
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    both = v[:, None] & v[None, :]
    same = (c[:, None] == c[None, :]) & both & ~np.eye(len(c), dtype=bool)
    other = (c[:, None] != c[None, :]) & both
    args.scorer_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.scorer_out.with_name(args.scorer_out.name + ".tmp")
    save_file(embedded_scorer_state(scorer), str(tmp))
    os.replace(tmp, args.scorer_out)
    report = {
        "scorer_seconds": round(time.perf_counter() - t0, 1),
        "heldout_frames": int((~train).sum()),
        "heldout_visible_share": round(float(v.mean()), 3),
        "blank_frames_kept": round(float((kept & ~v).sum() / max(1, (~v).sum())), 4),
        "visible_frames_dropped": round(float((~kept & v).sum() / max(1, v.sum())), 4),
        "visible_frames_the_bank_takes": round(float((bank_kept & v).sum() / max(1, v.sum())), 4),
        "cosine_same_character": round(float(sim[same].mean()), 3),
        "cosine_other_character": round(float(sim[other].mean()), 3),
        "scorer": str(args.scorer_out),
    }
    (args.workdir / "scorer_report.json").write_text(json.dumps(report, indent=2))
    log.info("scorer: %s", report)
    return report


def train_config(args, manifest: Path, bundle: Path, output_dir: Path, **task) -> TrainConfig:
    """The recipe's TrainConfig for one transformer stage; `task` overrides (the T2V stage's)."""
    fields = dict(
        manifest=str(manifest),
        output_dir=output_dir,
        model=ModelConfig(embedded_weights=bundle, device=args.device),
        full=True,
        experts="high",
        boundary=0.0,  # the 'high' expert over sigma in [0, 1]: one transformer for the whole range
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        schedule="cosine",
        min_lr_ratio=0.05,
        weight_decay=0.01,
        min_memory=1,
        max_memory=args.max_memory,
        memory_candidates=4,
        memory_dropout=args.memory_dropout,
        memory_mask="sink_window",  # the shipped bundle's training (the embedded profile samples with it)
        text_dropout=0.1,
        uncond_prompts=[models.EMBEDDED_NEGATIVE_PROMPT, ""],  # the tiny tokenizer spells no Chinese
        memory_loss_weight=0.5,  # from scratch: learn to denoise the memory frames too (see TrainConfig)
        # Some samples are also conditioned on their own first frame (MI2V), as the Wan I2V base
        # model was pretrained: carrying a conditioned frame's content to moving frames is the
        # attention path that memory then uses; without it the from-scratch model ignores memory.
        # (0.25 with 6 memory frames, from scratch, trained a worse model: docs/identity.md.)
        motion_prob=args.motion_prob,
        first_frame_loss_weight=args.first_frame_weight,
        subject_loss_weight=args.subject_weight,
        noise_offset=args.noise_offset,
        timestep_shift=args.timestep_shift,
        seed=args.seed,
        save_every=500,
        log_every=50,
        num_threads=args.threads,
        compile=args.compile,
    )
    return TrainConfig(**{**fields, **task})


def run_trainer(args, cfg: TrainConfig, time_budget: float | None = None) -> dict:
    """Encode the latents, train, and return the run's summary with its validation loss before and after."""
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.data.precompute(trainer.eligible, batch_size=32, motion=cfg.motion_prob > 0)
    log.info("encoded %d clips in %.1fs", len(trainer.eligible), time.perf_counter() - t0)
    val_steps = list(range(10**6, 10**6 + 8))
    before = trainer.eval_loss(val_steps)
    if time_budget:
        # Time steps 10..30: the first ones pay for warm-up (CUDA kernels, allocator), 3x slower on an H100.
        t_probe, warm, probe = time.perf_counter(), 10, 20
        for _ in range(warm):
            trainer.train_step()
        t0 = time.perf_counter()
        for _ in range(probe):
            trainer.train_step()
        per_step = (time.perf_counter() - t0) / probe
        steps = max(warm + probe + 1, warm + probe + int((time_budget - (time.perf_counter() - t_probe)) / per_step))
        trainer.cfg = trainer.cfg.model_copy(update={"steps": steps})  # the LR schedule reads cfg.steps
        log.info("%.3f s per step: %d steps fit in %.0f s", per_step, steps, time_budget)
    summary = trainer.train()
    return {**summary, "val_loss_before": before, "val_loss_after": trainer.eval_loss(val_steps)}


def write_bundle(components: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    models.save_bundle(components, tmp)
    os.replace(tmp, out)  # readers never see a half-written bundle


def stage_t2v(args, manifest: Path, base: Path) -> dict:
    """Train a fresh text-to-video transformer (or, with --t2v-continue, `base`'s own) on the same clips
    (text-only samples, no condition channels) next to `base`'s M2V experts, and write both to --out."""
    if args.t2v_continue:
        stage = base  # it already holds the T2V transformer to continue (checked in main)
    else:
        components, _ = models.build_embedded(ModelConfig(embedded_weights=base), tiny=replace(TinyWanConfig(), t2v=True))
        components["t2v_transformer"] = fresh_copy(components["t2v_transformer"], args.seed + 2)
        stage = args.workdir / "stage_t2v.safetensors"
        models.save_bundle(components, stage)
    cfg = train_config(
        args, manifest, stage, args.workdir / "t2v", task="t2v", steps=args.t2v_steps, lr=args.t2v_lr,
        motion_prob=0.0,
    )  # fmt: skip
    summary = run_trainer(args, cfg)
    # The trainer's final bundle already holds base's parts and the trained T2V transformer.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.copyfile(summary["outputs"]["embedded_weights"], tmp)
    os.replace(tmp, args.out)
    return {
        "t2v_seconds": round(summary["seconds"], 1),
        "t2v_steps": summary["final_step"],
        "t2v_val_loss_before": round(summary["val_loss_before"], 4),
        "t2v_val_loss_after": round(summary["val_loss_after"], 4),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tiny = TinyWanConfig()
    size = {k: tiny.defaults[k] for k in ("height", "width", "num_frames")}
    t_start = time.perf_counter()
    stages = {x.strip() for x in args.stages.split(",") if x.strip()}
    if stages - STAGES:
        raise SystemExit(f"--stages: unknown {sorted(stages - STAGES)}; expected some of {', '.join(sorted(STAGES))}")
    if "t2v" in stages and "transformer" not in stages and args.init_from is None:
        raise SystemExit("--stages: t2v alone needs --init-from (the bundle whose M2V experts it joins)")
    if args.t2v_continue and ("transformer" in stages or args.init_from is None or not models.bundle_has_part(args.init_from, "t2v_transformer")):
        raise SystemExit("--t2v-continue: needs --init-from a bundle with a text-to-video transformer, and no transformer stage")

    manifest = stage_data(args, size)
    clips = load_clips(manifest)
    # The shipped bundle (if any) is irrelevant: VAE and transformers are re-initialised below, and the
    # frozen text encoder is the seeded one either way.
    sizes = {k: v for k, v in (("layers", args.layers), ("ffn_dim", args.ffn_dim)) if v is not None}
    if args.init_from is not None:
        # Continue a bundle: its VAE (the transformer's latent space) and its transformer, grown to
        # the sizes asked for without changing what it computes (storymem.training.grow).
        components, _ = models.build_embedded(ModelConfig(embedded_weights=args.init_from))
        if sizes:
            for k, name in enumerate(("transformer", "transformer_2")):
                components[name] = grow_transformer(components[name], seed=args.seed + k, **sizes).eval()
    else:
        components, _ = models.build_embedded(ModelConfig(embedded_weights="random"), tiny=replace(tiny, **sizes))
        components.update(stage_vae(args, components, clips))
    if "scorer" in stages:
        stage_scorer(args, components["vae"], clips, manifest)
    del clips
    report: dict = {}
    if "transformer" in stages:
        for k, name in enumerate(("transformer", "transformer_2")):
            if args.init_from is None:
                components[name] = fresh_copy(components[name], args.seed + k)
        stage1 = args.workdir / "stage1.safetensors"
        models.save_bundle(components, stage1)
        summary = run_trainer(args, train_config(args, manifest, stage1, args.workdir / "m2v"), args.time_budget)
        components, _ = models.build_embedded(ModelConfig(embedded_weights=summary["outputs"]["embedded_weights"]))
        components["transformer_2"].load_state_dict(components["transformer"].state_dict())
        write_bundle(components, args.out)
        report.update(
            transformer_seconds=round(summary["seconds"], 1),
            steps=summary["final_step"],
            val_loss_before=round(summary["val_loss_before"], 4),
            val_loss_after=round(summary["val_loss_after"], 4),
        )
    if "t2v" in stages:
        report.update(stage_t2v(args, manifest, args.out if "transformer" in stages else args.init_from))
    if not report:
        log.info("done in %.1fs (no transformer stage)", time.perf_counter() - t_start)
        return 0
    report.update(
        total_seconds=round(time.perf_counter() - t_start, 1), bundle=str(args.out), bundle_mb=round(args.out.stat().st_size / 2**20, 2)
    )
    (args.workdir / "report.json").write_text(json.dumps(report, indent=2))
    log.info("done: %s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
