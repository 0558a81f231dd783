"""The tiny-VAE recipe of the embedded models (scripts/train_embedded.py): an initialisation that keeps
the thin Wan decoder's signal alive, reconstruction training, and folding latent statistics into the VAE."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def vae_round_trip(vae, clips: np.ndarray, batch: int = 16) -> np.ndarray:
    """(N, F, H, W, 3) uint8 clips through the VAE (posterior mode, as the pipeline encodes) and back."""
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(clips), batch):
            x = torch.from_numpy(clips[i : i + batch]).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).to(device)
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            out.append(((y.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def reinit_autoencoder(vae: nn.Module, seed: int) -> nn.Module:
    """Kaiming-normal convolutions with zero biases, residual branches and attention outputs zeroed,
    before training a tiny VAE from scratch.

    With PyTorch's default init the thin Wan decoder's output is dominated by its biases and hardly
    depends on the latent (decoding z or -z differs by ~0.015), and training stalls at predicting
    the mean colour. Fan-in scaled weights keep the signal alive, and blocks that start as identity
    (their last conv zeroed) make the stack start as a short chain of convolutions."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, m in vae.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                last = name.endswith(".conv2") or name.endswith("attentions.0.proj")
                if last:
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return vae


def train_vae(vae, sample_batch, steps: int, lr: float = 2e-3, latent_noise: float = 0.1, latent_l2: float = 1e-3, log_every: int = 50) -> list[float]:
    """Reconstruction training of a (tiny) AutoencoderKLWan. `sample_batch(step)` returns videos
    (B, 3, F, H, W) in [-1, 1]. The pipeline encodes with the posterior mode, so the autoencoder is
    trained on the mode (a freshly initialised posterior's unit variance would drown the signal),
    with a little relative noise on the latents so that the decoder tolerates imperfect generations
    and a small L2 term that keeps the latent scale bounded (normalise_vae_latents rescales after)."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for step in range(steps):
        x = sample_batch(step)
        mu = vae.encode(x).latent_dist.mode()
        scale = mu.detach().flatten(2).std(dim=2, keepdim=True).unsqueeze(-1).unsqueeze(-1)  # (B, z, 1, 1, 1)
        y = vae.decode(mu + latent_noise * scale * torch.randn_like(mu)).sample
        loss = (y - x).abs().mean() + (y - x).pow(2).mean() + latent_l2 * mu.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log.info("vae step %d loss %.4f", step + 1, float(np.mean(losses[-log_every:])))
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def normalise_vae_latents(vae, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel latent statistics into the VAE so that the pipeline's normalisation with the
    config's `latents_mean` / `latents_std` gives zero-mean, unit-std latents on `videos`.

    The encoder's mean output is scaled affinely (quant_conv) and the decoder's input conv
    (post_quant_conv) undoes it, so decode(encode(x)) is unchanged. Returns the measured (mean, std)."""
    z = vae.config.z_dim
    mu = vae.encode(videos).latent_dist.mode().float()
    m_emp = mu.transpose(0, 1).reshape(z, -1).mean(1)
    s_emp = mu.transpose(0, 1).reshape(z, -1).std(1).clamp_min(1e-6)
    mean_d = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=mu.device)
    std_d = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=mu.device)
    a = std_d / s_emp
    b = mean_d - a * m_emp
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:z] *= a.view(z, 1, 1, 1, 1).to(q.weight.dtype)
    q.bias[:z] = (a * q.bias[:z].float() + b).to(q.bias.dtype)
    q.bias[z:] += (2.0 * torch.log(a)).to(q.bias.dtype)  # the posterior's std scales with its mean
    w = pq.weight.float()  # (z_out, z_in, 1, 1, 1): input channel i now carries a_i * z_i + b_i
    new_w = w / a.view(1, z, 1, 1, 1)
    pq.bias.copy_((pq.bias.float() - (new_w.flatten(1) * b.view(1, z)).sum(1)).to(pq.bias.dtype))
    pq.weight.copy_(new_w.to(pq.weight.dtype))
    return m_emp, s_emp
