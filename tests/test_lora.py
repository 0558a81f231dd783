"""Both released LoRA sets on the tiny model: discovery, per-shot selection, fusing and stacking,
and the refusal of a story whose transition no loaded set serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from storymem.config import ModelConfig, StoryMemConfig
from storymem.lora import (
    AdapterStack,
    LoraKeyError,
    convert_to_diffusers,
    load_release,
    native_lora_state_dict,
    select_set,
)
from storymem.models import TinyWanConfig, tiny_transformer
from storymem.pipeline import build_pipeline
from storymem.script import GenerationSettings, ScriptError, StoryRequest, check_transition_supported
from storymem.story import PipelineGenerator, ShotRequest

SIZE = dict(height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=2.0)
RANK = 4


def _release_sd(transformer, seed: int) -> dict:
    # Large enough that a set visibly moves the output of the tiny model.
    sd = native_lora_state_dict(transformer, rank=RANK, generator=torch.Generator().manual_seed(seed))
    return {k: v * 5 for k, v in sd.items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release folder with the released layout and key names for the tiny experts: the MI2V set
    as .safetensors, the MM2V set as .pth (the driver's form). Returns (folder, {set: {expert: sd}})."""
    root = tmp_path_factory.mktemp("release")
    probe = tiny_transformer(TinyWanConfig(), 36)
    sds = {}
    for k, (key, folder) in enumerate((("mi2v", "Wan2.2-MI2V-A14B"), ("mm2v", "Wan2.2-MM2V-A14B"))):
        (root / folder).mkdir()
        sds[key] = {}
        for j, expert in enumerate(("high", "low")):
            sd = _release_sd(probe, seed=10 * k + j)
            sds[key][expert] = sd
            stem = root / folder / f"backbone_{expert}_noise"
            if key == "mi2v":
                save_file({n: t.contiguous() for n, t in sd.items()}, f"{stem}.safetensors")
            else:
                torch.save(sd, f"{stem}.pth")
    (root / "README.md").write_text("not a set")
    return root, sds


def _merge(transformer, sd: dict, weight: float = 1.0) -> None:
    """W += weight * (alpha / sqrt(r)) * B @ A with alpha = r (rsLoRA), on every targeted linear."""
    conv = convert_to_diffusers(sd)
    modules = dict(transformer.named_modules())
    scale = weight * RANK / RANK**0.5
    with torch.no_grad():
        for key, a in conv.items():
            if ".lora_A." in key:
                modules[key.split(".lora_A.")[0]].weight += scale * conv[key.replace("lora_A", "lora_B")] @ a


def _merged_pipe(sds: dict, weights: dict[str, float]):
    """The plain tiny pipeline with the given sets merged by hand (the reference)."""
    pipe, _ = build_pipeline(ModelConfig(embedded_weights="random"))
    for key, w in weights.items():
        _merge(pipe.transformer, sds[key]["high"], w)
        _merge(pipe.transformer_2, sds[key]["low"], w)
    return pipe


def _lora_layers(transformer):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


MEMORY = [np.random.default_rng(3).integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(2)]


def _latents(pipe, **kw):
    return pipe("a fox runs through snow", memory=MEMORY, mode="m2v", seed=4, output_type="latent", **SIZE, **kw).frames


def test_release_discovery(release, tmp_path):
    root, _ = release
    sets = load_release(root)
    assert [(s.name, sorted(s.transitions)) for s in sets] == [
        ("m2v_mi2v", ["mi2v", "none"]),
        ("m2v_mm2v", ["mm2v", "none"]),
    ]
    assert sets[0].files["high"].name == "backbone_high_noise.safetensors"
    assert sets[1].files["low"].name == "backbone_low_noise.pth"
    assert [s.name for s in load_release(root, ["mm2v"])] == ["m2v_mm2v"]
    with pytest.raises(FileNotFoundError, match="holds none of"):
        load_release(tmp_path)
    (tmp_path / "Wan2.2-MI2V-A14B").mkdir()
    with pytest.raises(FileNotFoundError, match="backbone_high_noise"):
        load_release(tmp_path)
    with pytest.raises(FileNotFoundError, match="Wan2.2-MM2V-A14B"):
        load_release(tmp_path, ["mm2v"])
    with pytest.raises(ValueError, match="lora_release"):
        ModelConfig(lora_release=root, lora_low_noise=root / "x.pth")


def test_transition_none_picks_the_mi2v_set_whatever_the_order(release):
    sets = load_release(root := release[0])
    assert select_set(sets, "none").name == "m2v_mi2v"
    assert select_set(sets[::-1], "none").name == "m2v_mi2v"
    assert select_set(sets, "mm2v").name == "m2v_mm2v"
    with pytest.raises(ValueError, match="settings.transition"):
        select_set(load_release(root, ["mi2v"]), "mm2v")


def test_both_sets_unfused_and_each_shot_uses_its_stories_set(release):
    root, sds = release
    pipe, profile = build_pipeline(ModelConfig(embedded_weights="random", lora_release=root))
    assert profile.transitions == {"none", "mi2v", "mm2v"} == pipe.supported_transitions
    assert set(pipe.transformer.peft_config) == set(pipe.transformer_2.peft_config) == {"m2v_mi2v", "m2v_mm2v"}
    ref = {key: _latents(_merged_pipe(sds, {key: 1.0})) for key in ("mi2v", "mm2v")}
    assert (ref["mi2v"] - ref["mm2v"]).abs().max() > 1e-2  # the two sets make different shots
    generator = PipelineGenerator(pipe)
    for transition, key in (("mm2v", "mm2v"), ("mi2v", "mi2v"), ("none", "mi2v"), ("mm2v", "mm2v")):
        request = ShotRequest(
            story="s", index=1, prompt="a fox runs through snow", mode="m2v", seed=4,
            settings=GenerationSettings(**SIZE, seed=4, transition=transition), memory=MEMORY,
        )  # fmt: skip
        frames = generator.generate(request).frames
        assert pipe.lora.active == (f"m2v_{key}",) and not pipe.lora.fused
        assert not any(layer.merged for layer in _lora_layers(pipe.transformer))
        # The generator switched the set: the same call now reproduces the hand-merged set to 1e-4.
        got = _latents(pipe)
        torch.testing.assert_close(got, ref[key], rtol=1e-4, atol=1e-4)
        other = "mi2v" if key == "mm2v" else "mm2v"
        assert (got - ref[other]).abs().max() > 1e-2
        assert frames.shape == (9, 32, 48, 3)

    # Per-adapter weights: both sets at once at their own weights equal the weighted manual merge.
    pipe.lora.activate(["m2v_mi2v", "m2v_mm2v"], [0.5, 0.25])
    assert pipe.lora.weights == {"m2v_mi2v": 0.5, "m2v_mm2v": 0.25} and not pipe.lora.fused
    weighted = _latents(_merged_pipe(sds, {"mi2v": 0.5, "mm2v": 0.25}))
    torch.testing.assert_close(_latents(pipe), weighted, rtol=1e-4, atol=1e-4)


def test_one_set_is_fused_and_a_pinned_adapter_stacks_on_it(release):
    root, sds = release
    pipe, profile = build_pipeline(ModelConfig(embedded_weights="random", lora_release=root, lora_release_sets=["mm2v"]))
    assert profile.transitions == {"none", "mm2v"}
    assert pipe.lora.fused and pipe.lora.active == ("m2v_mm2v",)
    layers = _lora_layers(pipe.transformer_2)
    assert layers and all(layer.merged for layer in layers)
    expected = _latents(_merged_pipe(sds, {"mm2v": 1.0}))
    assert pipe.activate_lora("none") == "m2v_mm2v"
    torch.testing.assert_close(_latents(pipe), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="settings.transition"):
        pipe.activate_lora("mi2v")

    # A file that fails to load leaves the stack as it was, fused again on the next activation.
    with pytest.raises(LoraKeyError):
        pipe.lora.add("broken", {"low": {"blocks.0.norm3.lora_A.weight": torch.zeros(RANK, 64)}})
    assert "broken" not in pipe.transformer_2.peft_config and not pipe.lora.fused
    pipe.activate_lora("mm2v")
    assert pipe.lora.fused
    torch.testing.assert_close(_latents(pipe), expected, rtol=1e-4, atol=1e-4)

    # A speed-LoRA-like adapter with its own weight, always on: stacked on the M2V set.
    speed = {e: _release_sd(tiny_transformer(TinyWanConfig(), 36), seed=40 + i) for i, e in enumerate(("high", "low"))}
    pipe.lora.add("speed", speed, weight=0.7, pinned=True)
    assert not pipe.lora.fused  # adding unfused the merged set
    pipe.lora.activate(["m2v_mm2v"], [1.0])
    assert pipe.lora.active == ("m2v_mm2v", "speed") and pipe.lora.fused  # still one combination: fused
    pipe.activate_lora("mm2v")  # the same combination again: nothing to do
    ref = _merged_pipe(sds, {"mm2v": 1.0})
    _merge(ref.transformer, speed["high"], 0.7)
    _merge(ref.transformer_2, speed["low"], 0.7)
    torch.testing.assert_close(_latents(pipe), _latents(ref), rtol=1e-4, atol=1e-4)
    # Nothing active leaves the base weights exactly.
    pipe.lora.disable()
    assert pipe.lora.active == () and not pipe.lora.fused
    plain, _ = build_pipeline(ModelConfig(embedded_weights="random"))
    torch.testing.assert_close(_latents(pipe), _latents(plain), rtol=1e-4, atol=1e-4)


def test_a_separate_t2v_model_gets_no_m2v_lora(release):
    from storymem.models import build_embedded
    from storymem.pipeline import StoryMemPipeline

    def pipe_with_t2v():
        components, _ = build_embedded(ModelConfig(embedded_weights="random"))
        tiny = TinyWanConfig()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            components["t2v_transformer"] = tiny_transformer(tiny, in_channels=tiny.z_dim).eval()
        p = StoryMemPipeline(**components, boundary_ratio=0.9)
        p.set_progress_bar_config(disable=True)
        return p

    plain, pipe = pipe_with_t2v(), pipe_with_t2v()
    pipe.attach_lora(load_release(release[0]))
    pipe.activate_lora("mm2v")
    assert not getattr(pipe.t2v_transformer, "peft_config", None)
    kw = dict(mode="t2v", seed=2, output_type="latent", **SIZE)
    torch.testing.assert_close(pipe("a fox", **kw).frames, plain("a fox", **kw).frames, rtol=0, atol=0)
    # The M2V experts do carry the set: an M2V shot differs from the plain pipeline's.
    assert (_latents(pipe) - _latents(plain)).abs().max() > 1e-2


def test_stack_rejects_unknown_names_and_experts():
    t = tiny_transformer(TinyWanConfig(), 36)
    stack = AdapterStack({"low": t})
    with pytest.raises(ValueError, match="not in this stack"):
        stack.add("a", {"high": native_lora_state_dict(t, rank=2)})
    stack.add("a", {"low": native_lora_state_dict(t, rank=2)})
    with pytest.raises(ValueError, match="already loaded"):
        stack.add("a", {"low": native_lora_state_dict(t, rank=2)})
    with pytest.raises(ValueError, match="not loaded"):
        stack.activate(["b"])
    with pytest.raises(ValueError, match="weights"):
        stack.activate(["a"], [1.0, 2.0])


def test_wrong_pairing_is_refused_with_the_field_named(release, tmp_path):
    root, _ = release
    settings = GenerationSettings(transition="mm2v")
    with pytest.raises(ScriptError) as err:
        check_transition_supported(settings, {"none", "mi2v"})
    (field, problem), = err.value.errors
    assert field == "settings.transition" and "mm2v" in problem and "Wan2.2-MM2V-A14B" in problem
    check_transition_supported(settings, {"none", "mm2v"})  # served: no error

    # The local run refuses before loading weights or writing anything.
    from storymem.local import run_story

    request = StoryRequest.model_validate(
        {"script": {"shots": [{"prompt": "a"}, {"prompt": "b", "cut": False}]}, "settings": {"transition": "mm2v"}}
    )
    cfg = StoryMemConfig(model=ModelConfig(embedded_weights="random", lora_release=root, lora_release_sets=["mi2v"]))
    out = tmp_path / "out"
    with pytest.raises(ScriptError, match="settings.transition"):
        run_story(request, out, cfg, progress=False)
    assert not out.exists()


@pytest.mark.slow
def test_engine_refuses_a_story_without_its_lora_set(release, tmp_path, ray_local, s3_server):
    """The submission edge: a generator loaded with the MI2V set only reports {none, mi2v}; the
    service's intake (here through the in-cluster client, the same facade as HTTP) refuses an mm2v
    story with a 422 on settings.transition and writes nothing."""
    import uuid

    import ray

    from actors import start_engine
    from actors.client import EngineClient
    from storymem.service.contract import InvalidRequest
    from storymem.config import EngineConfig
    from storymem.storage import S3Store

    root, _ = release
    storage = s3_server.storage_config(f"lora-{uuid.uuid4().hex[:12]}")
    cfg = StoryMemConfig(
        model=ModelConfig(embedded_weights="random", lora_release=root, lora_release_sets=["mi2v"]),
        storage=storage,
        engine=EngineConfig(num_generators=1, namespace=f"test-{uuid.uuid4().hex[:8]}"),
    )
    engine = start_engine(cfg)
    try:
        story = {"shots": [{"prompt": "a fox"}, {"prompt": "it runs", "cut": False}], "settings": {"transition": "mm2v"}}
        with pytest.raises(InvalidRequest) as err:
            EngineClient(engine, cfg=cfg).submit(story)
        assert err.value.status == 422
        assert [f for f, _ in err.value.errors] == ["settings.transition"]
        assert "Wan2.2-MM2V-A14B" in err.value.errors[0][1]
        assert S3Store(storage).list("stories/") == []
    finally:
        ray.kill(engine, no_restart=True)
