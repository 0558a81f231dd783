"""Speed and memory modes: one typed `SpeedConfig`, named presets, and `apply_speed`, the one place
that turns a config into hooks, casts, adapters and placement on a built `StoryMemPipeline`.

Everything here is diffusers' (or peft's, torchao's) machinery, configured; nothing is rewritten:

* step caching: `CacheMixin.enable_cache(FirstBlockCacheConfig)` on each expert. The pipeline calls
  each expert under `cache_context("cond" | "uncond" | "no_memory")`, so every guidance branch keeps
  its own cached residuals, as diffusers' Wan pipelines do.
* extra LoRAs (the LightX2V / Wan2.2-Lightning 4-step distillation sets) in the formats they are
  published in, converted by diffusers' Wan LoRA converter, weighted per adapter and per expert.
* the sampler their recipe uses: Euler flow matching on a fixed sigma list (FlowMatchEulerDiscrete).
* FP8: layerwise FP8 storage (`enable_layerwise_casting`), or torchao FP8 compute on CUDA cards with
  FP8 tensor cores (torchao is imported only then).
* offload for 24-48 GB cards: group offloading of the experts (CUDA streams on GPU), the text encoder
  on the CPU, VAE tiling.
* `torch.compile` of the repeated transformer blocks.

Modes are per deployment (`StoryMemConfig.speed`): each one changes the built models (weights,
hooks, placement), which a single story cannot switch without rebuilding them. What a story still
chooses is its generation settings, checked against the mode by `check_shot` (a CFG-distilled mode
refuses a story's guidance > 1; a fixed-sigma sampler refuses another step count).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# LightX2V's Wan2.2 I2V-A14B 4-step distillation recipe (configs/wan22/wan_moe_i2v_distill.json in
# ModelTC/LightX2V; Wan2.2-Lightning's model card): timesteps [1000, 750, 500, 250] of a 1000-step
# flow grid, sample_shift 5, no CFG, the first two steps on the high-noise expert. As unshifted
# sigmas these are 1, 0.75, 0.5, 0.25; after the shift 1, 0.9375, 0.833, 0.625, i.e. timesteps
# 1000, 937.5, 833, 625, so Wan2.2's boundary 0.9 gives the same expert split (2 high, 2 low).
LIGHTX2V_4STEP_SIGMAS = (1.0, 0.75, 0.5, 0.25)
LIGHTX2V_SHIFT = 5.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CacheConfig(_Strict):
    """Step caching through diffusers' hooks. Off by default: it trades exactness for speed."""

    kind: Literal["none", "first_block"] = Field(
        "none",
        description="'none': every step computes every block. 'first_block': diffusers' FirstBlockCache: when "
        "the first block's residual changed by less than `threshold` since the previous step of the same "
        "guidance branch, the remaining blocks are skipped and their cached residual is reused.",
    )
    threshold: float = Field(
        0.05,
        gt=0.0,
        le=1.0,
        description="FirstBlockCache threshold (relative mean absolute change of the first block's residual). "
        "Higher skips more steps and drifts further from the uncached shot; bench/modes.py reports the drift.",
    )


class ExtraLora(_Strict):
    """One LoRA stacked on the M2V weights, e.g. a LightX2V 4-step distillation pair."""

    name: str = Field(..., pattern=r"^[A-Za-z][A-Za-z0-9_]{0,39}$", description="Adapter name (peft).")
    high_noise: Path | None = Field(
        None, description="File for the high-noise expert (safetensors or .pth; Wan native, ComfyUI or diffusers keys)."
    )
    low_noise: Path | None = Field(
        None, description="File for the low-noise expert; for a single-transformer checkpoint, its only file."
    )
    weight_high: float = Field(1.0, ge=-4.0, le=4.0, description="Adapter weight on the high-noise expert.")
    weight_low: float = Field(1.0, ge=-4.0, le=4.0, description="Adapter weight on the low-noise expert.")

    @model_validator(mode="after")
    def _one_file(self) -> "ExtraLora":
        if self.high_noise is None and self.low_noise is None:
            raise ValueError("high_noise/low_noise: give at least one LoRA file")
        return self


class SamplerConfig(_Strict):
    """The per-shot sampler and the generation defaults a mode implies."""

    kind: Literal["unipc", "euler"] = Field(
        "unipc",
        description="'unipc': UniPC on flow-matching sigmas (Wan2.2's sampler; the pipeline's own). 'euler': "
        "diffusers' FlowMatchEulerDiscreteScheduler, the sampler of the LightX2V 4-step recipe.",
    )
    sigmas: list[float] | None = Field(
        None,
        description="Fixed sigma list (before the shift), one per step, descending in (0, 1]; only with kind "
        "'euler'. LightX2V 4-step: [1, 0.75, 0.5, 0.25]. None: the scheduler's own grid for the step count.",
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=200, description="Default steps for stories that do not set them. None: the model's."
    )
    guidance_scale: float | None = Field(
        None, ge=0.0, le=30.0, description="Default CFG scale for stories that do not set it. None: the model's."
    )
    shift: float | None = Field(None, gt=0.0, le=20.0, description="Default flow shift. None: the model's.")
    guidance_free: bool = Field(
        False,
        description="The mode's weights were distilled without CFG (LightX2V): a story asking for guidance > 1 "
        "is refused (settings.guidance_scale), since the unconditional branch it needs is outside their training.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "SamplerConfig":
        if self.sigmas is not None:
            if self.kind != "euler":
                raise ValueError("sigmas: a fixed sigma list needs kind 'euler'")
            s = self.sigmas
            if not s or any(not 0.0 < x <= 1.0 for x in s) or any(a <= b for a, b in zip(s, s[1:])):
                raise ValueError(f"sigmas: must be strictly descending values in (0, 1], got {s}")
            if self.num_inference_steps is not None and self.num_inference_steps != len(s):
                raise ValueError(f"num_inference_steps: {len(s)} fixed sigmas give {len(s)} steps, got {self.num_inference_steps}")
        if self.guidance_free and self.guidance_scale not in (None, 1.0):
            raise ValueError(f"guidance_scale: a guidance-free sampler runs without CFG (1), got {self.guidance_scale}")
        return self

    @property
    def defaults(self) -> dict:
        """Generation settings this sampler implies (profile defaults: a story's own values win)."""
        out = {}
        steps = len(self.sigmas) if self.sigmas is not None else self.num_inference_steps
        if steps is not None:
            out["num_inference_steps"] = steps
        if self.guidance_free:  # one forward per step: no text CFG, no extra pass without memory
            out["guidance_scale"] = 1.0
            out["guidance_scale_2"] = None
            out["memory_guidance_scale"] = 1.0
        elif self.guidance_scale is not None:
            out["guidance_scale"] = self.guidance_scale
        if self.shift is not None:
            out["shift"] = self.shift
        return out


PRESET_NAMES = ("exact", "cached", "fast", "lowvram", "compiled")


class SpeedConfig(_Strict):
    """How a deployment trades exactness, memory and time. `preset` fills every field it names; fields
    given beside it override the preset (e.g. `{preset: fast, loras: [...]}`)."""

    preset: Literal["exact", "cached", "fast", "lowvram", "compiled"] | None = Field(
        None,
        description="Named starting point: 'exact' (today's pipeline, bit for bit), 'cached' (FirstBlockCache), "
        "'fast' (LightX2V 4-step recipe: Euler, 4 fixed sigmas, shift 5, no CFG; give its LoRAs in `loras`), "
        "'lowvram' (group offload of the experts, text encoder on the CPU, VAE tiling, FP8 storage), "
        "'compiled' (exact + torch.compile of the repeated blocks). None: 'exact'.",
    )
    loras: list[ExtraLora] = Field(
        default_factory=list, description="LoRAs stacked on the M2V weights, each with per-expert weights."
    )
    m2v_weight: float = Field(
        1.0,
        ge=0.0,
        le=4.0,
        description="Weight of the M2V LoRA sets in this mode. With a 4-step distillation LoRA users run "
        "StoryMem's LoRA a little above 1 (e.g. 1.1-1.3) to keep memory's hold on identity.",
    )
    fuse_loras: bool = Field(
        True,
        description="Let the adapter stack fuse the extra LoRAs into the weights when the active combination "
        "cannot change (at most one M2V set: no per-step cost). False keeps every adapter unfused (set_adapters "
        "per shot), which costs a little per forward.",
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Per-shot sampler and its defaults.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Step caching (off by default).")
    fp8_storage: bool = Field(
        False,
        description="Keep transformer weights in float8_e4m3fn and upcast each layer to the compute dtype when it "
        "runs (diffusers layerwise casting): about half the weight memory, small numeric change, no speed-up.",
    )
    fp8_compute: bool = Field(
        False,
        description="torchao FP8 dynamic-activation/weight matmuls on the transformers (CUDA, compute "
        "capability >= 8.9: Ada, Hopper, Blackwell; torchao must be installed). Refused on a CPU.",
    )
    group_offload: Literal["none", "block_level", "leaf_level"] = Field(
        "none",
        description="diffusers group offloading of the experts: weights live on the CPU and groups of blocks "
        "('block_level') or single layers ('leaf_level') come onto the GPU just before they run (only one "
        "expert is used at a time). Excludes model.offload other than 'none'.",
    )
    blocks_per_group: int = Field(1, ge=1, le=64, description="Blocks per group for group_offload 'block_level'.")
    offload_use_stream: bool = Field(
        True, description="Prefetch the next group on a CUDA stream while the current one computes (GPU only)."
    )
    text_encoder_on_cpu: bool = Field(
        False, description="Keep the text encoder on the CPU (umT5-XXL: ~11 GiB bf16 freed; prompts encode slower)."
    )
    vae_tiling: bool = Field(
        False, description="Decode/encode the VAE in spatial tiles (lower activation peak; seams are blended)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the repeated transformer blocks (GPU only; measured 1.16x per 14B forward, "
        "first call ~10 s). model.compile is the older spelling of the same switch.",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESET_NAMES:
                return data  # the Literal reports it, naming the field
            return {**_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _combinations(self) -> "SpeedConfig":
        if self.fp8_compute and self.fp8_storage:
            raise ValueError("fp8_storage: redundant with fp8_compute (torchao already stores FP8 weights); choose one")
        if self.cache.kind != "none" and self.sampler.sigmas is not None and len(self.sampler.sigmas) < 8:
            raise ValueError(
                f"cache: a {len(self.sampler.sigmas)}-step fixed-sigma sampler has no redundant steps to cache; "
                "every skipped step would be a quarter of the denoising. Use cache kind 'none' with it"
            )
        names = [lo.name for lo in self.loras]
        if len(set(names)) != len(names):
            raise ValueError(f"loras: adapter names must be distinct, got {names}")
        return self

    @property
    def is_exact(self) -> bool:
        """True when nothing changes the numbers of the plain pipeline (placement and compile aside)."""
        return (
            not self.loras
            and self.sampler == SamplerConfig()
            and self.cache.kind == "none"
            and not (self.fp8_storage or self.fp8_compute or self.vae_tiling)
            and self.m2v_weight == 1.0
        )


_PRESETS: dict[str, dict] = {
    "exact": {},
    "cached": {"cache": {"kind": "first_block", "threshold": 0.05}},
    "fast": {
        "sampler": {
            "kind": "euler",
            "sigmas": list(LIGHTX2V_4STEP_SIGMAS),
            "shift": LIGHTX2V_SHIFT,
            "guidance_free": True,
        }
    },
    "lowvram": {
        "group_offload": "block_level",
        "blocks_per_group": 1,
        "text_encoder_on_cpu": True,
        "vae_tiling": True,
        "fp8_storage": True,
    },
    "compiled": {"compile": True},
}


def preset(name: str, **overrides) -> SpeedConfig:
    """A named preset, with fields overridden (`preset('fast', loras=[...])`)."""
    return SpeedConfig(preset=name, **overrides)


# ---------------------------------------------------------------------------------- samplers


def make_scheduler(sampler: SamplerConfig, base_config, num_inference_steps: int, shift: float, device):
    """The scheduler of one shot for a non-default sampler (the pipeline keeps UniPC itself)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if sampler.kind != "euler":
        raise ValueError(f"sampler.kind: {sampler.kind!r} is the pipeline's own sampler")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=base_config.num_train_timesteps, shift=shift)
    if sampler.sigmas is not None:
        scheduler.set_timesteps(sigmas=list(sampler.sigmas), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


def shot_problems(speed: SpeedConfig, num_inference_steps: int, guidance_scale: float,
                  guidance_scale_2: float | None) -> list[tuple[str, str]]:
    """(settings field, problem) for every setting the mode cannot honour."""
    s, name, out = speed.sampler, speed.preset or "custom", []
    if s.sigmas is not None and num_inference_steps != len(s.sigmas):
        out.append(("num_inference_steps", f"speed mode {name} samples {len(s.sigmas)} fixed sigmas; got {num_inference_steps}"))
    if s.guidance_free:
        for field, value in (("guidance_scale", guidance_scale), ("guidance_scale_2", guidance_scale_2)):
            if value is not None and value != 1.0:
                out.append((field, f"speed mode {name} is CFG-distilled (one forward per step, guidance 1); got {value}"))
    return out


def check_shot(speed: SpeedConfig, num_inference_steps: int, guidance_scale: float, guidance_scale_2: float | None) -> None:
    """Refuse settings the mode cannot honour, naming the field (the pipeline, before any work of a shot)."""
    problems = shot_problems(speed, num_inference_steps, guidance_scale, guidance_scale_2)
    if problems:
        raise ValueError("; ".join(f"{field}: {problem}" for field, problem in problems))


def check_settings(settings, speed: SpeedConfig | None) -> None:
    """A story's resolved GenerationSettings against the deployment's mode, at submission: raises
    storymem.script.ScriptError on `settings.<field>` (HTTP 422), before anything is written."""
    if speed is None:
        return
    problems = shot_problems(speed, settings.num_inference_steps, settings.guidance_scale, settings.guidance_scale_2)
    if problems:
        from .script import ScriptError

        raise ScriptError([(f"settings.{field}", problem) for field, problem in problems])


# ---------------------------------------------------------------------------------- LoRAs


def read_speed_lora(path: str | Path) -> dict[str, "torch.Tensor"]:
    """A published Wan LoRA file as diffusers adapter keys (`blocks.N.attn1.to_q.lora_A.weight`...).

    diffusers' Wan converter reads the LightX2V / Wan2.2-Lightning formats (`diffusion_model.` prefix,
    lora_down/lora_up or lora_A/lora_B, optional `.alpha`, `diff_b` biases as lora_B biases)."""
    from diffusers.loaders import WanLoraLoaderMixin

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    sd = WanLoraLoaderMixin.lora_state_dict(str(path))
    sd = sd[0] if isinstance(sd, tuple) else sd
    prefix = "transformer."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"{path}: no transformer LoRA keys after conversion (first keys {list(sd)[:3]})")
    return out


def _check_targets(transformer, adapter: str, sd: dict) -> None:
    names = {n for n, _ in transformer.named_modules()}
    targets = {k.rsplit(".lora_", 1)[0] for k in sd}
    missing = sorted(t for t in targets if t not in names)
    if missing:
        raise ValueError(f"speed.loras.{adapter}: targets modules the model lacks (fewer blocks?): {missing[:4]}")


def stack_loras(pipe, speed: SpeedConfig) -> list[str]:
    """Load each extra LoRA on its expert(s) as a pinned adapter of the pipeline's AdapterStack
    (storymem.lora; the M2V sets live there too), one adapter per expert so each has its own weight:
    `<name>_high`, `<name>_low`. Pinned: every activation of an M2V set includes them. Returns the names."""
    stack = pipe.lora if pipe.lora is not None else pipe.attach_lora([])
    if not speed.fuse_loras:
        stack.fuse = "never"
    high, low = pipe.transformer, pipe.transformer_2
    added = []
    for lo in speed.loras:
        if low is None:  # one transformer: the low-noise file is its LoRA (as for the M2V files)
            plan = [("low", high, lo.low_noise or lo.high_noise, lo.weight_low if lo.low_noise else lo.weight_high)]
        else:
            plan = [(e, t, f, w) for e, t, f, w in (("high", high, lo.high_noise, lo.weight_high),
                                                     ("low", low, lo.low_noise, lo.weight_low)) if f is not None]
        for expert, transformer, path, weight in plan:
            name = f"{lo.name}_{expert}"
            sd = read_speed_lora(path)
            _check_targets(transformer, lo.name, sd)
            with warnings.catch_warnings():  # peft warns on every adapter after the first: stacking is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                transformer.load_lora_adapter(sd, adapter_name=name, prefix=None)
            stack.adopt(name, (expert,), weight=weight, pinned=True)
            added.append(name)
    return added


# ---------------------------------------------------------------------------------- apply


def _experts(pipe) -> list:
    return [t for t in (pipe.transformer, pipe.transformer_2, pipe.t2v_transformer, pipe.t2v_transformer_2) if t is not None]


def _check_fp8_compute(device: "torch.device") -> None:
    import torch

    if device.type != "cuda":
        raise ValueError(f"speed.fp8_compute: needs a CUDA GPU with FP8 tensor cores; this pipeline runs on {device.type}")
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        raise ValueError(f"speed.fp8_compute: needs compute capability >= 8.9 (Ada/Hopper/Blackwell); this GPU has {cc}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ValueError("speed.fp8_compute: torchao is not installed (pip install torchao)") from None


def apply_speed(pipe, speed: SpeedConfig | None, device: "torch.device", offload: str = "none",
                model_compile: bool = False, activate=None):
    """Apply a speed mode to a freshly built pipeline whose modules are still on the CPU, and place it.

    activate: the build's first LoRA activation (storymem.pipeline.build_pipeline: it fuses a single
    M2V set). The order matters and is fixed here: extra LoRAs join the adapter stack first; the
    activation fuses on the device when everything is resident (merging 14B weights on a CPU is
    slow) and before any offload hooks take the weights otherwise; FP8 casting only after that
    (a merge into FP8 weights would lose the LoRA); offload hooks, compile and caches last."""
    import torch

    speed = speed or SpeedConfig()
    if speed.fp8_compute:
        _check_fp8_compute(device)
    if speed.group_offload != "none" and offload != "none":
        raise ValueError(f"speed.group_offload: {speed.group_offload} replaces model.offload; got model.offload {offload!r}")
    offload = offload if device.type == "cuda" else "none"  # CPU: everything stays where it is
    experts = _experts(pipe)
    if speed.m2v_weight != 1.0 and pipe.lora is not None:
        for lora_set in pipe.lora_sets:  # before the first activation, which takes each adapter's weight
            pipe.lora.adapters[lora_set.name].weight = speed.m2v_weight
    if speed.loras:
        stack_loras(pipe, speed)
    elif speed.sampler.guidance_free:
        log.warning("speed: a CFG-distilled few-step sampler without its distilled LoRA (speed.loras): the "
                    "base weights are not trained for it and give soft, low-detail shots")

    def first_activation():
        if activate is not None:
            activate()
        if pipe.lora is not None and not pipe.lora.active:
            pipe.lora.activate([])  # no M2V set: the pinned extra LoRAs alone

    resident = offload == "none" and speed.group_offload == "none"
    if resident:
        if speed.text_encoder_on_cpu:
            for m in pipe.components.values():
                if isinstance(m, torch.nn.Module) and m is not pipe.text_encoder:
                    m.to(device)
        else:
            pipe.to(device)
    first_activation()
    compute_dtype = experts[0].dtype if device.type == "cuda" else torch.float32
    if speed.fp8_storage:
        for t in experts:
            t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    if speed.fp8_compute:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

        for t in experts:
            quantize_(t, Float8DynamicActivationFloat8WeightConfig())
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif speed.group_offload != "none":
        kw = dict(onload_device=device, offload_device=torch.device("cpu"), offload_type=speed.group_offload)
        if speed.group_offload == "block_level":
            kw["num_blocks_per_group"] = speed.blocks_per_group
        if device.type == "cuda" and speed.offload_use_stream:
            kw["use_stream"] = True
        for t in experts:
            t.enable_group_offload(**kw)
        for name in ("vae",) + (() if speed.text_encoder_on_cpu else ("text_encoder",)):
            getattr(pipe, name).to(device)
    if speed.text_encoder_on_cpu:
        pipe.text_encoder.to("cpu")
    if speed.vae_tiling:
        pipe.vae.enable_tiling()
    if (speed.compile or model_compile) and device.type == "cuda":
        for t in experts:
            t.compile_repeated_blocks(fullgraph=speed.group_offload == "none")
    elif speed.compile:
        log.warning("speed.compile: torch.compile is used on CUDA only; running eager on %s", device.type)
    if speed.cache.kind == "first_block":
        from diffusers import FirstBlockCacheConfig

        for t in experts:
            t.enable_cache(FirstBlockCacheConfig(threshold=speed.cache.threshold))
    pipe.speed = speed
    return pipe


def mode_defaults(speed: SpeedConfig | None) -> dict:
    """Generation defaults a mode implies, to merge over the model profile's."""
    return {} if speed is None else speed.sampler.defaults


def describe(speed: SpeedConfig) -> str:
    """One line for logs: the non-default fields."""
    d = speed.model_dump(exclude_defaults=True, mode="json")
    d.pop("preset", None)
    return f"{speed.preset or 'custom'} " + re.sub(r"\s+", " ", str(d))


def synthetic_lightx2v_lora(transformer, rank: int = 4, alpha: float | None = None, seed: int = 0, scale: float = 0.05) -> dict:
    """A random LoRA in the key format the LightX2V / Wan2.2-Lightning files are published in
    (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up`, `alpha`, `diff_b` biases),
    shaped for `transformer`. For tests and benchmarks: the real files cannot be downloaded here."""
    import torch

    from .lora import NATIVE_TO_DIFFUSERS

    to_native = {v: k for k, v in NATIVE_TO_DIFFUSERS.items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in transformer.named_modules():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if not m or m.group(2) not in to_native:
            continue
        key = f"diffusion_model.blocks.{m.group(1)}.{to_native[m.group(2)]}"
        out[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * scale
        out[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * scale
        out[f"{key}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
        out[f"{key}.diff_b"] = torch.randn(module.out_features, generator=gen) * scale
    return out


def manual_merge(transformer, native: dict, weight: float = 1.0) -> None:
    """Merge a LightX2V-format LoRA into `transformer` by hand (W += w * alpha/r * up @ down, b += w * diff_b):
    the reference the converted, peft-loaded adapter must reproduce."""
    import torch

    from .lora import NATIVE_TO_DIFFUSERS as to_diffusers
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for key in [k for k in native if k.endswith(".lora_down.weight")]:
            base = key[: -len(".lora_down.weight")]
            block, native_mod = re.match(r"^diffusion_model\.blocks\.(\d+)\.(.+)$", base).groups()
            module = modules[f"blocks.{block}.{to_diffusers[native_mod]}"]
            down, up = native[key].float(), native[f"{base}.lora_up.weight"].float()
            alpha = float(native[f"{base}.alpha"]) if f"{base}.alpha" in native else down.shape[0]
            module.weight += (weight * alpha / down.shape[0] * (up @ down)).to(module.weight.dtype)
            if f"{base}.diff_b" in native:
                module.bias += (weight * native[f"{base}.diff_b"]).to(module.bias.dtype)
