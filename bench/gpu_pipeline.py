"""One real-size StoryMem M2V shot with random weights: seconds and peak GPU memory per stage.

StoryMemPipeline over Wan2.2 I2V-A14B-size components (umT5-XXL, Wan2.1 VAE in float32, two 14B
experts in bf16, boundary 0.9; or one 1.3B-size transformer), one M2V shot (832x480, 81 frames,
M memory images, CFG, few steps) through the pipeline's own __call__; a stage table, a 40-step
extrapolation and method.md's 'Cost at real scale' numbers beside ours.

    python bench/gpu_pipeline.py [--model 14b|1.3b] [--offload none|model] [--steps 4] [--memory 10] [--json F]
    python bench/gpu_pipeline.py --speed fast|exact|cached|lowvram|compiled [--speed-lora]   # a speed mode
    python bench/gpu_pipeline.py --device cpu --tiny     # same code path, tiny sizes, for a CPU check

`--speed MODE` applies a storymem.speed preset through `apply_speed` (placement included) and takes
the mode's sampler defaults (fast: Euler on 4 fixed sigmas, shift 5, no CFG); the shot time is
extrapolated to the mode's production step count (40, or the fixed sigma list's length).
`--speed-lora` stacks a random rank-64 LoRA in the LightX2V key format on both experts (fused), so
the conversion and fusing path runs at full size too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

from storymem import models
from storymem.config import ModelConfig
from storymem.pipeline import StoryMemPipeline
from storymem.speed import ExtraLora, SpeedConfig, apply_speed, preset, synthetic_lightx2v_lora

TEXT = dict(vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
            relative_attention_num_buckets=32)
EXPERT = {
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, freq_dim=256),
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, freq_dim=256),
}
TINY_TEXT = dict(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                 relative_attention_num_buckets=16)
TINY_EXPERT = dict(num_attention_heads=2, attention_head_dim=24, ffn_dim=96, num_layers=2, freq_dim=64,
                   rope_max_seq_len=64)
TINY_VAE = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
# method.md, 'Cost at real scale' (one H100 80GB, bf16, random weights): one forward = one CFG branch, 832x480x81.
METHOD_MD = {"14b": {0: 3.36, 3: 4.14, 6: 4.93, 10: 6.08}, "1.3b": {0: 0.65, 10: 1.19}}
METHOD_MD_DECODE_S, METHOD_MD_SHOT_MIN = 2.07, 8.0  # VAE decode of one shot; 40-step 14B shot at M=10
POOL = 1 << 26  # CPU fill: random slices of one 64M-value normal pool (copies, bound by page faults, not RNG)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_meta(factory, dtype: torch.dtype, keep: list[str]) -> torch.nn.Module:
    """Build on 'meta' (no memory) in `dtype`, `keep` parameters in float32 as from_pretrained does."""
    with torch.device("meta"):
        model = factory()
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_floating_point():
                fp32 = any(k in f"{mname}.{pname}".split(".") for k in keep)
                mod._parameters[pname] = torch.nn.Parameter(p.to(torch.float32 if fp32 else dtype), requires_grad=False)
    return model


def materialize(model: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    """Allocate on `device`, re-tie, rebuild the rotary tables, fill: N(0, 0.02) weights, norm scales 1 and
    biases 0 (so activations keep a sane scale through 40 layers)."""
    others = [n for n, _ in model.named_buffers() if not n.startswith("rope.")]
    if others:
        raise ValueError(f"{type(model).__name__}: buffers {others[:3]} would stay uninitialised")
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gives tied parameters (umT5's embeddings) separate storage
    if isinstance(getattr(model, "rope", None), WanRotaryPosEmbed):
        r = model.rope  # non-persistent tables computed at construction: empty after meta
        model.rope = WanRotaryPosEmbed(r.attention_head_dim, r.patch_size, r.max_seq_len).to(device)
    gen, pools = torch.Generator(device).manual_seed(seed), {}
    with torch.no_grad():
        for mod in model.modules():
            norm = "norm" in type(mod).__name__.lower()
            for pname, p in mod.named_parameters(recurse=False):
                if pname == "bias":
                    p.zero_()
                elif norm:
                    p.fill_(1.0)
                elif device.type != "cpu":
                    p.normal_(0.0, 0.02, generator=gen)
                else:  # torch's multi-threaded copy_ is ~10x faster than CPU normal_ for 2 x 14B
                    if p.dtype not in pools:
                        pools[p.dtype] = torch.empty(POOL).normal_(0.0, 0.02, generator=gen).to(p.dtype)
                    flat, i = p.view(-1), 0
                    while i < flat.numel():
                        off = int(torch.randint(0, POOL, (1,), generator=gen))
                        k = min(flat.numel() - i, POOL - off)
                        flat[i : i + k].copy_(pools[p.dtype][off : off + k])
                        i += k
    return model.eval().requires_grad_(False)


def build(args, device: torch.device, dtype: torch.dtype, speed: SpeedConfig):
    """The pipeline with random weights, placed per --offload and the speed mode; returns (pipe, init seconds per part)."""
    # 'none': initialise on the GPU directly; offloaded parts are made on the CPU, where they live.
    offloaded = args.offload == "model" or speed.group_offload != "none"
    wdev = torch.device("cpu") if offloaded else device
    wdevs = {"text_encoder": torch.device("cpu") if offloaded or speed.text_encoder_on_cpu else wdev}
    text = TINY_TEXT if args.tiny else TEXT
    expert = dict(TINY_EXPERT if args.tiny else EXPERT[args.model], text_dim=text["d_model"])
    umt5 = UMT5Config(**text, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
    wan = dict(patch_size=(1, 2, 2), in_channels=36, out_channels=16, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", **expert)
    parts = {
        "text_encoder": (lambda: UMT5EncoderModel(umt5), dtype, UMT5EncoderModel._keep_in_fp32_modules or []),
        # AutoencoderKLWan's defaults are the Wan2.1 VAE (base_dim 96, z 16, dim_mult 1,2,4,4)
        "vae": (lambda: AutoencoderKLWan(**(TINY_VAE if args.tiny else {})), torch.float32, []),
        "transformer": (lambda: WanTransformer3DModel(**wan), dtype, WanTransformer3DModel._keep_in_fp32_modules),
    }
    if args.model == "14b":
        parts["transformer_2"] = parts["transformer"]
    comps, init = {}, {}
    for i, (name, (factory, dt, keep)) in enumerate(parts.items()):
        t0 = time.perf_counter()
        part_dev = wdevs.get(name, wdev)
        comps[name] = materialize(on_meta(factory, dt, keep), part_dev, seed=1000 + i)
        sync(part_dev)
        init[name] = time.perf_counter() - t0
        n = sum(p.numel() for p in comps[name].parameters())
        print(f"init {name:<14} {n / 1e6:9.1f} M params on {part_dev.type}: {init[name]:6.1f} s", flush=True)
    t0 = time.perf_counter()
    pipe = StoryMemPipeline(
        tokenizer=models.embedded_tokenizer(),  # character ids: far below the vocab size
        scheduler=models.make_scheduler(args.shift),
        boundary_ratio=ModelConfig().boundary if "transformer_2" in comps else None,
        rope_shift=ModelConfig().rope_shift,
        max_sequence_length=128 if args.tiny else 512,
        **comps,
    )
    pipe.set_progress_bar_config(disable=True)
    if args.speed_lora:
        t1 = time.perf_counter()
        speed = speed.model_copy(update={"loras": stack_random_loras(pipe)})
        init["speed LoRA (convert+fuse)"] = time.perf_counter() - t1
    apply_speed(pipe, speed, device, offload=args.offload)
    sync(device)
    init["pipeline+placement"] = time.perf_counter() - t0
    return pipe, init


def stack_random_loras(pipe: StoryMemPipeline) -> list[ExtraLora]:
    """Random rank-64 LoRAs in the LightX2V key format, written to bf16 files in a temp dir."""
    import tempfile

    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="speed_lora_"))  # not under $OUT: ~0.6 GiB per 14B expert
    files = {}
    for expert, t in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        if t is not None:
            files[expert] = folder / f"{expert}.safetensors"
            sd = synthetic_lightx2v_lora(t, rank=64, seed=len(files), scale=0.01)
            save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(files[expert]))  # published as bf16
    return [ExtraLora(name="lightx2v", **files)]


def expert_plan(pipe: StoryMemPipeline, steps: int, shift: float) -> tuple[list[int], list[str]]:
    """Timesteps and the expert of each step by the pipeline's rule (t >= boundary * 1000: high-noise)."""
    sched = pipe.shot_scheduler(steps, shift, "cpu")
    ts = [int(t) for t in sched.timesteps]
    if pipe.transformer_2 is None or pipe.config.boundary_ratio is None:
        return ts, ["single"] * len(ts)
    bt = pipe.config.boundary_ratio * sched.config.num_train_timesteps
    return ts, ["high" if t >= bt else "low" for t in sched.timesteps]


class Recorder:
    """Synchronised wall time and peak GPU memory per stage, via method wrappers and forward hooks."""

    def __init__(self, device: torch.device):
        self.device, self.rows, self.finite, self.step_t0, self.step_experts = device, [], [], None, []

    def begin(self) -> float:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return time.perf_counter()

    def end(self, stage: str, t0: float, **extra) -> None:
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self.rows.append(dict(stage=stage, seconds=time.perf_counter() - t0, peak_gib=peak, **extra))
        print(f"  {stage}: {self.rows[-1]['seconds']:.2f} s" + (f", peak {peak:.1f} GiB" if peak else ""), flush=True)

    def wrap(self, pipe, attr: str, stage: str) -> None:
        fn = getattr(pipe, attr)

        def timed(*a, **k):
            t0 = self.begin()
            out = fn(*a, **k)
            self.end(stage, t0)
            self.finite.append(torch.isfinite(out).all())
            return out

        setattr(pipe, attr, timed)

    def watch(self, module: torch.nn.Module, expert: str) -> None:
        def pre(mod, args):
            if self.step_t0 is None:  # a step's first forward: its time includes any offload move
                self.step_t0, self.step_experts = self.begin(), []
            self.step_experts.append(expert)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(lambda mod, args, out: self.finite.append(torch.isfinite(out[0]).all()))

    def step_done(self, step: int, total: int) -> None:
        expert = "+".join(sorted(set(self.step_experts)))
        self.end(f"step {step}/{total} ({expert})", self.step_t0, expert=expert, forwards=len(self.step_experts))
        self.step_t0 = None


def report(args, rec: Recorder, plan40: list[str]) -> dict:
    """Print the table, per-step numbers, the extrapolation to the production step count (40, or the speed
    mode's fixed sigma list) and method.md's numbers; return them."""
    n_prod = len(plan40)
    steps = [r for r in rec.rows if "expert" in r]
    # n_prod steps: each expert's first step (warm-up, compile, offload move) once, then its steady (fastest) step.
    per_step = {e: dict(first_s=next(r["seconds"] for r in steps if r["expert"] == e),
                        steady_s=min(r["seconds"] for r in steps if r["expert"] == e), steps_of_40=plan40.count(e))
                for e in dict.fromkeys(r["expert"] for r in steps)}
    denoise40 = sum(v["first_s"] + (v["steps_of_40"] - 1) * v["steady_s"] for v in per_step.values())
    other = sum(r["seconds"] for r in rec.rows if r["stage"].startswith(("text", "VAE")))
    forward = min(v["steady_s"] / r["forwards"] for e, v in per_step.items() for r in steps if r["expert"] == e)
    decode = next(r["seconds"] for r in rec.rows if r["stage"] == "VAE decode")
    print(f"\n{'stage':<34} | {'seconds':>8} | {'peak GPU GiB':>12}\n" + "-" * 61)
    for r in rec.rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['stage']:<34} | {r['seconds']:>8.2f} | {peak:>12}")
    print("-" * 61)
    for e, v in per_step.items():
        print(f"per step ({e}): steady {v['steady_s']:.2f} s, first {v['first_s']:.2f} s;"
              f" {v['steps_of_40']} of {n_prod} steps")
    shot40 = other + denoise40
    print(f"one forward (one CFG branch, steady): {forward:.2f} s")
    print(f"extrapolated {n_prod}-step shot: {shot40:.1f} s ({shot40 / 60:.1f} min) = text+VAE {other:.1f} s"
          f" + denoise {denoise40:.1f} s")
    ref = METHOD_MD[args.model]
    m_ref = min(ref, key=lambda m: abs(m - args.memory))
    print(f"compare method.md (H100, bf16): {args.model} forward at M={m_ref} {ref[m_ref]} s, VAE decode"
          f" {METHOD_MD_DECODE_S} s, 14B 40-step shot at M=10 ~{METHOD_MD_SHOT_MIN:.0f} min | ours"
          f"{' (--tiny: not comparable)' if args.tiny else ''}: forward at M={args.memory} {forward:.2f} s, VAE decode"
          f" {decode:.2f} s, {n_prod}-step shot {shot40 / 60:.1f} min")
    method_md = dict(forward_s=ref, vae_decode_s=METHOD_MD_DECODE_S, shot_40_steps_min_14b_m10=METHOD_MD_SHOT_MIN)
    peak = max((r["peak_gib"] for r in rec.rows if r["peak_gib"] is not None), default=None)
    return dict(per_step=per_step, forward_s=forward, extrapolated_40_steps_s=shot40 if n_prod == 40 else None,
                production_steps=n_prod, shot_s=shot40, peak_gib=peak, method_md=method_md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(EXPERT), default="14b")
    ap.add_argument("--offload", choices=["none", "model"], default="none")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny components at 64x48, 13 frames (CPU check)")
    ap.add_argument("--speed", default="exact", help="storymem.speed preset: exact, cached, fast, lowvram, compiled")
    ap.add_argument("--speed-lora", action="store_true", help="stack a random rank-64 LightX2V-format LoRA (fused)")
    # None: the speed mode's default (fast: 4 steps, guidance 1, shift 5), else 4 steps, CFG 3.5, shift 4
    for flag, kind in (("--steps", int), ("--memory", int), ("--height", int), ("--width", int), ("--frames", int),
                       ("--guidance", float), ("--guidance-2", float), ("--shift", float)):
        ap.add_argument(flag, type=kind, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    speed = preset(args.speed)
    mode = speed.sampler.defaults
    args.steps = args.steps or mode.get("num_inference_steps", 4)
    args.memory = 10 if args.memory is None else args.memory
    args.guidance = mode.get("guidance_scale", 3.5) if args.guidance is None else args.guidance
    args.guidance_2 = args.guidance if args.guidance_2 is None else args.guidance_2
    args.shift = mode.get("shift", 4.0) if args.shift is None else args.shift
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu --tiny for a CPU check)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    height, width = args.height or (48 if args.tiny else 480), args.width or (64 if args.tiny else 832)
    frames = args.frames or (13 if args.tiny else 81)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    size = f"{args.model}-tiny" if args.tiny else args.model
    print(f"{name}  model={size} offload={args.offload} speed={args.speed}{'+lora' if args.speed_lora else ''}"
          f" {width}x{height}x{frames} M={args.memory} steps={args.steps} guidance={args.guidance} {dtype}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    pipe, init = build(args, device, dtype, speed)
    init_s = time.perf_counter() - t0
    timesteps, plan = expert_plan(pipe, args.steps, args.shift)
    print(f"timesteps {timesteps} -> experts {plan} (boundary {pipe.config.boundary_ratio})", flush=True)
    if pipe.transformer_2 is not None and not {"high", "low"} <= set(plan):
        raise SystemExit(f"--steps {args.steps}: experts per step {plan}; both must run (boundary 0.9): add steps")

    rec = Recorder(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rec.rows.append(dict(stage="init/build", seconds=init_s, peak_gib=peak))
    rec.wrap(pipe, "encode_prompt", "text encode")
    rec.wrap(pipe, "encode_memory", f"VAE encode memory ({args.memory} images)")
    rec.wrap(pipe, "encode_condition_video", f"VAE encode condition ({frames} frames)")
    rec.wrap(pipe, "vae_decode", "VAE decode")
    rec.watch(pipe.transformer, "high" if pipe.transformer_2 is not None else "single")
    if pipe.transformer_2 is not None:
        rec.watch(pipe.transformer_2, "low")
    rng = np.random.default_rng(0)
    memory = [Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)) for _ in range(args.memory)]
    result = dict(device=name, model=size, offload=args.offload, speed=args.speed, speed_lora=args.speed_lora, dtype=str(dtype), width=width, height=height,
                  frames=frames, memory=args.memory, steps=args.steps, timesteps=timesteps, plan=plan, init_s=init,
                  stages=rec.rows)
    t0 = rec.begin()
    try:
        out = pipe(
            "A lighthouse keeper climbs the spiral stairs at dusk, carrying a lantern; close-up, warm light.",
            memory=memory, height=height, width=width, num_frames=frames, num_inference_steps=args.steps,
            guidance_scale=args.guidance, guidance_scale_2=args.guidance_2, shift=args.shift,
            step_callback=rec.step_done,
        )
    except Exception as e:  # keep what was measured (an out-of-memory decode still leaves the steps)
        if args.json:
            args.json.write_text(json.dumps(dict(result, error=repr(e)[:2000]), indent=2))
        raise
    rec.end("total (pipe call)", t0)
    if tuple(out.frames.shape) != (frames, height, width, 3) or out.frames.dtype != np.uint8:
        raise SystemExit(f"unexpected frames {out.frames.shape} {out.frames.dtype}")
    ran = [r["expert"] for r in rec.rows if "expert" in r]
    if ran != plan:
        raise SystemExit(f"experts run {ran} differ from the scheduler's plan {plan}")
    prod = len(speed.sampler.sigmas) if speed.sampler.sigmas is not None else 40
    result.update(report(args, rec, expert_plan(pipe, prod, args.shift)[1]))
    result.update(outputs_finite=bool(all(bool(x) for x in rec.finite)), frames_shape=list(out.frames.shape))
    print(f"outputs finite (text, latents, every transformer output, decoded video): {result['outputs_finite']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if not result["outputs_finite"]:
        raise SystemExit("non-finite values in text embeddings, latents, transformer outputs or decoded video")


if __name__ == "__main__":
    main()
