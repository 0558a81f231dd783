"""The whole pipeline on the tiny embedded models: modes, memory influence, LoRA, determinism."""

import numpy as np
import pytest
import torch

from storymem.config import ModelConfig
from storymem.lora import LoraKeyError, convert_to_diffusers, load_m2v_lora, native_lora_state_dict
from storymem.models import TinyWanConfig, build_embedded, tiny_transformer
from storymem.pipeline import StoryMemPipeline, build_pipeline, offset_noise

SIZE = dict(height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=2.0)


@pytest.fixture(scope="module")
def pipe():
    # Random weights (no bundle) so the tests do not depend on a trained file.
    p, _ = build_pipeline(ModelConfig(embedded_weights="random"))
    return p


@pytest.fixture(scope="module")
def shot(pipe):
    return pipe("a small red robot walks through a forest", seed=1, **SIZE).frames


def test_t2v_shot_shape_and_dtype(shot):
    assert shot.shape == (9, 32, 48, 3) and shot.dtype == np.uint8


def test_same_seed_same_shot(pipe, shot):
    again = pipe("a small red robot walks through a forest", seed=1, **SIZE).frames
    np.testing.assert_array_equal(shot, again)
    other = pipe("a small red robot walks through a forest", seed=2, **SIZE).frames
    assert np.abs(other.astype(int) - shot).mean() > 0.5


def test_memory_changes_the_shot(pipe, shot):
    """Random tiny weights attenuate differences (the random VAE maps most images to similar
    latents), so the check is on latents: the same memory reproduces them bit for bit, another
    memory or none moves them by far more than float noise."""
    rng = np.random.default_rng(0)
    mem_a = [shot[0], shot[-1]]
    mem_b = [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(2)]
    run = lambda **kw: pipe("the robot looks up", seed=3, output_type="latent", **SIZE, **kw)
    a, a2, b, zero = run(memory=mem_a), run(memory=mem_a), run(memory=mem_b), run(mode="m2v")
    assert a.mode == "m2v" and zero.mode == "m2v"
    torch.testing.assert_close(a.frames, a2.frames, rtol=0, atol=0)
    assert (a.frames - b.frames).abs().mean() > 1e-5
    assert (a.frames - zero.frames).abs().mean() > 1e-2


def test_memory_guidance_extrapolates_away_from_the_no_memory_prediction(pipe, shot):
    """One sampler step (first order: affine in the model output) so the result is affine in the
    memory guidance scale s: L(1) + L(3) = 2 L(2), and L(2) != L(1). Without memory s changes nothing;
    with memory and text CFG each step runs three passes (cond, uncond, no memory)."""
    mem = [shot[0], shot[-1]]
    one = {**SIZE, "num_inference_steps": 1}
    run = lambda s, **kw: pipe("the robot looks up", seed=3, output_type="latent", memory_guidance_scale=s, **one, **kw).frames
    l1, l2, l3 = run(1.0, memory=mem), run(2.0, memory=mem), run(3.0, memory=mem)
    assert (l2 - l1).abs().mean() > 1e-4
    torch.testing.assert_close(l1 + l3, 2 * l2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(1.0, mode="m2v"), run(3.0, mode="m2v"), rtol=0, atol=0)

    calls = []
    hooks = [t.register_forward_hook(lambda *a: calls.append(1)) for t in (pipe.transformer, pipe.transformer_2)]
    try:
        pipe("x", memory=mem, memory_guidance_scale=2.0, **SIZE)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 3 * SIZE["num_inference_steps"]
    with pytest.raises(ValueError, match="memory_guidance_scale"):
        pipe("x", memory=mem, memory_guidance_scale=0.5, **SIZE)


def test_memory_images_encoded_in_chunks_equal_one_batch(pipe, shot, monkeypatch):
    import storymem.pipeline as pipeline_module

    images = [shot[0], shot[4], shot[-1]]
    whole = pipe.encode_memory(images, 32, 48)
    monkeypatch.setattr(pipeline_module, "MEMORY_ENCODE_PIXELS", 32 * 48)  # one image per VAE call
    calls = []
    hook = pipe.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        chunked = pipe.encode_memory(images, 32, 48)
    finally:
        hook.remove()
    assert len(calls) == 3 and chunked.shape == whole.shape == (1, pipe.vae.config.z_dim, 3, 8, 12)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_memory_tokens_reach_shot_tokens_through_attention():
    """At the transformer: change only the memory latent frames of the input; the shot part of
    the prediction changes (memory reaches the shot through self-attention, not just by position)."""
    from storymem.m2v import memory_frames

    components, _ = build_embedded(ModelConfig(embedded_weights="random"))
    t = StoryMemPipeline(**components).transformer
    m, f = 2, 3
    x = torch.randn(1, 36, m + f, 4, 6, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, :, :m] = torch.randn(1, 36, m, 4, 6, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 5, TinyWanConfig().text_dim)
    with torch.no_grad(), memory_frames(t, m):
        out_x = t(x, torch.tensor([700.0]), ctx, return_dict=False)[0][:, :, m:]
        out_y = t(y, torch.tensor([700.0]), ctx, return_dict=False)[0][:, :, m:]
    assert (out_x - out_y).abs().mean() > 1e-3 * out_x.abs().mean()


def test_memory_images_of_other_sizes_are_resized(pipe):
    mem = [np.full((100, 70, 3), 200, np.uint8)]
    out = pipe("x", memory=mem, seed=0, **SIZE)
    assert out.frames.shape == (9, 32, 48, 3)


@pytest.mark.parametrize("k,mode", [(1, "mi2v"), (5, "mm2v")])
def test_motion_frames_select_mode(pipe, shot, k, mode):
    out = pipe("continue", memory=[shot[0]], motion_frames=shot[-k:], seed=4, **SIZE)
    assert out.mode == mode


def test_bad_inputs_name_the_field(pipe, shot):
    with pytest.raises(ValueError, match="num_frames"):
        pipe("x", **{**SIZE, "num_frames": 10})
    with pytest.raises(ValueError, match="height/width"):
        pipe("x", **{**SIZE, "height": 36})
    with pytest.raises(ValueError, match="motion_frames"):
        pipe("x", memory=[shot[0]], motion_frames=shot[-3:], **SIZE)


def test_offset_noise_is_plain_noise_at_zero_and_a_shared_channel_shift_otherwise():
    shape = (64, 4, 3, 8, 8)
    g = lambda: torch.Generator().manual_seed(5)
    torch.testing.assert_close(offset_noise(shape, 0.0, g()), torch.randn(shape, generator=g()), rtol=0, atol=0)
    plain, shifted = offset_noise(shape, 0.0, g()), offset_noise(shape, 1.0, g())
    # The offset is one value per sample and channel: means over frames and space spread by ~offset/sqrt(1 + offset^2).
    spread = lambda x: x.mean(dim=(2, 3, 4)).std().item()
    assert spread(plain) < 0.1 and 0.6 < spread(shifted) < 0.8
    assert abs(shifted.std().item() - 1.0) < 0.05  # renormalised: the sampler's sigma_max still means unit noise


def test_noise_offset_reaches_the_initial_latents(pipe):
    run = lambda off: pipe("the robot looks up", seed=3, output_type="latent", noise_offset=off, **{**SIZE, "num_inference_steps": 1}).frames
    assert (run(0.5) - run(0.0)).abs().mean() > 1e-2
    with pytest.raises(ValueError, match="noise_offset"):
        run(-0.1)


def test_step_callback_can_stop_a_shot(pipe):
    seen = []

    class Stop(Exception):
        pass

    def cb(step, total):
        seen.append((step, total))
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        pipe("x", step_callback=cb, **SIZE)
    assert seen == [(1, 4), (2, 4)]


def test_two_expert_switch_uses_both_models():
    components, profile = build_embedded(ModelConfig(embedded_weights="random"))
    pipe = StoryMemPipeline(**components, boundary_ratio=0.9)
    calls = {"high": 0, "low": 0}
    pipe.transformer.register_forward_hook(lambda *a: calls.__setitem__("high", calls["high"] + 1))
    pipe.transformer_2.register_forward_hook(lambda *a: calls.__setitem__("low", calls["low"] + 1))
    pipe.set_progress_bar_config(disable=True)
    pipe("x", **{**SIZE, "num_inference_steps": 10, "guidance_scale": 1.0})
    assert calls["high"] > 0 and calls["low"] > 0 and calls["high"] + calls["low"] == 10


def test_t2v_transformer_used_for_first_shot_when_present():
    components, _ = build_embedded(ModelConfig(embedded_weights="random"))
    tiny = TinyWanConfig()
    torch.manual_seed(0)
    components["t2v_transformer"] = tiny_transformer(tiny, in_channels=tiny.z_dim).eval()
    pipe = StoryMemPipeline(**components, boundary_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.t2v_transformer.register_forward_hook(lambda m, a, kw=None: seen.append(a))
    out = pipe("x", **SIZE)
    assert out.mode == "t2v" and seen


def test_memory_images_of_different_sizes_are_each_resized(pipe):
    # References of three sizes and aspect ratios (portrait, landscape, square): stacking them before
    # resizing crashed every MR2V story from shot 2 on.
    rng = np.random.default_rng(0)
    mem = [rng.integers(0, 255, s, dtype=np.uint8) for s in ((100, 70, 3), (20, 90, 3), (32, 48, 3))]
    out = pipe("x", memory=mem, motion_frames=[mem[2]], seed=0, **SIZE)
    assert out.frames.shape == (9, 32, 48, 3) and out.mode == "mi2v"
    together = pipe.encode_memory(mem, 32, 48)
    alone = torch.cat([pipe.encode_memory([m], 32, 48) for m in mem], dim=2)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- the authors' sampling defaults


def _wan_timesteps(steps: int, shift: float) -> list[int]:
    """Wan's solver, restated: sigmas linspace(0.999, 0, n+1)[:-1], shifted, times 1000, truncated."""
    sig = [0.999 * (1 - i / steps) for i in range(steps)]
    return [int(shift * s / (1 + (shift - 1) * s) * 1000) for s in sig]


@pytest.mark.parametrize("shift,literal", [
    (4.0, {0: 999, 1: 993, 2: 986, 12: 902, 13: 892, 20: 799, 38: 173, 39: 92}),
    (12.0, {0: 999, 1: 997, 10: 972, 25: 877, 26: 865, 38: 386, 39: 235}),
])  # fmt: skip
def test_wan_sigma_grid_at_40_steps(shift, literal):
    from storymem.models import make_scheduler
    from storymem.pipeline import make_timesteps

    sched = make_timesteps(make_scheduler(), 40, shift, "wan")
    got = sched.timesteps.tolist()
    assert got == _wan_timesteps(40, shift)
    assert {i: got[i] for i in literal} == literal
    assert float(sched.sigmas[-1]) == 0.0 and len(sched.sigmas) == 41
    # diffusers' own grid stays available and is a different one (1 .. 1/1000 before the shift).
    theirs = make_timesteps(make_scheduler(), 40, shift, "diffusers").timesteps.tolist()
    assert theirs != got and theirs[0] == got[0] == 999
    assert max(abs(a - b) for a, b in zip(theirs, got)) <= 7


def test_pipeline_samples_on_wan_grid_by_default(pipe):
    seen = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(int(kw["timestep"][0])), with_kwargs=True)
    hook2 = pipe.transformer_2.register_forward_hook(lambda m, a, kw, out: seen.append(int(kw["timestep"][0])), with_kwargs=True)
    try:
        pipe("x", memory=[np.zeros((32, 48, 3), np.uint8)], **{**SIZE, "guidance_scale": 1.0})
        wan, seen[:] = list(seen), []
        pipe("x", memory=[np.zeros((32, 48, 3), np.uint8)], sigma_schedule="diffusers", **{**SIZE, "guidance_scale": 1.0})
    finally:
        hook.remove()
        hook2.remove()
    assert wan == _wan_timesteps(4, 4.0) and seen != wan


def test_prompt_cleaning_as_wan_on_a_curly_quote_st_bench_prompt(pipe):
    import json
    from pathlib import Path

    import ftfy

    from storymem.pipeline import prompt_clean
    from storymem.script import load_script

    import os

    bench = Path(os.environ.get("STORYMEM_ST_BENCH", Path(__file__).resolve().parents[2] / "shared" / "st-bench"))
    if not (bench / "artist.json").exists():
        pytest.skip("ST-Bench scripts not present")
    shots = load_script(bench / "artist.json").shots
    prompt = next(s.prompt for s in shots if "paint\u2019s thick texture" in s.prompt)
    cleaned = prompt_clean(prompt)
    assert "\u2019" not in cleaned and "paint's thick texture" in cleaned
    assert "\u2014" in cleaned  # ftfy keeps the em dash: only quotes are uncurled
    assert prompt_clean(" a &amp;amp; b\n\t c ") == "a & b c"  # html unescaped twice, whitespace collapsed
    # The encoder sees the cleaned text: curly and straight quotes give the same embedding.
    torch.testing.assert_close(pipe.encode_prompt([prompt]), pipe.encode_prompt([prompt.replace("\u2019", "'")]))
    changed = sum(
        ftfy.fix_text(p) != p for f in sorted(bench.glob("*.json")) for sc in json.loads(f.read_text())["scenes"] for p in sc["video_prompts"]
    )
    assert changed == 47  # of ST-Bench's 300 prompts (method.md)


def _t2v_pipe():
    components, _ = build_embedded(ModelConfig(embedded_weights="random"))
    tiny = TinyWanConfig()
    torch.manual_seed(0)
    components["t2v_transformer"] = tiny_transformer(tiny, in_channels=tiny.z_dim).eval()
    components["t2v_transformer_2"] = tiny_transformer(tiny, in_channels=tiny.z_dim).eval()
    pipe = StoryMemPipeline(**components, boundary_ratio=0.9, t2v_boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_t2v_shot_uses_its_own_shift_boundary_and_guidance():
    pipe = _t2v_pipe()
    calls = {"high": [], "low": [], "m2v": 0}
    pipe.t2v_transformer.register_forward_hook(lambda m, a, kw, out: calls["high"].append(int(kw["timestep"][0])), with_kwargs=True)
    pipe.t2v_transformer_2.register_forward_hook(lambda m, a, kw, out: calls["low"].append(int(kw["timestep"][0])), with_kwargs=True)
    pipe.transformer.register_forward_hook(lambda *a: calls.__setitem__("m2v", calls["m2v"] + 1))
    steps = 8  # Wan's grid at shift 12: 999 988 972 952 922 877 | 799 631 (877 >= 875 but < 900)
    run = dict(SIZE, num_inference_steps=steps, height=16, width=16, num_frames=5)
    out = pipe("x", **{**run, "guidance_scale": 3.5})
    assert out.mode == "t2v" and out.model == "t2v" and out.notes == [] and calls["m2v"] == 0
    grid = _wan_timesteps(steps, 12.0)  # shift 12, not the M2V shots' 4
    high = [t for t in grid if t >= 875]
    assert calls["high"] == [t for t in high for _ in (0, 1)]  # CFG: two passes per step
    assert calls["low"] == [t for t in grid if t < 875 for _ in (0, 1)]
    assert len(high) == 6  # boundary 0.875, not 0.9 (5 steps)
    calls["high"].clear(), calls["low"].clear()
    pipe("x", **{**run, "guidance_scale": 3.5, "t2v_guidance_scale": 1.0, "t2v_shift": 4.0})
    assert calls["high"] + calls["low"] == _wan_timesteps(steps, 4.0)  # one pass a step: no CFG


def test_no_t2v_model_is_said_not_hidden(pipe, caplog):
    from storymem.pipeline import NO_T2V_NOTE

    out = pipe("x", **SIZE)
    assert out.mode == "t2v" and out.model == "m2v" and out.notes == [NO_T2V_NOTE]
    assert pipe("x", memory=[np.zeros((8, 8, 3), np.uint8)], **SIZE).notes == []


# ----------------------------------------------------------------- LoRA


def test_lora_conversion_of_reference_key_forms():
    t = tiny_transformer(TinyWanConfig(), 36)
    sd = native_lora_state_dict(t, rank=4)
    conv = convert_to_diffusers(sd)
    assert len(conv) == len(sd)
    assert "blocks.0.attn1.to_out.0.lora_A.weight" in conv and "blocks.1.ffn.net.0.proj.lora_B.weight" in conv
    # Adapter-named and unprefixed forms map to the same keys.
    named = {k.replace("base_model.model.", "").replace(".weight", ".default.weight"): v for k, v in sd.items()}
    assert convert_to_diffusers(named).keys() == conv.keys()


def test_unmappable_lora_key_is_an_error():
    t = tiny_transformer(TinyWanConfig(), 36)
    sd = native_lora_state_dict(t, rank=4)
    sd["base_model.model.blocks.0.norm3.lora_A.weight"] = torch.zeros(4, 48)
    with pytest.raises(LoraKeyError, match="norm3"):
        convert_to_diffusers(sd)
    too_deep = native_lora_state_dict(tiny_transformer(TinyWanConfig(layers=TinyWanConfig().layers + 1), 36), rank=4)
    with pytest.raises(LoraKeyError, match="lacks"):
        load_m2v_lora(tiny_transformer(TinyWanConfig(), 36), too_deep)


def test_lora_loads_completely_and_matches_manual_merge():
    torch.manual_seed(0)
    tiny = TinyWanConfig()
    base = tiny_transformer(tiny, 36).eval()
    adapted = tiny_transformer(tiny, 36).eval()
    adapted.load_state_dict(base.state_dict())
    rank, alpha = 8, 8.0
    sd = native_lora_state_dict(base, rank=rank, generator=torch.Generator().manual_seed(1))
    report = load_m2v_lora(adapted, sd, alpha=alpha)
    n_targets = tiny.layers * 10
    assert report["modules"] == n_targets and report["rank"] == rank
    # Manual merge: W += (alpha / sqrt(r)) * B @ A on every targeted linear of a third copy.
    merged = tiny_transformer(tiny, 36).eval()
    merged.load_state_dict(base.state_dict())
    scale = alpha / rank**0.5
    conv = convert_to_diffusers(sd)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for key in conv:
            if ".lora_A." in key:
                name = key.split(".lora_A.")[0]
                B = conv[key.replace("lora_A", "lora_B")]
                modules[name].weight += scale * B @ conv[key]
    x = torch.randn(1, 36, 3, 4, 4)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 7, tiny.text_dim)
    with torch.no_grad():
        y0 = base(x, t, ctx, return_dict=False)[0]
        y1 = adapted(x, t, ctx, return_dict=False)[0]
        y2 = merged(x, t, ctx, return_dict=False)[0]
    assert (y1 - y0).abs().max() > 1e-3  # the LoRA changed the output
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)


def test_lora_file_round_trip(tmp_path):
    tiny = TinyWanConfig()
    t = tiny_transformer(tiny, 36)
    sd = native_lora_state_dict(t, rank=4)
    path = tmp_path / "backbone_low_noise.pth"
    torch.save(sd, path)
    report = load_m2v_lora(tiny_transformer(tiny, 36), path)
    assert report["modules"] == tiny.layers * 10
