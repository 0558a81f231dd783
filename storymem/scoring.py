"""CLIP embeddings and aesthetic scores for keyframe selection and evaluation.

Real weights come from local files only (no CLIP or aesthetic weights are on PyPI, and the tests run
offline). Without them, a tiny open_clip CLIP and a small aesthetic head serve: by default with the
image tower and head trained on the synthetic world (`ScoringConfig.embedded_scorer`), else from fixed
seeds, so every process gets the same embeddings (the seeded ones carry no meaning beyond that).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from .config import EMBEDDED_SCORER, ScoringConfig

logger = logging.getLogger(__name__)

TINY_SEED = 20251222
LAION_HIDDEN = (1024, 128, 64, 16)  # LAION aesthetic predictor v2
TINY_HIDDEN = (64, 32, 16, 8)


def tiny_clip_configs() -> tuple[int, open_clip.CLIPVisionCfg, open_clip.CLIPTextCfg]:
    """(embed_dim, vision_cfg, text_cfg) of the embedded tiny CLIP. The text side keeps CLIP's vocabulary
    and context length so that open_clip's bundled SimpleTokenizer works offline."""
    vision = open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=64)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
    return 64, vision, text


def build_tiny_clip(seed: int = TINY_SEED) -> open_clip.CLIP:
    """The tiny CLIP with seeded weights; the global RNG state is left as it was."""
    embed_dim, vision, text = tiny_clip_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    return model


def _load_state_dict(path: Path, field: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{field}: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise ValueError(f"{field}: cannot read {path} ({exc})") from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{field}: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _section(sd: dict[str, torch.Tensor], prefix: str, field: str) -> dict[str, torch.Tensor]:
    part = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if not part:
        raise ValueError(f"{field}: no '{prefix}*' tensors in the file")
    return part


def embedded_scorer_state(scorer: "Scorer") -> dict[str, torch.Tensor]:
    """What the embedded scorer file holds: the image tower ('visual.*') and the head ('head.*')."""
    sd = {f"visual.{k}": v for k, v in scorer.model.visual.state_dict().items()}
    sd.update({f"head.{k}": v for k, v in scorer.head.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


class AestheticHead(nn.Module):
    """LAION-style aesthetic MLP on L2-normalised CLIP image embeddings.

    Module names follow the LAION predictor (`layers.0` ... `layers.7`) so its state dict loads as is.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, int, int, int] = LAION_HIDDEN) -> None:
        super().__init__()
        if len(hidden) != 4 or any(h < 1 for h in hidden):
            raise ValueError(f"hidden: expected four positive sizes, got {hidden}")
        h0, h1, h2, h3 = hidden
        self.in_dim, self.hidden = int(in_dim), tuple(int(h) for h in hidden)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, h0),
            nn.Dropout(0.2),
            nn.Linear(h0, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.1),
            nn.Linear(h2, h3),
            nn.Linear(h3, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(F.normalize(embeddings, dim=-1)).squeeze(-1)

    @classmethod
    def seeded(cls, in_dim: int, hidden: tuple[int, int, int, int], seed: int = TINY_SEED) -> "AestheticHead":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(in_dim, hidden)

    @classmethod
    def from_file(cls, path: str | Path, in_dim: int | None = None) -> "AestheticHead":
        """Build the head from a local .pth/.safetensors state dict; layer sizes come from its shapes."""
        sd = _load_state_dict(Path(path), "aesthetic_weights")
        try:
            shapes = [tuple(sd[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)]
        except KeyError as exc:
            raise ValueError(
                f"aesthetic_weights: {path} lacks {exc.args[0]}; expected LAION-style layer names"
            ) from exc
        file_in = shapes[0][1]
        if in_dim is not None and file_in != in_dim:
            raise ValueError(f"aesthetic_weights: input size {file_in} does not match the CLIP embed dim {in_dim}")
        head = cls(file_in, tuple(s[0] for s in shapes[:4]))
        try:
            head.load_state_dict(sd)
        except RuntimeError as exc:
            raise ValueError(f"aesthetic_weights: {path} does not fit the head ({exc})") from exc
        return head


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from exc


class Scorer:
    """open_clip image/text embeddings plus an aesthetic score per image."""

    def __init__(self, cfg: ScoringConfig) -> None:
        self.cfg = cfg
        self.device = _resolve_device(cfg.device)
        self.tiny = cfg.clip_model == "tiny" or cfg.clip_weights is None
        if self.tiny:
            if cfg.clip_model != "tiny":
                logger.info("scoring: no clip_weights for %s; using the seeded tiny CLIP", cfg.clip_model)
            model = build_tiny_clip()
            if cfg.uses_trained_embedded:
                trained = _load_state_dict(EMBEDDED_SCORER, "embedded_scorer")
                model.visual.load_state_dict(_section(trained, "visual.", "embedded_scorer"))
            if cfg.clip_weights is not None:
                sd = _load_state_dict(Path(cfg.clip_weights), "clip_weights")
                try:
                    model.load_state_dict(sd)
                except RuntimeError as exc:
                    raise ValueError(f"clip_weights: not a tiny CLIP state dict ({exc})") from exc
            self.tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
        else:
            if not Path(cfg.clip_weights).is_file():
                raise ValueError(f"clip_weights: no such file {cfg.clip_weights}")
            try:
                model = open_clip.create_model(cfg.clip_model, pretrained=str(cfg.clip_weights))
            except RuntimeError as exc:
                raise ValueError(f"clip_model/clip_weights: cannot build {cfg.clip_model!r} ({exc})") from exc
            self.tokenizer = open_clip.get_tokenizer(cfg.clip_model)
        self.model = model.to(self.device).eval()

        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        pp = getattr(visual, "preprocess_cfg", None) or {}
        self._mean = torch.tensor(pp.get("mean", OPENAI_DATASET_MEAN), device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(pp.get("std", OPENAI_DATASET_STD), device=self.device).view(1, 3, 1, 1)
        self._embed_dim = self._infer_embed_dim()

        if cfg.aesthetic_weights is not None:
            head = AestheticHead.from_file(cfg.aesthetic_weights, in_dim=self._embed_dim)
        elif self.tiny and cfg.uses_trained_embedded:
            head = AestheticHead.seeded(self._embed_dim, TINY_HIDDEN)  # seeded: the global RNG stays as it was
            head.load_state_dict(_section(trained, "head.", "embedded_scorer"))
        else:
            hidden = TINY_HIDDEN if self.tiny else LAION_HIDDEN
            head = AestheticHead.seeded(self._embed_dim, hidden)
        self.head = head.to(self.device).eval()

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    def _infer_embed_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if isinstance(dim, int) and dim > 0:
            return dim
        with torch.inference_mode():
            dummy = torch.zeros(1, 3, *self.image_size, device=self.device)
            return int(self.model.encode_image(dummy).shape[-1])

    def _preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised (B, 3, S, S), then open_clip's mean/std.

        'squash' (default, as the authors select keyframes): the whole frame resized to S x S (bicubic,
        antialiased), nothing cropped away. 'crop': shortest side to S, centre crop (open_clip's transform)."""
        x = batch.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if self.cfg.image_resize == "squash":
            if (h, w) != (th, tw):
                x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
            return (x.clamp_(0.0, 1.0) - self._mean) / self._std
        # Sizes and offsets round as torchvision's Resize/CenterCrop do, matching open_clip's transform.
        if th / h >= tw / w:
            nh, nw = th, max(tw, int(w * th / h))
        else:
            nh, nw = max(th, int(h * tw / w)), tw
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        x = x[..., top : top + th, left : left + tw].clamp_(0.0, 1.0)
        return (x - self._mean) / self._std

    def _batches(self, frames: np.ndarray | Sequence[np.ndarray]):
        bs = self.cfg.batch_size
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            if frames.dtype != np.uint8 or frames.shape[-1] != 3:
                raise ValueError(f"frames: expected (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
            for i in range(0, frames.shape[0], bs):
                yield self._preprocess(torch.from_numpy(np.array(frames[i : i + bs])))
            return
        if isinstance(frames, np.ndarray):
            raise ValueError(f"frames: expected (N, H, W, 3) uint8, got shape {frames.shape}")
        # A list may mix sizes (reference images): preprocess one by one, forward in batches.
        images = list(frames)
        for j, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
                raise ValueError(f"frames[{j}]: expected an (H, W, 3) uint8 image")
        for i in range(0, len(images), bs):
            chunk = images[i : i + bs]
            yield torch.cat([self._preprocess(torch.from_numpy(np.array(im))[None]) for im in chunk])

    def embed_images(self, frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32 L2-normalised image embeddings of uint8 RGB frames."""
        out = []
        with torch.inference_mode():
            for x in self._batches(frames):
                out.append(self.model.encode_image(x, normalize=True).float().cpu())
        if not out:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 L2-normalised text embeddings."""
        if isinstance(texts, str):
            raise ValueError("texts: expected a list of strings, got a single string")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: every item must be a string")
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.cfg.batch_size):
                tokens = self.tokenizer(texts[i : i + self.cfg.batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def aesthetic(self, embeddings: np.ndarray) -> np.ndarray:
        """(N,) aesthetic scores of CLIP image embeddings (normalised inside the head)."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings: expected (N, {self.embed_dim}), got shape {emb.shape}")
        if emb.shape[0] == 0:
            return np.zeros((0,), dtype=np.float32)
        with torch.inference_mode():
            scores = self.head(torch.from_numpy(emb).to(self.device))
        return scores.float().cpu().numpy()

    def score_frames(self, frames: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (N, D), aesthetic (N,)) in one pass over the frames."""
        emb = self.embed_images(frames)
        return emb, self.aesthetic(emb)
