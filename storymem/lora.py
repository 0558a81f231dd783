"""The released M2V LoRA files on diffusers' Wan transformer.

The authors' checkpoints (`backbone_high_noise.pth`, `backbone_low_noise.pth`) are peft state dicts
on Wan's native module names. We rename each key to diffusers' names and load it into a peft LoRA
(rank from the tensors, alpha = rank unless told, rsLoRA scale alpha / sqrt(r)). A key we cannot
map is an error: a silently skipped LoRA layer is a wrong model that still runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# Wan native module path (inside a block) -> diffusers module path.
_NATIVE_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_DIFFUSERS_TARGETS = set(_NATIVE_TO_DIFFUSERS.values())

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:diffusion_model\.|transformer\.|model\.)?"
    r"blocks\.(?P<block>\d+)\.(?P<module>.+?)\.(?P<which>lora_[AB])(?:\.(?P<adapter>[A-Za-z0-9_]+))?\.weight$"
)

M2V_TARGET_SUFFIXES = sorted(_DIFFUSERS_TARGETS)


class LoraKeyError(ValueError):
    """A LoRA file holds keys this loader cannot place on the model."""


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LoraKeyError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def convert_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename native or diffusers-named LoRA keys to `blocks.N.<diffusers module>.lora_{A,B}.weight`."""
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            bad.append(key)
            continue
        module = m["module"]
        if module in _NATIVE_TO_DIFFUSERS:
            module = _NATIVE_TO_DIFFUSERS[module]
        elif module not in _DIFFUSERS_TARGETS:
            bad.append(key)
            continue
        new = f"blocks.{m['block']}.{module}.{m['which']}.weight"
        if new in out:
            raise LoraKeyError(f"two keys map to {new} (several adapters in one file?): {key}")
        out[new] = tensor
    if bad:
        raise LoraKeyError(f"{len(bad)} LoRA keys do not map to a Wan transformer module, e.g. {bad[:5]}")
    if not out:
        raise LoraKeyError("the LoRA state dict is empty")
    return out


def lora_rank(state_dict: dict[str, torch.Tensor]) -> int:
    ranks = {t.shape[0] for k, t in state_dict.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise LoraKeyError(f"expected one LoRA rank, found {sorted(ranks)}")
    return ranks.pop()


def load_m2v_lora(
    transformer,
    source: str | Path | dict,
    adapter_name: str = "m2v",
    alpha: float | None = None,
    use_rslora: bool = True,
    fuse: bool = False,
) -> dict:
    """Add the M2V LoRA to a diffusers WanTransformer3DModel.

    Returns a report {"rank", "alpha", "modules", "scale"}. Raises LoraKeyError if any key in the
    file has no place in the model, or any targeted module receives no weights.
    """
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    raw = source if isinstance(source, dict) else read_lora_file(source)
    sd = convert_to_diffusers(raw)
    rank = lora_rank(sd)
    alpha = float(rank if alpha is None else alpha)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    names = dict(transformer.named_modules())
    missing_modules = [m for m in modules if m not in names]
    if missing_modules:
        raise LoraKeyError(f"LoRA targets modules the model lacks (fewer blocks?): {missing_modules[:5]}")
    for key, tensor in sd.items():
        module = names[key.rsplit(".lora_", 1)[0]]
        if ".lora_A." in key and tensor.shape[1] != module.in_features:
            raise LoraKeyError(f"{key}: shape {tuple(tensor.shape)} does not fit in_features {module.in_features}")
        if ".lora_B." in key and tensor.shape[0] != module.out_features:
            raise LoraKeyError(f"{key}: shape {tuple(tensor.shape)} does not fit out_features {module.out_features}")

    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=modules, lora_dropout=0.0, init_lora_weights=False
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, sd, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if f".{adapter_name}." in k and "lora_" in k]
    if unexpected or missing:
        raise LoraKeyError(f"LoRA did not load cleanly: unexpected {unexpected[:5]}, missing {missing[:5]}")
    if fuse:
        transformer.fuse_lora(adapter_names=[adapter_name])
        transformer.unload_lora()
    scale = alpha / (rank**0.5) if use_rslora else alpha / rank
    return {"rank": rank, "alpha": alpha, "modules": len(modules), "scale": scale}


def native_lora_state_dict(transformer, rank: int, prefix: str = "base_model.model.", generator=None) -> dict:
    """A random LoRA state dict with the released files' key names and shapes for `transformer`.

    Used by tests and benchmarks to exercise the loader without the released weights."""
    inverse = {v: k for k, v in _NATIVE_TO_DIFFUSERS.items()}
    out = {}
    for name, module in transformer.named_modules():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if not m or m.group(2) not in inverse:
            continue
        native = f"{prefix}blocks.{m.group(1)}.{inverse[m.group(2)]}"
        out[f"{native}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.02
        out[f"{native}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.02
    return out
