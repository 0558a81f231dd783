"""Real-size M2V transformer forward on a GPU, random weights: time and peak memory vs memory size.

Builds diffusers' WanTransformer3DModel with the Wan2.2 A14B expert config (or the 1.3B one),
installs StoryMem's memory RoPE, and times one forward (one CFG branch) at 832x480, 81 frames, with
M = 0, 3, 6, 10 memory latent frames in front of the shot, as the pipeline runs it. Compare with
method.md ('Cost at real scale': one H100, bf16: 3.36 s at M=0 to 6.08 s at M=10 for 14B).

    python bench/gpu_forward.py [--model 14b|1.3b] [--memory 0 3 6 10] [--repeats 3] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import WanTransformer3DModel

from storymem.m2v import MemoryRotaryPosEmbed, memory_frames

CONFIGS = {
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096),
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096),
}


def build(name: str, device: torch.device, dtype: torch.dtype) -> WanTransformer3DModel:
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=36, out_channels=16, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, **CONFIGS[name],
        )
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    # As from_pretrained(torch_dtype=bf16) does: these small modules stay in float32.
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    # The rotary tables are buffers computed at construction (meta above); build them on the device.
    model.rope = MemoryRotaryPosEmbed(model.rope.attention_head_dim, model.rope.patch_size, model.rope.max_seq_len, shift=5).to(device)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(CONFIGS), default="14b")
    ap.add_argument("--memory", type=int, nargs="+", default=[0, 3, 6, 10])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_forward.py needs a CUDA GPU")
    device, dtype = torch.device("cuda"), torch.bfloat16
    model = build(args.model, device, dtype)
    if args.compile:
        model.compile_repeated_blocks(fullgraph=True)
    h, w, f = args.height // 8, args.width // 8, (args.frames - 1) // 4 + 1
    ctx = torch.randn(1, 512, CONFIGS[args.model]["text_dim"], device=device, dtype=dtype)
    print(f"{torch.cuda.get_device_name()}  model={args.model}  {args.width}x{args.height}x{args.frames}  bf16")
    print(f"{'M':>4} | {'tokens':>8} | {'forward_s':>10} | {'peak_GiB':>9}")
    for m in args.memory:
        x = torch.randn(1, 36, m + f, h, w, device=device, dtype=dtype)
        t = torch.tensor([900.0], device=device)
        with torch.no_grad(), memory_frames(model, m):
            model(x, t, ctx, return_dict=False)  # warm-up (and compile)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(x, t, ctx, return_dict=False)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        tokens = (m + f) * (h // 2) * (w // 2)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{m:>4} | {tokens:>8} | {min(times):>10.3f} | {peak:>9.1f}")


if __name__ == "__main__":
    main()
