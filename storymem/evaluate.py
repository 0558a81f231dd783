"""ST-Bench metrics on finished stories, as a Parquet table and an HTML report with plots.

Metrics (method.md, 'ST-Bench'), per story:
* aesthetic_quality: mean aesthetic-predictor score of sampled frames over all shots, divided by 10
  (VBench's convention for the LAION predictor, whose scores lie in about 1..10);
* prompt_following_global: cosine between the whole story's video embedding and the story text
  (the overview when the script has one, else all shot prompts joined);
* prompt_following_single: mean over shots of cosine(shot video embedding, shot prompt embedding);
* consistency: mean cosine between the video embeddings of all shot pairs;
* consistency_top10: the same over the 10 most related pairs; related by prompt similarity
  (shots whose prompts are closest, i.e. most likely to show the same characters and places), or
  by video similarity with `top_pairs_by="video"`.

The video encoder is pluggable (`VideoEncoder`): the default averages CLIP frame embeddings of the
`Scorer`; a ViCLIP-style encoder plugs in through `--video-encoder package.module:Class`.

Input: a story folder holding `shots/000.mp4, 001.mp4, ...` and `script.json` (the runner's layout),
or a plain folder of shot videos (sorted by name) with `script.json`; a root folder of such story
folders evaluates them all.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
METRICS = (
    "aesthetic_quality",
    "prompt_following_global",
    "prompt_following_single",
    "consistency",
    "consistency_top10",
)


@runtime_checkable
class VideoEncoder(Protocol):
    """Video and text into one embedding space (L2-normalised float32 rows)."""

    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def sample_frames(video: np.ndarray, n: int) -> np.ndarray:
    """`n` frames spread evenly over the video (all of them when it is shorter)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[0] == 0:
        raise ValueError(f"video: expected (F, H, W, 3) with F >= 1, got shape {video.shape}")
    if video.shape[0] <= n:
        return video
    return video[np.linspace(0, video.shape[0] - 1, n).round().astype(int)]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class FrameAverageEncoder:
    """CLIP as a video encoder: the renormalised mean of the embeddings of evenly sampled frames."""

    def __init__(self, scorer, frames_per_video: int = 8):
        if frames_per_video < 1:
            raise ValueError(f"frames_per_video: must be >= 1, got {frames_per_video}")
        self.scorer = scorer
        self.frames_per_video = frames_per_video

    def embed_videos(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        rows = [self.scorer.embed_images(sample_frames(v, self.frames_per_video)).mean(axis=0) for v in videos]
        return _normalise(np.stack(rows)) if rows else np.zeros((0, self.scorer.embed_dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.scorer.embed_texts(list(texts))


def load_video_encoder(spec: str, scorer, frames_per_video: int = 8) -> VideoEncoder:
    """'clip' (frame-averaged CLIP of the scorer) or 'package.module:Class' (constructed without arguments)."""
    if spec == "clip":
        return FrameAverageEncoder(scorer, frames_per_video)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"video_encoder: {spec!r} is neither 'clip' nor 'package.module:Class'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(f"video_encoder: cannot load {spec!r} ({exc})") from exc
    if not isinstance(obj, VideoEncoder):
        raise ValueError(f"video_encoder: {spec!r} has no embed_videos/embed_texts")
    return obj


# ------------------------------------------------------------------------------------------------
# input


@dataclass
class StoryVideos:
    story_id: str
    shots: list[np.ndarray]
    prompts: list[str]
    overview: str | None = None
    files: list[str] = field(default_factory=list)


def _shot_files(folder: Path) -> list[Path]:
    base = folder / "shots" if (folder / "shots").is_dir() else folder
    return sorted(p for p in base.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def is_story_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "script.json").is_file() and bool(_shot_files(folder))


def find_stories(root: str | Path) -> list[Path]:
    """The story folder itself, or the story folders directly inside `root` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"stories: {root} is not a folder")
    if is_story_folder(root):
        return [root]
    found = sorted(p for p in root.iterdir() if is_story_folder(p))
    if not found:
        raise ValueError(f"stories: no story folder (script.json + shot videos) in {root}")
    return found


def load_story(folder: str | Path) -> StoryVideos:
    """Decode a story's shots (storymem.stitch.read_video) and read its prompts from script.json."""
    from .script import ScriptError, load_script
    from .stitch import read_video

    folder = Path(folder)
    try:
        script = load_script(folder / "script.json")
    except ScriptError as exc:
        raise ValueError(f"{folder / 'script.json'}: {exc}") from exc
    files = _shot_files(folder)
    if not files:
        raise ValueError(f"{folder}: no shot videos")
    prompts = [s.prompt for s in script.shots]
    if len(files) > len(prompts):
        raise ValueError(f"{folder}: {len(files)} shot videos but the script has {len(prompts)} shots")
    shots = []
    for f in files:
        video = read_video(f)
        if video.shape[0] == 0:
            raise ValueError(f"{f}: the video has no frames")
        shots.append(video)
    # An unfinished story is evaluated on the shots it has.
    return StoryVideos(
        story_id=script.story_name or folder.name,
        shots=shots,
        prompts=prompts[: len(files)],
        overview=script.story_overview,
        files=[str(f) for f in files],
    )


# ------------------------------------------------------------------------------------------------
# metrics


def pair_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def consistency_scores(
    video_embeddings: np.ndarray,
    text_embeddings: np.ndarray | None = None,
    top_k: int = 10,
    by: str = "prompt",
) -> tuple[float, float, np.ndarray]:
    """(mean over all shot pairs, mean over the top_k most related pairs, the similarity matrix)."""
    v = _normalise(video_embeddings)
    sim = v @ v.T
    n = v.shape[0]
    if n < 2:
        return float("nan"), float("nan"), sim
    i, j = pair_indices(n)
    pair_sim = sim[i, j]
    if by == "prompt":
        if text_embeddings is None:
            raise ValueError("text_embeddings: required when top pairs are chosen by prompt similarity")
        t = _normalise(text_embeddings)
        relatedness = (t @ t.T)[i, j]
    elif by == "video":
        relatedness = pair_sim
    else:
        raise ValueError(f"top_pairs_by: {by!r} is not 'prompt' or 'video'")
    # Stable sort: ties keep shot order, so the choice is deterministic.
    top = np.argsort(-relatedness, kind="stable")[: max(1, top_k)]
    return float(pair_sim.mean()), float(pair_sim[top].mean()), sim


@dataclass
class StoryMetrics:
    story_id: str
    num_shots: int
    aesthetic_quality: float
    prompt_following_global: float
    prompt_following_single: float
    consistency: float
    consistency_top10: float
    shot_aesthetic: list[float]
    shot_prompt_following: list[float]
    similarity: np.ndarray
    thumbnails: list[np.ndarray] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        return {
            "story_id": self.story_id,
            "num_shots": self.num_shots,
            **{m: getattr(self, m) for m in METRICS},
            "shot_aesthetic": list(map(float, self.shot_aesthetic)),
            "shot_prompt_following": list(map(float, self.shot_prompt_following)),
            "similarity": [list(map(float, r)) for r in self.similarity],
        }


class Evaluator:
    """Computes StoryMetrics with a Scorer (aesthetics) and a VideoEncoder (video/text embeddings)."""

    def __init__(self, scorer, video_encoder: VideoEncoder | None = None, frames_per_shot: int = 8, top_pairs: int = 10, top_pairs_by: str = "prompt"):
        if top_pairs_by not in ("prompt", "video"):
            raise ValueError(f"top_pairs_by: {top_pairs_by!r} is not 'prompt' or 'video'")
        if top_pairs < 1:
            raise ValueError(f"top_pairs: must be >= 1, got {top_pairs}")
        self.scorer = scorer
        self.encoder = video_encoder or FrameAverageEncoder(scorer, frames_per_shot)
        self.frames_per_shot = frames_per_shot
        self.top_pairs = top_pairs
        self.top_pairs_by = top_pairs_by

    def evaluate_story(self, story: StoryVideos) -> StoryMetrics:
        if not story.shots:
            raise ValueError(f"{story.story_id}: no shots")
        if len(story.prompts) != len(story.shots):
            raise ValueError(f"{story.story_id}: {len(story.shots)} shots but {len(story.prompts)} prompts")
        shot_aes = []
        for shot in story.shots:
            _, aes = self.scorer.score_frames(sample_frames(shot, self.frames_per_shot))
            shot_aes.append(float(np.mean(aes)) / 10.0)
        videos = self.encoder.embed_videos(story.shots)
        texts = self.encoder.embed_texts(story.prompts)
        single = np.sum(_normalise(videos) * _normalise(texts), axis=1)
        whole = self.encoder.embed_videos([np.concatenate([sample_frames(s, self.frames_per_shot) for s in story.shots])])
        story_text = story.overview or " ".join(story.prompts)
        global_pf = float(np.sum(_normalise(whole)[0] * _normalise(self.encoder.embed_texts([story_text]))[0]))
        cons, top, sim = consistency_scores(videos, texts, self.top_pairs, self.top_pairs_by)
        return StoryMetrics(
            story_id=story.story_id,
            num_shots=len(story.shots),
            aesthetic_quality=float(np.mean(shot_aes)),
            prompt_following_global=global_pf,
            prompt_following_single=float(np.mean(single)),
            consistency=cons,
            consistency_top10=top,
            shot_aesthetic=shot_aes,
            shot_prompt_following=[float(x) for x in single],
            similarity=sim,
            thumbnails=[s[s.shape[0] // 2] for s in story.shots],
        )


def summary(metrics: Sequence[StoryMetrics]) -> dict[str, float]:
    """Benchmark-level numbers: the mean of each metric over stories (NaN-aware)."""
    return {m: float(np.nanmean([getattr(s, m) for s in metrics])) if metrics else float("nan") for m in METRICS}


def results_table(metrics: Sequence[StoryMetrics]):
    import pyarrow as pa

    rows = [s.row() for s in metrics]
    schema = pa.schema(
        [("story_id", pa.string()), ("num_shots", pa.int32())]
        + [(m, pa.float64()) for m in METRICS]
        + [
            ("shot_aesthetic", pa.list_(pa.float64())),
            ("shot_prompt_following", pa.list_(pa.float64())),
            ("similarity", pa.list_(pa.list_(pa.float64()))),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def write_metrics_table(metrics: Sequence[StoryMetrics], path: str | Path) -> Path:
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(results_table(metrics), path)
    return path


# ------------------------------------------------------------------------------------------------
# report


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _bars(metrics: Sequence[StoryMetrics]) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = [s.story_id for s in metrics]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 0.35 * len(names) + 1.6), sharey=True)
    for ax, m in zip(axes, METRICS):
        values = [getattr(s, m) for s in metrics]
        ax.barh(range(len(names)), values, color="#4c72b0")
        ax.set_title(m.replace("_", " "), fontsize=9)
        ax.axvline(float(np.nanmean(values)), color="#dd8452", lw=1)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(3))
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    return _img(_png(fig), "per-story metrics")


def _heatmap(s: StoryMetrics) -> str:
    import matplotlib.pyplot as plt

    n = s.num_shots
    fig, ax = plt.subplots(figsize=(0.38 * n + 1.8, 0.38 * n + 1.2))
    im = ax.imshow(s.similarity, vmin=min(0.0, float(np.min(s.similarity))), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), [str(k + 1) for k in range(n)], fontsize=7)
    ax.set_yticks(range(n), [str(k + 1) for k in range(n)], fontsize=7)
    ax.set_xlabel("shot", fontsize=8)
    ax.set_title(f"{s.story_id}: shot similarity", fontsize=9)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{s.similarity[i, j]:.2f}", ha="center", va="center", fontsize=5, color="white")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _img(_png(fig), f"consistency matrix of {s.story_id}")


def _strip(s: StoryMetrics) -> str:
    if not s.thumbnails:
        return ""
    from PIL import Image

    h = 72
    tiles = [Image.fromarray(t).resize((max(1, round(t.shape[1] * h / t.shape[0])), h)) for t in s.thumbnails]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), h), "white")
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 2
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return _img(base64.b64encode(buf.getvalue()).decode(), f"middle frame of each shot of {s.story_id}")


def write_report(metrics: Sequence[StoryMetrics], path: str | Path, title: str = "StoryMem evaluation") -> Path:
    """One self-contained HTML page: summary table, per-story bars, per-story heat maps and frames."""
    import matplotlib

    matplotlib.use("Agg")
    if not metrics:
        raise ValueError("metrics: nothing to report")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mean = summary(metrics)
    head = "".join(f"<th>{html.escape(m.replace('_', ' '))}</th>" for m in METRICS)
    body = "".join(
        "<tr><td>{}</td><td>{}</td>{}</tr>".format(
            html.escape(s.story_id), s.num_shots, "".join(f"<td>{getattr(s, m):.4f}</td>" for m in METRICS)
        )
        for s in metrics
    )
    body += "<tr class=mean><td>mean</td><td></td>{}</tr>".format("".join(f"<td>{mean[m]:.4f}</td>" for m in METRICS))
    sections = "".join(
        f"<section><h3>{html.escape(s.story_id)}</h3>{_strip(s)}<div>{_heatmap(s)}</div></section>" for s in metrics
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
tr.mean{{font-weight:bold}}section{{margin:1.5em 0}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(metrics)} stories. Aesthetic quality = predictor score / 10; prompt following and consistency are cosine
similarities of video/text embeddings; top-10 consistency uses the most related shot pairs.</p>
<table><tr><th>story</th><th>shots</th>{head}</tr>{body}</table>
<h2>Per story</h2>{_bars(metrics)}
<h2>Consistency matrices</h2>{sections}
</body></html>"""
    path.write_text(page)
    return path


# ------------------------------------------------------------------------------------------------
# CLI


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="ST-Bench metrics of finished stories: Parquet table + HTML report",
        description="Aesthetic quality, prompt following (global, per shot) and cross-shot consistency "
        "(all pairs, top-10 pairs) of finished stories.",
    )
    p.add_argument("stories", type=Path, help="a story folder (shots/*.mp4 + script.json) or a folder of them")
    p.add_argument("--out", type=Path, default=Path("eval"), help="folder for results.parquet and report.html")
    p.add_argument("--config", type=Path, default=None, help="StoryMem config file (its scoring section is used)")
    p.add_argument("--clip-model", default=None, help="open_clip architecture (overrides the config)")
    p.add_argument("--clip-weights", type=Path, default=None, help="local open_clip checkpoint")
    p.add_argument("--aesthetic-weights", type=Path, default=None, help="local LAION-style aesthetic MLP")
    p.add_argument("--video-encoder", default="clip", help="'clip' (frame-averaged) or package.module:Class")
    p.add_argument("--frames-per-shot", type=int, default=8)
    p.add_argument("--top-pairs", type=int, default=10)
    p.add_argument("--top-pairs-by", choices=["prompt", "video"], default="prompt")
    return p


def run_eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .config import load_config
    from .scoring import Scorer

    try:
        cfg = load_config(args.config).scoring
        updates = {
            k: v
            for k, v in (
                ("clip_model", args.clip_model),
                ("clip_weights", args.clip_weights),
                ("aesthetic_weights", args.aesthetic_weights),
            )
            if v is not None
        }
        if "image_resize" not in cfg.model_fields_set:
            updates["image_resize"] = "crop"  # VBench's aesthetic metric sees centre crops
        if updates:
            cfg = cfg.model_validate({**cfg.model_dump(), **updates})
        folders = find_stories(args.stories)
        scorer = Scorer(cfg)
        encoder = load_video_encoder(args.video_encoder, scorer, args.frames_per_shot)
        evaluator = Evaluator(scorer, encoder, args.frames_per_shot, args.top_pairs, args.top_pairs_by)
        metrics = [evaluator.evaluate_story(load_story(f)) for f in folders]
    except (ValueError, ValidationError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    table = write_metrics_table(metrics, args.out / "results.parquet")
    report = write_report(metrics, args.out / "report.html")
    print(json.dumps({"stories": len(metrics), **summary(metrics), "table": str(table), "report": str(report)}))
    return 0
