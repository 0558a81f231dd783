"""A story beside the same story with memory removed: local copies and pictures for people to look at.

* `mirror_story(store, layout, dest)` copies a stored story (e.g. `stories/<id>/` in S3) into a
  local folder with the layout of a `storymem run` folder (manifest.json, script.json, shots/,
  keyframes/, memory/, final.mp4), the object keys inside its JSON files made relative to it, so
  that anything that reads a run folder (the storyboard, `storymem eval`) reads it.
* `side_by_side_video(runs, path)`: the runs' shots next to each other, shot after shot, labelled.
* `contact_sheet(runs, path)`: one row per run, one column per shot (each shot's middle frame).
* `memory_removed(body)`: a story request body with `settings.use_memory = false`;
  `write_comparison(runs, folder)`: the video and the sheet together (what `make demo` writes).

`runs` maps a label (WITH_MEMORY, MEMORY_REMOVED) to a run folder. Plain library, no Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .storage import ArtifactStore, StoryLayout

WITH_MEMORY, MEMORY_REMOVED = "with memory", "memory removed"
LABEL_HEIGHT = 18  # pixels of the caption bar above each panel
GAP = 6  # pixels between panels


def mirror_story(store: ArtifactStore, layout: StoryLayout, dest: str | os.PathLike) -> Path:
    """Copy every object under `layout.prefix` to `dest/<key without the prefix>`; JSON objects
    have the prefix removed from the keys they name. Returns `dest`."""
    dest = Path(dest)
    prefix = layout.prefix
    keys = [k for k in store.list(prefix) if k.startswith(prefix) and len(k) > len(prefix)]
    if not any(k == layout.manifest for k in keys):
        raise ValueError(f"story: no {layout.manifest} in {store!r}; nothing was committed")
    for key in keys:
        rel = key[len(prefix) :]
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = store.get_bytes(key)
        if rel.endswith(".json") and prefix:
            data = json.dumps(_strip_prefix(json.loads(data), prefix), indent=2).encode()
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)  # a half-copied file never carries the final name
    return dest


def _strip_prefix(value, prefix: str):
    if isinstance(value, str):
        return value[len(prefix) :] if value.startswith(prefix) else value
    if isinstance(value, list):
        return [_strip_prefix(v, prefix) for v in value]
    if isinstance(value, dict):
        return {k: _strip_prefix(v, prefix) for k, v in value.items()}
    return value


def read_run_shots(run_dir: str | os.PathLike) -> tuple[list[np.ndarray], dict]:
    """The decoded shots of a run folder, in order, and its manifest (as stored)."""
    from .stitch import read_video

    root = Path(run_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    return [read_video(root / shot["video"]) for shot in manifest["shots"]], manifest


def run_references(run_dir: str | os.PathLike) -> list[np.ndarray]:
    """The reference images (MR2V) of a run folder's script.json, as RGB arrays; [] when none."""
    import base64
    import io

    from PIL import Image

    path = Path(run_dir) / "script.json"
    script = json.loads(path.read_text()) if path.exists() else {}
    images = []
    for ref in script.get("reference_images") or []:
        data = ref.get("data") if isinstance(ref, dict) else None
        if data:
            images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",")[-1]))).convert("RGB")))
    return images


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _captioned(image: np.ndarray, text: str, scale: int) -> np.ndarray:
    """`image` enlarged `scale` times (nearest: the pixels stay visible) under a caption bar."""
    from PIL import Image, ImageDraw

    big = np.asarray(Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST))
    bar = Image.new("RGB", (big.shape[1], LABEL_HEIGHT), (24, 24, 24))
    ImageDraw.Draw(bar).text((4, 2), text, fill=(235, 235, 235), font=_font(LABEL_HEIGHT - 5))
    return np.concatenate([np.asarray(bar), big], axis=0)


def _hstack(panels: list[np.ndarray]) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    gap = np.full((h, GAP, 3), 255, np.uint8)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(gap)
        parts.append(np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255))
    return np.concatenate(parts, axis=1)


def _even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)  # H.264 4:2:0 wants even sizes


def side_by_side_video(runs: Mapping[str, str | os.PathLike], path: str | os.PathLike, scale: int = 4, fps: int | None = None) -> Path:
    """One video: the runs' shot k next to each other (captioned "label · shot k"), shot after shot.
    Shots of unequal length are held on their last frame. fps: the first run's settings'."""
    from .stitch import write_video

    loaded = {label: read_run_shots(folder) for label, folder in runs.items()}
    if not loaded:
        raise ValueError("runs: at least one run folder is needed")
    counts = {label: len(shots) for label, (shots, _) in loaded.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"runs: the runs have different numbers of shots {counts}")
    first_manifest = next(iter(loaded.values()))[1]
    fps = fps or int(first_manifest["settings"].get("fps", 16))
    frames = []
    for k in range(next(iter(counts.values()))):
        shots = {label: shots[k] for label, (shots, _) in loaded.items()}
        n = max(len(s) for s in shots.values())
        for i in range(n):
            panels = [_captioned(s[min(i, len(s) - 1)], f"{label} · shot {k + 1}", scale) for label, s in shots.items()]
            frames.append(_even(_hstack(panels)))
    return write_video(np.stack(frames), path, fps=fps)


def contact_sheet(runs: Mapping[str, str | os.PathLike], path: str | os.PathLike, scale: int = 3) -> Path:
    """A PNG: one row per run (its label on the left), one column per shot (the shot's middle frame),
    after the story's reference images when it has any (what the character should look like)."""
    from PIL import Image, ImageDraw

    rows, width = [], 0
    for label, folder in runs.items():
        shots, _ = read_run_shots(folder)
        size = (shots[0].shape[2], shots[0].shape[1]) if shots else None  # PIL: (width, height)
        tiles = [_captioned(np.asarray(Image.fromarray(r).resize(size, Image.BICUBIC)), "reference", scale) for r in run_references(folder)]
        tiles += [_captioned(s[len(s) // 2], f"shot {k + 1}", scale) for k, s in enumerate(shots)]
        rows.append((label, _hstack(tiles)))
        width = max(width, rows[-1][1].shape[1])
    if not rows:
        raise ValueError("runs: at least one run folder is needed")
    label_w = 150
    out = Image.new("RGB", (label_w + width, sum(r.shape[0] + GAP for _, r in rows) - GAP), (255, 255, 255))
    draw, y = ImageDraw.Draw(out), 0
    for label, row in rows:
        out.paste(Image.fromarray(row), (label_w, y))
        draw.text((6, y + row.shape[0] // 2 - 8), label, fill=(20, 20, 20), font=_font(15))
        y += row.shape[0] + GAP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    out.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def memory_removed(body: dict) -> dict:
    """A copy of a story request body (`{"script": ..., "settings": ...}`, as the engine and the HTTP
    API take it) with `settings.use_memory = false`; every other setting as the story set it."""
    if not isinstance(body, dict):
        raise ValueError(f"request: expected a mapping with 'script' and 'settings', got {type(body).__name__}")
    settings = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError("settings: expected a mapping")
    return {**body, "settings": {**settings, "use_memory": False}}


def write_comparison(runs: Mapping[str, str | os.PathLike], folder: str | os.PathLike) -> dict[str, Path]:
    """`memory_vs_removed.mp4` (side by side) and `contact_sheet.png` of `runs` in `folder`."""
    folder = Path(folder)
    files = {
        "side by side": side_by_side_video(runs, folder / "memory_vs_removed.mp4"),
        "contact sheet": contact_sheet(runs, folder / "contact_sheet.png"),
    }
    from .board import write_board

    # The storyboard of the run with memory, the run without beside it shot by shot.
    files["storyboard"] = write_board(runs[WITH_MEMORY], compare_dir=runs[MEMORY_REMOVED], compare_label=MEMORY_REMOVED)
    return files
