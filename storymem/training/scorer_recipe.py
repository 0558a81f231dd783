"""The embedded scorer's recipe (scripts/train_embedded.py): the tiny CLIP image tower and its
aesthetic head trained on the synthetic world, so that keyframe selection means something there.

The seeded tiny CLIP embeds every frame of a toy story alike (cosine 0.999 within a story, 0.93 to
0.95 across characters; docs/identity.md), and its seeded head scores nothing: the bank's dedupe
keeps one frame per story and its quality filter cannot tell a shot without a character. Trained
here on toy frames passed through the tiny VAE (so that they look like decoded shots):

* the image embedding with a supervised contrastive loss over characters: frames of one character
  are near each other, other characters far, so dedupe drops a frame of a character the bank
  already holds and keeps one that differs;
* the head as a visibility score on LAION's 1..10-like scale: 10 where toyworld's own detector
  finds the character in the frame, 0 where it finds none, regressed like LAION's predictor. Faint
  and absent characters are made by blending a clip toward its background before the VAE.

Only the image tower and the head are trained and shipped (the text tower keeps its seeded weights:
its token table alone would be 12 MB).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from .. import toyworld

log = logging.getLogger(__name__)

# The head's target for a frame with a visible character (0 without). Half of it separates visible from
# blank frames (how the scorer is checked); the memory bank's cut, storymem.config.EMBEDDED_QUALITY_THRESHOLD,
# asks for more: a clearly visible character.
TOY_VISIBLE_SCORE = 10.0
TOY_VISIBILITY_CUT = TOY_VISIBLE_SCORE / 2


def blend_toward_background(clips: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """(N, F, H, W, 3) uint8 clips with the character faded by `alphas` (N,) in [0, 1] toward each
    frame's background (the median of its border, as toyworld's detector estimates it); 0: blank."""
    x = clips.astype(np.float32)
    bg = toyworld.frame_background(x)
    out = bg + alphas.reshape(-1, 1, 1, 1, 1) * (x - bg)
    return out.round().clip(0, 255).astype(np.uint8)


def visibility_labels(frames: np.ndarray) -> np.ndarray:
    """(N,) 1.0 where toyworld's detector finds a character in the frame, else 0.0."""
    masks = toyworld.character_mask(frames)
    return (masks.reshape(len(frames), -1).sum(1) >= toyworld.MIN_CHARACTER_PIXELS).astype(np.float32)


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) over the rows with `keep`: rows with one label are positives."""
    z = F.normalize(z[keep], dim=-1)
    lab = labels[keep]
    if len(z) < 2:
        return z.sum() * 0.0
    logits = z @ z.T / tau
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, -1e9)
    pos = (lab[:, None] == lab[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    has_pos = pos.any(1)
    per_row = -(log_prob * pos).sum(1)[has_pos] / pos.sum(1)[has_pos]
    return per_row.mean() if len(per_row) else z.sum() * 0.0


def train_toy_scorer(scorer, frames: np.ndarray, characters: np.ndarray, visible: np.ndarray, steps: int, *,
                     batch: int = 128, lr: float = 1e-3, seed: int = 0, log_every: int = 100) -> dict:
    """Train `scorer.model.visual` and `scorer.head` (a storymem.scoring.Scorer on the tiny CLIP) in place.

    frames (N, H, W, 3) uint8, characters (N,) int labels, visible (N,) in {0, 1}. Returns the losses."""
    clip, head = scorer.model, scorer.head
    params = list(clip.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    clip.train()
    head.train()
    rng = np.random.default_rng(seed)
    labels_all = torch.from_numpy(characters.astype(np.int64))
    vis_all = torch.from_numpy(visible.astype(np.float32))
    history = {"contrastive": [], "visibility": []}
    for step in range(steps):
        idx = rng.choice(len(frames), size=batch, replace=False)
        x = scorer._preprocess(torch.from_numpy(frames[idx]))
        emb = clip.encode_image(x)
        vis = vis_all[idx].to(emb.device)
        l_con = supervised_contrastive(emb, labels_all[idx].to(emb.device), vis > 0.5)
        l_vis = (head(emb) - TOY_VISIBLE_SCORE * vis).pow(2).mean() / TOY_VISIBLE_SCORE**2
        loss = l_con + l_vis
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history["contrastive"].append(float(l_con.detach()))
        history["visibility"].append(float(l_vis.detach()))
        if (step + 1) % log_every == 0:
            log.info("scorer step %d contrastive %.4f visibility %.4f", step + 1,
                     np.mean(history["contrastive"][-log_every:]), np.mean(history["visibility"][-log_every:]))
    clip.eval()
    head.eval()
    return history
