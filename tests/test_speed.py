"""Speed and memory modes (storymem.speed) on the embedded tiny model, CPU, a few seconds each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from storymem import models
from storymem.config import ModelConfig, StoryMemConfig
from storymem.pipeline import StoryMemPipeline, build_pipeline
from storymem.speed import (
    LIGHTX2V_SHIFT,
    PRESET_NAMES,
    SpeedConfig,
    apply_speed,
    manual_merge,
    preset,
    synthetic_lightx2v_lora,
)

from tests.test_lora import _merge as lora_merge  # noqa: E402
from tests.test_lora import release  # noqa: E402,F401 - the synthetic M2V release fixture

CPU = torch.device("cpu")
SHOT = dict(height=48, width=64, num_frames=5, seed=3)


def _memory():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(2)]


def _shot(pipe, **kw):
    args = dict(SHOT, num_inference_steps=4, guidance_scale=2.0, memory_guidance_scale=1.0)
    args.update(kw)
    return pipe("a red fox runs", memory=_memory(), **args)


@pytest.fixture(scope="module")
def exact():
    """The plain embedded pipeline and its reference shots, shared by the comparisons below."""
    pipe, _ = build_pipeline(ModelConfig())
    return pipe


class Counter:
    """Calls of each expert's first and last block FFN: the FFN of a block a cache skips does not run."""

    def __init__(self, pipe):
        self.first = self.last = 0
        for t in (pipe.transformer, pipe.transformer_2):
            t.blocks[0].ffn.register_forward_pre_hook(lambda *_: self._bump("first"))
            t.blocks[-1].ffn.register_forward_pre_hook(lambda *_: self._bump("last"))

    def _bump(self, which):
        setattr(self, which, getattr(self, which) + 1)


def test_exact_preset_equals_the_plain_pipeline_bit_for_bit():
    # The pipeline as it was built before speed modes existed: components, constructor, .to(device).
    components, profile = models.build_embedded(ModelConfig())
    plain = StoryMemPipeline(
        **components,
        boundary_ratio=profile.boundary,
        max_sequence_length=profile.max_sequence_length,
        t2v_boundary_ratio=profile.t2v_boundary,
        default_negative_prompt=profile.defaults.get("negative_prompt"),
    )
    plain.set_progress_bar_config(disable=True)
    plain.to(CPU)
    exact, _ = build_pipeline(ModelConfig(), preset("exact"))
    a, b = _shot(plain, memory_guidance_scale=3.0), _shot(exact, memory_guidance_scale=3.0)
    assert np.array_equal(a.frames, b.frames)
    assert exact.speed.is_exact and not preset("cached").is_exact


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_and_makes_a_shot(name):
    pipe, profile = build_pipeline(ModelConfig(), preset(name))
    settings = {k: v for k, v in profile.defaults.items() if k in ("num_inference_steps", "guidance_scale", "shift")}
    out = _shot(pipe, **settings)
    assert out.frames.shape == (5, 48, 64, 3) and out.frames.dtype == np.uint8
    if name == "fast":  # the LightX2V recipe became the profile's defaults
        assert settings == {"num_inference_steps": 4, "guidance_scale": 1.0, "shift": LIGHTX2V_SHIFT}


def test_fast_sampler_is_euler_on_the_lightx2v_sigmas():
    pipe, _ = build_pipeline(ModelConfig(), preset("fast"))
    sched = pipe.shot_scheduler(4, LIGHTX2V_SHIFT, CPU)
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler"
    # LightX2V's denoising_step_list [1000, 750, 500, 250] at shift 5
    assert torch.allclose(sched.timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    assert float(sched.sigmas[-1]) == 0.0


def test_guidance_one_runs_one_forward_per_step():
    pipe, _ = build_pipeline(ModelConfig())  # its own: the counting hooks stay on it
    count = Counter(pipe)
    _shot(pipe, guidance_scale=1.0)
    assert count.first == 4
    count.first = 0
    _shot(pipe, guidance_scale=2.0)
    assert count.first == 8
    count.first = 0
    _shot(pipe, guidance_scale=2.0, memory_guidance_scale=3.0)
    assert count.first == 12


def test_step_cache_skips_blocks_and_drifts_measurably(exact):
    cached, _ = build_pipeline(ModelConfig(), SpeedConfig(cache={"kind": "first_block", "threshold": 0.3}))
    count = Counter(cached)
    kw = dict(num_inference_steps=8, output_type="latent")
    ref = _shot(exact, **kw).frames
    out = _shot(cached, **kw).frames
    assert count.first == 16  # the first block always runs (it decides)
    assert count.last < 16  # the rest of the blocks were skipped on some steps
    drift = float((out - ref).abs().mean() / ref.abs().mean())
    assert 0.0 < drift < 2.0 and np.isfinite(drift)
    # the cache state is reset between shots: the same shot again gives the same latents
    assert torch.equal(_shot(cached, **kw).frames, out)


def test_group_offload_gives_the_same_output(exact):
    offloaded, _ = build_pipeline(ModelConfig(), SpeedConfig(group_offload="block_level", text_encoder_on_cpu=True))
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    assert _is_group_offload_enabled(offloaded.transformer) and _is_group_offload_enabled(offloaded.transformer_2)
    assert np.array_equal(_shot(exact).frames, _shot(offloaded).frames)


def test_stacked_lightx2v_lora_equals_a_manual_merge(tmp_path):
    from safetensors.torch import save_file

    base, _ = build_pipeline(ModelConfig(embedded_weights="random"))
    files, weights = {}, {"high_noise": 0.7, "low_noise": 1.3}
    for i, (expert, t) in enumerate((("high_noise", base.transformer), ("low_noise", base.transformer_2))):
        native = synthetic_lightx2v_lora(t, rank=4, alpha=2.0, seed=i)
        save_file(native, str(tmp_path / f"{expert}.safetensors"))
        files[expert] = native
    lora = dict(name="lightx2v", high_noise=tmp_path / "high_noise.safetensors", low_noise=tmp_path / "low_noise.safetensors",
                weight_high=weights["high_noise"], weight_low=weights["low_noise"])
    merged, _ = build_pipeline(ModelConfig(embedded_weights="random"))
    manual_merge(merged.transformer, files["high_noise"], weights["high_noise"])
    manual_merge(merged.transformer_2, files["low_noise"], weights["low_noise"])
    want, plain = (_shot(p, output_type="latent").frames for p in (merged, base))
    assert (want - plain).abs().max() > 1e-2  # the LoRA changes the shot
    for fuse in (True, False):
        stacked, _ = build_pipeline(ModelConfig(embedded_weights="random"), SpeedConfig(loras=[lora], fuse_loras=fuse))
        assert stacked.lora.fused == fuse and stacked.lora.active == ("lightx2v_high", "lightx2v_low")
        got = _shot(stacked, output_type="latent").frames
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (fuse, float((got - want).abs().max()))


def test_speed_lora_stays_on_while_the_m2v_sets_switch(release, tmp_path):
    """Two released M2V sets (unfused, one active per story) with a LightX2V-format LoRA pinned on top:
    each set's shot equals the hand merge of that set plus the speed LoRA at its per-expert weights."""
    from safetensors.torch import save_file

    root, sds = release
    probe, _ = build_pipeline(ModelConfig(embedded_weights="random"))
    native = {e: synthetic_lightx2v_lora(t, rank=4, seed=20 + i) for i, (e, t) in
              enumerate((("high", probe.transformer), ("low", probe.transformer_2)))}
    for e, sd in native.items():
        save_file(sd, str(tmp_path / f"{e}.safetensors"))
    lora = dict(name="lightx2v", high_noise=tmp_path / "high.safetensors", low_noise=tmp_path / "low.safetensors",
                weight_high=1.2, weight_low=0.8)
    pipe, _ = build_pipeline(ModelConfig(embedded_weights="random", lora_release=root), SpeedConfig(loras=[lora]))
    for key in ("mm2v", "mi2v"):
        pipe.activate_lora(key)
        assert pipe.lora.active == (f"m2v_{key}", "lightx2v_high", "lightx2v_low") and not pipe.lora.fused
        ref, _ = build_pipeline(ModelConfig(embedded_weights="random"))
        for e, t, w in (("high", ref.transformer, 1.2), ("low", ref.transformer_2, 0.8)):
            lora_merge(t, sds[key][e])
            manual_merge(t, native[e], w)
        got, want = (_shot(p, output_type="latent").frames for p in (pipe, ref))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_combinations_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"speed\.fp8_compute"):
        pipe, _ = build_pipeline(ModelConfig(), SpeedConfig(fp8_compute=True))
    with pytest.raises(ValidationError, match=r"speed\.group_offload"):
        StoryMemConfig(model={"offload": "model"}, speed={"preset": "lowvram"})
    with pytest.raises(ValidationError, match=r"cache"):
        SpeedConfig(preset="fast", cache={"kind": "first_block"})
    with pytest.raises(ValidationError, match=r"fp8_storage"):
        SpeedConfig(fp8_storage=True, fp8_compute=True)
    with pytest.raises(ValidationError, match=r"sigmas"):
        SpeedConfig(sampler={"kind": "unipc", "sigmas": [1.0, 0.5]})
    with pytest.raises(ValidationError, match=r"preset"):
        SpeedConfig(preset="turbo")
    fast, _ = build_pipeline(ModelConfig(), preset("fast"))
    with pytest.raises(ValueError, match=r"^guidance_scale: speed mode fast is CFG-distilled"):
        _shot(fast, guidance_scale=3.5)
    with pytest.raises(ValueError, match=r"^num_inference_steps: speed mode fast samples 4"):
        _shot(fast, guidance_scale=1.0, num_inference_steps=8)


def test_speed_section_parses_a_preset_with_overrides(tmp_path):
    cfg = StoryMemConfig(speed={"preset": "fast", "loras": [{"name": "lightx2v", "low_noise": str(tmp_path / "l.safetensors")}]})
    assert cfg.speed.sampler.kind == "euler" and cfg.speed.sampler.guidance_free and cfg.speed.loras[0].weight_low == 1.0
    assert StoryMemConfig().speed.is_exact
    with pytest.raises(ValidationError, match="high_noise/low_noise"):
        StoryMemConfig(speed={"loras": [{"name": "x"}]})


def test_apply_speed_refuses_group_offload_with_model_offload():
    components, profile = models.build_embedded(ModelConfig())
    pipe = StoryMemPipeline(**components, boundary_ratio=profile.boundary)
    with pytest.raises(ValueError, match=r"^speed\.group_offload"):
        apply_speed(pipe, SpeedConfig(group_offload="leaf_level"), CPU, offload="model")


def test_prepared_gpu_script_runs_a_speed_mode_on_cpu(tmp_path, monkeypatch):
    """bench/gpu_pipeline.py's --speed path (with a LightX2V-format LoRA fused at full rank 64) and the
    bench/gpu_modes.py table, at tiny size: the code a GPU session runs, so it does not crash there."""
    import sys

    from bench import gpu_modes, gpu_pipeline

    out = tmp_path / "gpu_mode_fast_lora.json"
    monkeypatch.setattr(sys, "argv", ["gpu_pipeline.py", "--device", "cpu", "--tiny", "--memory", "2",
                                      "--speed", "fast", "--speed-lora", "--json", str(out)])
    gpu_pipeline.main()
    row = gpu_modes.rows([out])["fast+lora"]
    assert row["steps"] == 4 and row["shot_s"] > 0 and row["error"] is None
    assert "met" in gpu_modes.verdict("fast+lora", row, {}) or "missed" in gpu_modes.verdict("fast+lora", row, {})


def test_a_story_the_mode_cannot_honour_is_refused_before_anything_is_written(tmp_path):
    from storymem.local import run_story
    from storymem.script import ScriptError, load_request

    cfg = StoryMemConfig(speed={"preset": "fast"})
    script = {"story_name": "fast", "shots": [{"prompt": "a red fox runs", "cut": True}],
              "settings": {"width": 64, "height": 48, "num_frames": 5, "guidance_scale": 3.5}}
    with pytest.raises(ScriptError) as err:
        run_story(load_request(script), tmp_path / "out", cfg, progress=False)
    assert [field for field, _ in err.value.errors] == ["settings.guidance_scale"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    # Left unset, the mode's defaults apply (4 steps, guidance 1) and the story is made.
    del script["settings"]["guidance_scale"]
    manifest = run_story(load_request(script), tmp_path / "ok", cfg, progress=False)
    assert manifest.shots_done == 1


def test_m2v_weight_scales_the_released_set(release):
    """speed.m2v_weight sets the M2V set's adapter weight (fused when one set is loaded)."""
    root, sds = release
    cfg = ModelConfig(embedded_weights="random", lora_release=root, lora_release_sets=["mi2v"])
    pipe, _ = build_pipeline(cfg, SpeedConfig(m2v_weight=1.3))
    assert pipe.lora.fused and pipe.lora.weights == {"m2v_mi2v": 1.3}
    ref, _ = build_pipeline(ModelConfig(embedded_weights="random"))
    lora_merge(ref.transformer, sds["mi2v"]["high"], 1.3)
    lora_merge(ref.transformer_2, sds["mi2v"]["low"], 1.3)
    got, want = (_shot(p, output_type="latent").frames for p in (pipe, ref))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
