"""M2V training on the tiny embedded models: loss goes down, the LoRA loads for inference through the
released-file loader, resume continues exactly, gloo data parallel matches one process."""

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from storymem import toyworld
from storymem.config import ModelConfig
from storymem.m2v import install_memory_rope, memory_frames
from storymem.training import (
    TrainConfig,
    Trainer,
    add_train_parser,
    normalise_vae_latents,
    read_clip_manifest,
    run_train,
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return toyworld.write_training_set(tmp_path_factory.mktemp("toy"), num_stories=4, shots_per_story=3, seed=11)


def config(manifest, out, **kw):
    base = dict(
        manifest=str(manifest),
        output_dir=out,
        # Random base: a few LoRA steps on it lower the loss measurably; the shipped bundle is already trained.
        model=ModelConfig(device="cpu", embedded_weights="random"),
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        batch_size=4,
        max_memory=3,
        memory_dropout=0.0,
        lr=3e-3,
        steps=4,
        save_every=2,
        log_every=1,
        num_threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def probe(model, m=2):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 36, m + 4, 6, 8, generator=g)
    ctx = torch.randn(1, 16, 32, generator=g)
    with torch.no_grad(), memory_frames(model, m):
        return model(x, torch.tensor([950.0]), ctx, return_dict=False)[0]


def test_lora_training_lowers_loss_and_loads_for_inference(manifest, tmp_path):
    from storymem.pipeline import build_pipeline

    cfg = config(manifest, tmp_path / "run", steps=12, save_every=12, lr=1e-2)
    trainer = Trainer(cfg)
    batches = list(range(12))
    before = trainer.eval_loss(batches)
    summary = trainer.train()
    after = trainer.eval_loss(batches)
    assert after < before - 1e-3, (before, after)
    files = summary["outputs"]
    assert set(files) == {"lora_high_noise", "lora_low_noise"}

    # The files load through the released-LoRA loader and reproduce the trained experts.
    pipe, _ = build_pipeline(
        ModelConfig(device="cpu", embedded_weights="random", lora_high_noise=files["lora_high_noise"], lora_low_noise=files["lora_low_noise"])
    )
    base, _ = build_pipeline(ModelConfig(device="cpu", embedded_weights="random"))
    trainer.loss_module.eval()
    for name, loaded, plain in (("high", pipe.transformer, base.transformer), ("low", pipe.transformer_2, base.transformer_2)):
        trained = probe(trainer.experts[name])
        torch.testing.assert_close(probe(loaded), trained, rtol=1e-4, atol=1e-5)
        assert (probe(plain) - trained).abs().max() > 1e-4  # the LoRA changed the expert
    out = pipe("the character jumps on a grey background", memory=[np.zeros((48, 64, 3), np.uint8)], seed=0, num_inference_steps=2, height=48, width=64, num_frames=5)
    assert out.frames.shape == (5, 48, 64, 3)


def test_full_training_from_scratch_writes_a_bundle(manifest, tmp_path):
    from storymem.pipeline import build_pipeline

    cfg = config(manifest, tmp_path / "full", full=True, init="random", steps=6, save_every=6, lr=3e-3)
    trainer = Trainer(cfg)
    before = trainer.eval_loss(range(6))
    summary = trainer.train()
    assert trainer.eval_loss(range(6)) < before
    bundle = summary["outputs"]["embedded_weights"]
    pipe, profile = build_pipeline(ModelConfig(device="cpu", embedded_weights=bundle))
    assert Path(bundle).name in profile.name
    trainer.loss_module.eval()
    torch.testing.assert_close(probe(pipe.transformer_2), probe(trainer.experts["low"]), rtol=1e-5, atol=1e-6)


def test_compiled_training_steps_as_eager_does(manifest, tmp_path):
    # Memory lengths 0 and 2 (dropout 0.5) and MI2V samples: the shapes that recompile.
    kw = dict(full=True, init="random", experts="high", boundary=0.0, steps=4, save_every=4, min_memory=2, max_memory=2,
              memory_dropout=0.5, motion_prob=0.5)  # fmt: skip
    eager = Trainer(config(manifest, tmp_path / "eager", **kw))
    compiled = Trainer(config(manifest, tmp_path / "compiled", compile=True, **kw))
    assert compiled.model is not compiled.loss_module  # the step runs through the compiled wrapper
    sizes = {eager.sample_plan(s)[0] for s in range(4)}
    assert len(sizes) > 1, sizes  # the run really changes shape between steps
    losses = [(eager.train_step(), compiled.train_step()) for _ in range(4)]
    for a, b in losses:
        assert b == pytest.approx(a, rel=1e-4)
    assert losses[-1][0] != pytest.approx(losses[0][0], rel=1e-3)  # the weights moved in between
    for (name, p), q in zip(eager.loss_module.named_parameters(), compiled.loss_module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)
    # Checkpoints hold the plain module's weights (no compile wrapper prefix).
    assert all(not k.startswith("_orig_mod") for k in compiled.trainable_state())


def test_resume_continues_from_the_saved_step(manifest, tmp_path):
    kw = dict(lora_dropout=0.05, batch_size=2)
    straight = Trainer(config(manifest, tmp_path / "straight", steps=6, save_every=100, **kw))
    straight.train()

    first = Trainer(config(manifest, tmp_path / "resumed", steps=4, save_every=2, **kw))
    first.train()
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000004").is_dir()
    second = Trainer(config(manifest, tmp_path / "resumed", steps=6, save_every=2, **kw))
    assert second.step == 4
    summary = second.train()
    assert summary["steps"] == 2 and summary["final_step"] == 6
    a, b = straight.trainable_state(), second.trainable_state()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step-0000004", "step-0000006"]  # keep_checkpoints=2
    fresh = Trainer(config(manifest, tmp_path / "resumed", steps=6, resume=False))
    assert fresh.step == 0


def test_samples_follow_the_recipe(manifest, tmp_path):
    trainer = Trainer(config(manifest, tmp_path / "plan", batch_size=8, max_memory=4, min_memory=2))
    records = trainer.records
    for step in range(5):
        m, plan = trainer.sample_plan(step)
        assert m == 0 or 2 <= m <= 4
        for p in plan:
            assert len(p["memory"]) == m
            # Memory comes from other clips of the same story, never from the clip itself.
            assert all(c != p["clip"] and records[c].group_id == records[p["clip"]].group_id for c, _ in p["memory"])
            lo, hi = trainer.sigma_range(p["expert"])
            assert lo <= p["sigma"] <= hi
    batch = trainer.build_batch(0)
    m, _ = trainer.sample_plan(0)
    for part in batch.values():
        assert part["clean"].shape[2] == m + 4 and part["condition"].shape[1] == 4 + 16
        # Mask channels: memory sink frames are 1, shot frames 0 (M2V).
        assert torch.all(part["condition"][:, :4, m:] == 0)
        if m:
            assert torch.all(part["condition"][:, :4, 0] == 1)
    assert trainer.sigma_range("high") == (0.9, 1.0) and trainer.sigma_range("low") == (0.0, 0.9)


def test_noise_offset_shifts_each_samples_noise_by_one_value_per_channel(manifest, tmp_path):
    """TrainConfig.noise_offset: each sample's noise gets its own per-channel constant (what the
    pipeline's noise_offset samples with); 0 keeps the i.i.d. draw of before."""
    def channel_means(offset):
        batch = Trainer(config(manifest, tmp_path / f"off{offset}", batch_size=8, noise_offset=offset)).build_batch(0)
        return torch.cat([part["noise"].mean(dim=(2, 3, 4)) for part in batch.values()])

    plain, shifted = channel_means(0.0), channel_means(1.0)
    assert plain.std() < 0.1 and shifted.std() > 0.4


def test_manifest_and_clips_from_s3(manifest, tmp_path, s3_store):
    root = Path(manifest).parent
    for path in [manifest, *sorted((root / "clips").glob("*.npy"))]:
        s3_store.put_bytes(path.relative_to(root).as_posix(), path.read_bytes())
    cfg = config("manifest.parquet", tmp_path / "s3", store="s3://unused-bucket")  # the store object wins
    trainer = Trainer(cfg, store=s3_store)
    local = Trainer(config(manifest, tmp_path / "local"))
    assert [r.clip_id for r in trainer.records] == [r.clip_id for r in local.records]
    a, b = trainer.build_batch(2), local.build_batch(2)
    for name in a:
        torch.testing.assert_close(a[name]["clean"], b[name]["clean"])
        torch.testing.assert_close(a[name]["condition"], b[name]["condition"])


def test_precomputed_latents_match_the_pipeline_encoders(manifest, tmp_path):
    trainer = Trainer(config(manifest, tmp_path / "pre", motion_prob=1.0))
    data = trainer.data
    data.precompute([0, 1, 2], batch_size=2, motion=True)
    frames = data._frames(1)
    pipe = trainer.pipe
    from storymem.pipeline import to_video_tensor

    torch.testing.assert_close(data._shot[1], pipe.vae_encode(to_video_tensor(frames, 48, 64).unsqueeze(0))[0], atol=1e-4, rtol=1e-4)
    memory = pipe.encode_memory([frames[j] for j in data.candidate_frames(len(frames))], 48, 64)[0]
    torch.testing.assert_close(data._memory[1], memory, atol=1e-4, rtol=1e-4)
    u = pipe.encode_condition_video(frames[:1], 13, 48, 64)[0]
    torch.testing.assert_close(data._motion[1], u, atol=1e-4, rtol=1e-4)
    # MI2V samples: the shot's first latent frame is marked as conditioned (mask 1 on all 4 channels).
    batch = trainer.build_batch(0)
    m, _ = trainer.sample_plan(0)
    for part in batch.values():
        assert torch.all(part["condition"][:, :4, m] == 1) and torch.all(part["condition"][:, :4, m + 1 :] == 0)


def test_bad_inputs_are_named(manifest, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"clip_id": ["a"], "path": ["x.npy"], "prompt": ["p"]}), bad)
    with pytest.raises(ValueError, match="group_id"):
        read_clip_manifest(bad)
    pq.write_table(pa.table({"clip_id": ["a", "a"], "group_id": ["g", "g"], "path": ["x", "y"], "prompt": ["p", "q"]}), bad)
    with pytest.raises(ValueError, match=r"clip_id\[1\]"):
        read_clip_manifest(bad)
    pq.write_table(pa.table({"clip_id": ["a", "b"], "group_id": ["g", "h"], "path": ["x", "y"], "prompt": ["p", "q"]}), bad)
    with pytest.raises(ValueError, match="group_id"):
        Trainer(config(bad, tmp_path / "o"))
    with pytest.raises(ValueError, match="min_memory"):
        config(manifest, tmp_path / "o", min_memory=5, max_memory=2)
    with pytest.raises(ValueError, match="init"):
        config(manifest, tmp_path / "o", init="random")


def test_train_cli(manifest, tmp_path):
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["train", "--manifest", str(manifest), "--output-dir", str(out), "--steps", "2",
                              "--batch-size", "2", "--lora-rank", "2", "--device", "cpu"])
    assert run_train(args) == 0
    assert (out / "final" / "lora_high_noise.safetensors").exists()
    assert (out / "final" / "model_config.json").exists()
    bad = parser.parse_args(["train", "--manifest", str(manifest), "--output-dir", str(out), "--steps", "0"])
    assert run_train(bad) == 2


def test_normalise_vae_latents_keeps_reconstruction():
    from storymem.models import build_embedded
    from storymem.pipeline import StoryMemPipeline, to_video_tensor

    components, _ = build_embedded(ModelConfig(device="cpu"))
    pipe = StoryMemPipeline(**components)
    frames = np.stack(toyworld.render_story(toyworld.make_stories(1, 4, seed=3)[0], num_frames=5))
    videos = torch.stack([to_video_tensor(f, 48, 64) for f in frames])
    with torch.no_grad():
        before = pipe.vae_decode(pipe.vae_encode(videos))
    normalise_vae_latents(pipe.vae, videos)
    with torch.no_grad():
        z = pipe.vae_encode(videos)
        after = pipe.vae_decode(z)
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(z.shape[1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(per_channel.std(1), torch.ones(z.shape[1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(after, before, atol=2e-4, rtol=0)


def test_vae_reinit_and_reconstruction_training():
    from storymem.models import build_embedded
    from storymem.training import fresh_copy, reinit_autoencoder, train_vae

    components, _ = build_embedded(ModelConfig(device="cpu"))
    vae = reinit_autoencoder(fresh_copy(components["vae"], 0), 0)
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sensitivity = (vae.decode(z).sample - vae.decode(-z).sample).abs().mean()
    assert sensitivity > 0.05  # the decoder's output depends on its latent from the start
    clip = toyworld.render_shot(toyworld.Character("circle", "red", "red", "plain", 10), toyworld.ToyShot("jumps", "blue", 0.5, 0.5, 0.3), num_frames=5)
    x = torch.from_numpy(clip[:, 8:40, 16:48]).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    losses = train_vae(vae, lambda step: x, steps=12, lr=3e-3, log_every=0)
    assert np.mean(losses[-3:]) < losses[0] * 0.8
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.multiprocessing as mp
    from pathlib import Path
    from storymem.config import ModelConfig
    from storymem.training import TrainConfig, Trainer

    manifest, out = sys.argv[1], Path(sys.argv[2])

    def cfg(batch):
        return TrainConfig(manifest=manifest, output_dir=out / "unused", model=ModelConfig(device="cpu"), lora_rank=4,
                           lora_alpha=8, lora_dropout=0.0, batch_size=batch, max_memory=2, memory_dropout=0.0,
                           text_dropout=0.5, resume=False, num_threads=1)

    def grads(trainer):
        return {n: p.grad.detach().clone() for n, p in trainer.loss_module.named_parameters() if p.requires_grad}

    def worker(rank):
        t = Trainer(cfg(2), rank=rank, world_size=2, init_method=f"file://{out / 'pg'}")
        loss = t.forward_backward(step=3)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads(t)}, out / "ddp.pt")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    if __name__ == "__main__":
        # fork: the workers inherit the imported modules instead of importing torch/diffusers again.
        mp.start_processes(worker, nprocs=2, join=True, start_method="fork")
        single = Trainer(cfg(4), rank=0, world_size=1)
        loss = single.forward_backward(step=3)
        torch.save({"loss": loss, "grads": grads(single)}, out / "single.pt")
    """
)


def test_gloo_data_parallel_matches_single_process(manifest, tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(manifest), str(tmp_path)], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert ddp["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 0
    nonzero = 0
    for k, g in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][k], g, rtol=1e-4, atol=1e-7)
        nonzero += int(g.abs().max() > 0)
    assert nonzero > len(single["grads"]) // 4  # both experts' LoRA B matrices got gradients


def _shot_errors(trainer, name, part):
    """(b, z, f, h, w) squared velocity errors of one expert's batch part on the shot's latent frames."""
    model = trainer.experts[name]
    m = part["num_memory"]
    sigma = part["sigma"].view(-1, 1, 1, 1, 1)
    noisy = (1.0 - sigma) * part["clean"] + sigma * part["noise"]
    with torch.no_grad(), memory_frames(model, m):
        pred = model(hidden_states=torch.cat([noisy, part["condition"]], 1), timestep=part["sigma"] * 1000.0,
                     encoder_hidden_states=part["text"], return_dict=False)[0]  # fmt: skip
    return (pred - (part["noise"] - part["clean"])).pow(2)[:, :, m:]


def test_first_frame_loss_weight_is_a_weighted_mean_over_shot_frames(manifest, tmp_path):
    """first_frame_loss_weight w: the shot loss is (w * e0 + e1 + ... + e_{f-1}) / (w + f - 1) of the
    per-frame errors e_k; w = 1 is the plain mean (the paper's loss, and the older checkpoints')."""
    from storymem.training import M2VLoss

    trainer = Trainer(config(manifest, tmp_path / "ffw", memory_dropout=0.0, min_memory=2, max_memory=2))
    name, part = next(iter(trainer.build_batch(0).items()))
    per_frame = _shot_errors(trainer, name, part).mean(dim=(1, 3, 4))  # (b, f)
    b, f = per_frame.shape
    with torch.no_grad():
        plain = M2VLoss(trainer.experts)({name: part}, b)
        weighted = M2VLoss(trainer.experts, first_frame_loss_weight=3.0)({name: part}, b)
    torch.testing.assert_close(plain, per_frame.mean(1).sum() / b, rtol=1e-5, atol=1e-6)
    expected = ((3.0 * per_frame[:, 0] + per_frame[:, 1:].sum(1)) / (3.0 + f - 1)).sum() / b
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(weighted, plain)


def test_latent_subject_mask_follows_the_causal_vae_grid():
    """Latent frame 0 is pixel frame 0, latent frame j >= 1 pixel frames 4(j-1)+1 .. 4j; a latent cell is
    subject when any of its pixels is."""
    from storymem.training.data import latent_subject_mask

    mask = np.zeros((13, 48, 64), bool)
    mask[0, 0, 0] = True  # frame 0 -> latent frame 0, cell (0, 0)
    mask[5, 10, 21] = True  # frame 5 -> latent frame 2 (frames 5..8), cell (2, 5)
    lat = latent_subject_mask(mask, 13, spatial=4, temporal=4)
    assert lat.shape == (4, 12, 16)
    assert lat.sum() == 2 and lat[0, 0, 0] == 1 and lat[2, 2, 5] == 1


def test_subject_loss_weight_is_a_weighted_mean_over_each_frames_cells(tmp_path):
    """subject_loss_weight w: per shot frame, (w * sum of subject-cell errors + other cells) / (w * n_s + n_o);
    w = 1 is the plain mean. The toy world's manifest gives every clip its character's mask."""
    from storymem.training import M2VLoss

    manifest = toyworld.write_training_set(tmp_path / "toy", num_stories=2, shots_per_story=2, seed=3)
    trainer = Trainer(config(manifest, tmp_path / "sw", subject_loss_weight=4.0))
    batch = trainer.build_batch(0)
    name, part = next(iter(batch.items()))
    subject = part["subject"]  # (b, f, h, w)
    assert subject.shape[0] == part["clean"].shape[0] and 0 < subject.mean() < 0.5
    cell = _shot_errors(trainer, name, part).mean(1)  # (b, f, h, w)
    b = cell.shape[0]
    cells = 1.0 + 3.0 * subject
    expected = ((cell * cells).sum((2, 3)) / cells.sum((2, 3))).mean(1).sum() / b
    with torch.no_grad():
        weighted = M2VLoss(trainer.experts, subject_loss_weight=4.0)({name: part}, b)
        plain = M2VLoss(trainer.experts)({name: part}, b)
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, cell.mean((1, 2, 3)).sum() / b, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(weighted, plain)


def test_subject_loss_weight_needs_masks(tmp_path):
    import pyarrow.parquet as pq

    manifest = toyworld.write_training_set(tmp_path / "toy", num_stories=2, shots_per_story=2, seed=3)
    bare = tmp_path / "toy" / "bare.parquet"
    pq.write_table(pq.read_table(manifest).drop(["subject_mask"]), bare)
    with pytest.raises(ValueError, match="subject_loss_weight.*subject_mask"):
        Trainer(config(bare, tmp_path / "bare", subject_loss_weight=2.0))
    Trainer(config(bare, tmp_path / "plain"))  # without the weight the column is optional


def test_a_grown_transformer_computes_the_same_and_its_bundle_records_the_sizes(manifest, tmp_path):
    from storymem import models
    from storymem.pipeline import build_pipeline
    from storymem.training import grow_transformer

    components, _ = models.build_embedded(ModelConfig(device="cpu", embedded_weights="random"))
    small = components["transformer"]
    install_memory_rope(small)
    grown = grow_transformer(small, layers=6, ffn_dim=320, seed=3)
    assert (grown.config.num_layers, grown.config.ffn_dim) == (6, 320)
    torch.testing.assert_close(probe(grown), probe(small), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        grow_transformer(small, layers=2)

    # The bundle says how big its transformers are; the loader builds them at that size.
    components.update(transformer=grown, transformer_2=grow_transformer(components["transformer_2"], layers=6, ffn_dim=320))
    bundle = tmp_path / "grown.safetensors"
    models.save_bundle(components, bundle)
    assert models.bundle_transformer_sizes(bundle) == {"heads": 2, "head_dim": 32, "layers": 6, "ffn_dim": 320}
    pipe, _ = build_pipeline(ModelConfig(device="cpu", embedded_weights=bundle))
    assert len(pipe.transformer.blocks) == 6
    torch.testing.assert_close(probe(pipe.transformer), probe(small), rtol=1e-5, atol=1e-6)

    # Training reaches the new blocks: their zeroed output projections move.
    trainer = Trainer(config(manifest, tmp_path / "grown", full=True, model=ModelConfig(device="cpu", embedded_weights=bundle), steps=2, save_every=2))
    trainer.train()
    new_block = trainer.experts["high"].blocks[5]
    assert new_block.ffn.net[2].weight.abs().max() > 0
    assert new_block.attn1.to_out[0].weight.abs().max() > 0


def test_a_text_to_video_transformer_trains_text_only_and_makes_the_shots_without_memory(manifest, tmp_path):
    from dataclasses import replace

    from storymem import models
    from storymem.pipeline import NO_T2V_NOTE, build_pipeline

    with pytest.raises(ValueError, match="motion_prob"):
        config(manifest, tmp_path / "o", task="t2v", full=True, motion_prob=0.5)
    with pytest.raises(ValueError, match="full"):
        config(manifest, tmp_path / "o", task="t2v")
    with pytest.raises(ValueError, match="t2v"):  # a bundle without a text-to-video transformer
        Trainer(config(manifest, tmp_path / "o", task="t2v", full=True))

    components, _ = models.build_embedded(ModelConfig(device="cpu", embedded_weights="random"), tiny=replace(models.TinyWanConfig(), t2v=True))
    t2v = components["t2v_transformer"]
    assert t2v.config.in_channels == 16  # the noisy latents only, as Wan2.2-T2V
    base = tmp_path / "with_t2v.safetensors"
    models.save_bundle(components, base)
    assert models.bundle_has_part(base, "t2v_transformer")
    m2v_before = {k: v.clone() for k, v in components["transformer"].state_dict().items()}

    cfg = config(manifest, tmp_path / "t2v", task="t2v", full=True, model=ModelConfig(device="cpu", embedded_weights=base),
                 memory_dropout=0.0, steps=6, save_every=6)  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.experts["high"] is trainer.pipe.t2v_transformer
    _, plan = trainer.sample_plan(0)
    assert all(not p["memory"] and not p["motion"] for p in plan)  # text-only whatever memory_dropout says
    batch = trainer.build_batch(0)
    assert all(part["condition"] is None and part["num_memory"] == 0 for part in batch.values())
    before = trainer.eval_loss(range(6))
    summary = trainer.train()
    assert trainer.eval_loss(range(6)) < before

    # The bundle keeps the M2V experts as they were and carries the trained T2V transformer, which
    # then makes every shot without memory; shots with memory stay with the M2V experts.
    bundle = summary["outputs"]["embedded_weights"]
    pipe, profile = build_pipeline(ModelConfig(device="cpu", embedded_weights=bundle))
    assert profile.has_t2v
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, m2v_before[k])
    trainer.loss_module.eval()
    for k, v in pipe.t2v_transformer.state_dict().items():
        torch.testing.assert_close(v, trainer.experts["high"].state_dict()[k])
    gen = dict(height=48, width=64, num_frames=5, num_inference_steps=2, seed=1)
    shot = pipe("a figure jumps in the middle, blue background", **gen)
    assert shot.model == "t2v" and NO_T2V_NOTE not in shot.notes
    remembered = pipe("a figure jumps in the middle, blue background", memory=[shot.frames[2]], **gen)
    assert remembered.model == "m2v"


def test_the_embedded_recipe_continues_a_bundle_and_adds_a_text_to_video_transformer(tmp_path):
    """scripts/train_embedded.py end to end at toy size: the M2V stage from --init-from, then the t2v stage."""
    import json

    from safetensors.torch import load_file

    from storymem import models

    repo = Path(__file__).resolve().parents[1]
    components, _ = models.build_embedded(ModelConfig(device="cpu"))
    components["t2v_transformer"] = None  # the shipped M2V experts alone, as before the T2V stage
    base, out = tmp_path / "m2v_only.safetensors", tmp_path / "x.safetensors"
    models.save_bundle(components, base)
    cmd = [sys.executable, str(repo / "scripts" / "train_embedded.py"), "--workdir", str(tmp_path / "w"),
           "--init-from", str(base), "--out", str(out), "--stages", "transformer,t2v",
           "--stories", "4", "--shots", "3", "--steps", "2", "--t2v-steps", "2", "--batch-size", "4", "--max-memory", "1"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert report["steps"] == 2 and report["t2v_steps"] == 2
    shipped, trained = load_file(str(base)), load_file(str(out))
    assert models.bundle_has_part(out, "t2v_transformer") and not models.bundle_has_part(base, "t2v_transformer")
    key = "transformer.proj_out.weight"
    assert not torch.equal(trained[key], shipped[key])  # the M2V stage trained
    torch.testing.assert_close(trained["transformer_2.proj_out.weight"], trained[key])  # one transformer, both slots
    assert trained["t2v_transformer.patch_embedding.weight"].shape[1] == 16

    # --t2v-continue trains that bundle's text-to-video transformer on (at a tiny learning rate it stays
    # next to it), instead of a fresh one; a bundle without one is refused before any work.
    again = tmp_path / "y.safetensors"
    cont = [sys.executable, str(repo / "scripts" / "train_embedded.py"), "--workdir", str(tmp_path / "w2"),
            "--init-from", str(out), "--out", str(again), "--stages", "t2v", "--t2v-continue", "--stories", "4",
            "--shots", "3", "--t2v-steps", "2", "--t2v-lr", "1e-6", "--warmup-steps", "0", "--batch-size", "4"]  # fmt: skip
    subprocess.run(cont, check=True, capture_output=True, timeout=300)
    t2v_key = "t2v_transformer.proj_out.weight"
    continued = load_file(str(again))
    torch.testing.assert_close(continued[t2v_key], trained[t2v_key], rtol=0, atol=1e-5)
    assert not torch.equal(continued[t2v_key], trained[t2v_key])  # it did train
    assert torch.equal(continued[key], trained[key])  # next to the bundle's M2V experts, untouched
    from_m2v_only = [str(base) if arg == str(out) else arg for arg in cont]
    refused = subprocess.run(from_m2v_only, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--t2v-continue" in refused.stderr
