"""The M2V flow-matching loss: memory latents and shot latents denoised together under the M2V mask and
negative memory RoPE positions (m2v.memory_frames), velocity target on the shot frames. A text-to-video
transformer (TrainConfig.task 't2v') trains through the same loss with no memory and no condition."""

from __future__ import annotations

import torch
from torch import nn

from ..m2v import memory_frames


class M2VLoss(nn.Module):
    """Holds the expert(s) being trained; forward(batch) -> the summed per-sample flow-matching loss
    divided by the local batch size. One module, so that DDP wraps every expert at once."""

    def __init__(
        self,
        experts: dict[str, nn.Module],
        memory_loss_weight: float = 0.0,
        first_frame_loss_weight: float = 1.0,
        subject_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.experts = nn.ModuleDict(experts)
        self.memory_loss_weight = memory_loss_weight
        self.first_frame_loss_weight = first_frame_loss_weight
        self.subject_loss_weight = subject_loss_weight

    def forward(self, parts: dict[str, dict], batch_size: int) -> torch.Tensor:
        total = None
        for name, part in parts.items():
            model = self.experts[name]
            sigma = part["sigma"].view(-1, 1, 1, 1, 1)
            clean = part["clean"]  # (b, z, M + f, h, w): [memory latents | shot latents]
            noisy = (1.0 - sigma) * clean + sigma * part["noise"]
            x = noisy if part["condition"] is None else torch.cat([noisy, part["condition"]], dim=1)
            x = x.to(model.dtype)
            m = part["num_memory"]
            with memory_frames(model, m):
                pred = model(
                    hidden_states=x,
                    timestep=part["sigma"] * 1000.0,
                    encoder_hidden_states=part["text"].to(model.dtype),
                    return_dict=False,
                )[0]
            # Velocity target on the shot's latent frames; the memory part only with memory_loss_weight.
            err = (pred.float() - (part["noise"] - clean)).pow(2)
            if self.subject_loss_weight != 1.0:
                # A weighted mean over each frame's cells: subject cells (b, f, h, w) count w times. The
                # trainer puts "subject" in every part exactly when the weight is not 1.
                cells = 1.0 + (self.subject_loss_weight - 1.0) * part["subject"]
                per_frame = (err[:, :, m:].mean(dim=1) * cells).sum(dim=(2, 3)) / cells.sum(dim=(2, 3))  # (b, f)
            else:
                per_frame = err[:, :, m:].mean(dim=(1, 3, 4))  # (b, f)
            if self.first_frame_loss_weight != 1.0:
                # A weighted mean over the shot's latent frames: the first one (the causal VAE's
                # single-frame latent) counts w times, and the loss keeps its scale.
                weights = torch.ones(per_frame.shape[1], device=per_frame.device)
                weights[0] = self.first_frame_loss_weight
                per_sample = (per_frame * weights).sum(1) / weights.sum()
            else:
                per_sample = per_frame.mean(1)
            if m and self.memory_loss_weight:
                per_sample = per_sample + self.memory_loss_weight * err[:, :, :m].flatten(1).mean(1)
            total = per_sample.sum() if total is None else total + per_sample.sum()
        return total / batch_size
