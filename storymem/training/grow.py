"""Function-preserving growth of a Wan transformer: more blocks, wider feed-forward layers.

A grown model computes exactly what the trained one did, so training continues from the trained
model's quality with the extra capacity (scripts/train_embedded.py --layers/--ffn-dim with
--init-from). New blocks are appended with zero output projections (attention and feed-forward),
which makes each an identity on the residual stream until training moves them; new feed-forward
units get fresh input weights and zero output weights. Gradients still reach them: an output
projection's gradient is its input, which is not zero.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from ..m2v import MemoryRotaryPosEmbed, install_memory_rope


def _zero_(linear: torch.nn.Linear) -> None:
    torch.nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        torch.nn.init.zeros_(linear.bias)


def grow_transformer(model: WanTransformer3DModel, layers: int | None = None, ffn_dim: int | None = None, seed: int = 0) -> WanTransformer3DModel:
    """A copy of `model` with `layers` blocks and `ffn_dim` feed-forward units, same function."""
    old_layers, old_ffn = model.config.num_layers, model.config.ffn_dim
    layers = old_layers if layers is None else layers
    ffn_dim = old_ffn if ffn_dim is None else ffn_dim
    if layers < old_layers:
        raise ValueError(f"layers: can only grow the transformer ({old_layers} blocks); got {layers}")
    if ffn_dim < old_ffn:
        raise ValueError(f"ffn_dim: can only grow the feed-forward width ({old_ffn}); got {ffn_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = type(model).from_config(model.config, num_layers=layers, ffn_dim=ffn_dim)
    target = grown.state_dict()  # views of grown's parameters: copying into them sets the weights
    with torch.no_grad():
        for name, value in model.state_dict().items():
            # a widened feed-forward layer: the trained units first, the new ones as initialised
            target[name][tuple(slice(0, n) for n in value.shape)].copy_(value)
        for block in grown.blocks[old_layers:]:
            _zero_(block.attn1.to_out[0])
            _zero_(block.attn2.to_out[0])
            _zero_(block.ffn.net[2])
        for block in grown.blocks[:old_layers]:
            block.ffn.net[2].weight[:, old_ffn:].zero_()
    if isinstance(model.rope, MemoryRotaryPosEmbed):
        install_memory_rope(grown, model.rope.shift)
    return grown.train(model.training)
