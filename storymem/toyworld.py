"""A procedurally rendered world of multi-shot stories, for training and proving M2V on a CPU.

Each story has one character with a persistent identity (shape, body colour, pattern and accent
colour, size) that does a different action on a different background in every shot. The prompts
name the action, roughly where it happens and the background, never the identity: a model can keep
the character the same across shots only by looking at its memory. Identities are split by a hash into a training and
a held-out set, so held-out stories show characters never seen in training.

Also here: the pixel-space identity measure used by the proof (`identity_descriptor`,
`identity_error`), which needs no pretrained network: the character is segmented from the
(uniform) background and described by its mean colour and its centred silhouette.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

# Backgrounds are dark or muted, characters bright: any character colour is far from any background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 60, 150),
    "green": (40, 110, 55),
    "grey": (100, 100, 100),
    "purple": (90, 45, 120),
    "brown": (110, 72, 40),
    "teal": (25, 105, 110),
    "navy": (22, 28, 75),
    "olive": (95, 100, 35),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (250, 150, 30),
    "yellow": (245, 230, 60),
    "pink": (250, 140, 195),
    "white": (240, 240, 240),
    "cyan": (60, 220, 245),
    "lime": (150, 240, 60),
    "magenta": (225, 55, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PATTERNS = ("plain", "band", "dot", "split")
SIZES = (10, 13)  # half-size in pixels at 64x48: a character spans several 8x8 VAE blocks
ACTIONS = ("moves left", "moves right", "moves up", "moves down", "jumps", "stands still")
_TEMPLATES = (
    "the character {action} {where} on a {background} background",
    "on a {background} background, the character {action} {where}",
    "in a {background} place, the character {action} {where}",
)
HELD_OUT_EVERY = 5  # one identity in five is held out of training

Split = Literal["train", "heldout", "any"]


@dataclass(frozen=True)
class Character:
    """The persistent identity. `accent` is ignored (equal to `body`) for the plain pattern."""

    shape: str
    body: str
    accent: str
    pattern: str
    size: int

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("body", self.body, tuple(COLOURS)),
            ("accent", self.accent, tuple(COLOURS)),
            ("pattern", self.pattern, PATTERNS),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not one of {allowed}")

    @property
    def key(self) -> str:
        accent = self.body if self.pattern == "plain" else self.accent
        return f"{self.shape}/{self.body}/{accent}/{self.pattern}/{self.size}"

    @property
    def split(self) -> str:
        return "heldout" if zlib.crc32(self.key.encode()) % HELD_OUT_EVERY == 0 else "train"


@dataclass(frozen=True)
class ToyShot:
    """One shot: what the character does where. Positions are fractions of the frame size."""

    action: str
    background: str
    x: float
    y: float
    distance: float
    template: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action: {self.action!r} is not one of {ACTIONS}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background: {self.background!r} is not one of {tuple(BACKGROUNDS)}")

    @property
    def where(self) -> str:
        """Where in the frame the action happens, coarsely (the centre of its path)."""
        horizontal = "left" if self.x < 0.42 else "right" if self.x > 0.58 else ""
        vertical = "upper" if self.y < 0.43 else "lower" if self.y > 0.57 else ""
        if vertical and horizontal:
            return f"in the {vertical} {horizontal}"
        if vertical:
            return f"in the {vertical} middle"
        return f"on the {horizontal}" if horizontal else "in the middle"

    @property
    def prompt(self) -> str:
        template = _TEMPLATES[self.template % len(_TEMPLATES)]
        return template.format(action=self.action, where=self.where, background=self.background)


@dataclass(frozen=True)
class ToyStory:
    story_id: str
    character: Character
    shots: tuple[ToyShot, ...]

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.shots]

    def script(self, reference: bool = False, height: int = 48, width: int = 64) -> dict:
        """The story as a flat StoryMem script (the identity is deliberately absent from the text).

        reference: also give the character as a reference image (the middle frame of its first shot,
        rendered, as base64 PNG), so that the story is customised (MR2V) to this character."""
        script = {
            "story_name": self.story_id,
            "story_overview": "a character goes from place to place",
            "shots": [{"prompt": p, "cut": True} for p in self.prompts],
        }
        if reference:
            import base64
            import io

            from PIL import Image

            frames = render_shot(self.character, self.shots[0], height, width)
            buf = io.BytesIO()
            Image.fromarray(frames[len(frames) // 2]).save(buf, format="PNG")
            script["reference_images"] = [{"data": base64.b64encode(buf.getvalue()).decode()}]
        return script

    def to_dict(self) -> dict:
        return {"story_id": self.story_id, "character": asdict(self.character), "shots": [asdict(s) for s in self.shots]}

    @classmethod
    def from_dict(cls, data: dict) -> "ToyStory":
        return cls(data["story_id"], Character(**data["character"]), tuple(ToyShot(**s) for s in data["shots"]))


# ------------------------------------------------------------------------------------------------
# sampling


def sample_character(rng: np.random.Generator, split: Split = "any") -> Character:
    """A random identity from the requested split (rejection sampling on the identity hash)."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split: {split!r} is not 'train', 'heldout' or 'any'")
    colours = list(COLOURS)
    while True:
        body, accent = rng.choice(len(colours), size=2, replace=False)
        c = Character(
            shape=SHAPES[rng.integers(len(SHAPES))],
            body=colours[body],
            accent=colours[accent],
            pattern=PATTERNS[rng.integers(len(PATTERNS))],
            size=SIZES[rng.integers(len(SIZES))],
        )
        if split == "any" or c.split == split:
            return c


def sample_shot(rng: np.random.Generator, previous_background: str | None = None) -> ToyShot:
    backgrounds = [b for b in BACKGROUNDS if b != previous_background]
    return ToyShot(
        action=ACTIONS[rng.integers(len(ACTIONS))],
        background=backgrounds[rng.integers(len(backgrounds))],
        x=float(rng.uniform(0.25, 0.75)),
        y=float(rng.uniform(0.3, 0.7)),
        distance=float(rng.uniform(0.3, 0.45)),
        template=int(rng.integers(len(_TEMPLATES))),
    )


SAME_PLACE_SHARE = 0.5  # stories told in one place: every shot has the first shot's background


def sample_story(rng: np.random.Generator, story_id: str, num_shots: int, split: Split = "any") -> ToyStory:
    """A character and its shots. Half the stories stay in one place; in the others every shot
    moves to another background. (In one-place stories memory also predicts the background, which
    is what first draws a model trained from scratch to look at its memory at all.)"""
    if num_shots < 1:
        raise ValueError(f"num_shots: must be >= 1, got {num_shots}")
    character = sample_character(rng, split)
    same_place = bool(rng.random() < SAME_PLACE_SHARE)
    shots: list[ToyShot] = []
    for _ in range(num_shots):
        shot = sample_shot(rng, shots[-1].background if shots else None)
        if same_place and shots:
            shot = ToyShot(shot.action, shots[0].background, shot.x, shot.y, shot.distance, shot.template)
        shots.append(shot)
    return ToyStory(story_id, character, tuple(shots))


def make_stories(num_stories: int, num_shots: int, seed: int, split: Split = "train", prefix: str = "toy") -> list[ToyStory]:
    """`num_stories` stories of `num_shots` shots, reproducible from `seed`."""
    if num_stories < 1:
        raise ValueError(f"num_stories: must be >= 1, got {num_stories}")
    rng = np.random.default_rng(seed)
    return [sample_story(rng, f"{prefix}-{split}-{seed}-{i:04d}", num_shots, split) for i in range(num_stories)]


# ------------------------------------------------------------------------------------------------
# rendering


def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape centred at the origin, y pointing down."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.88 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.25 * r) / np.sqrt(2.0)
    # Upward triangle with its centroid at the origin: the maximum of three half-plane distances.
    top, bottom, half = -1.2 * r, 0.8 * r, 1.15 * r
    n = np.array([bottom - top, half])
    n = n / np.linalg.norm(n)
    right = n[0] * dx - n[1] * (dy - top)
    left = -n[0] * dx - n[1] * (dy - top)
    return np.maximum(np.maximum(right, left), dy - bottom)


def _trajectory(shot: ToyShot, num_frames: int, width: int, height: int, r: float) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 1.0, num_frames)
    x = np.full(num_frames, shot.x * width)
    y = np.full(num_frames, shot.y * height)
    dist_x, dist_y = shot.distance * width, shot.distance * height
    if shot.action == "moves left":
        x = x + dist_x * (0.5 - t)
    elif shot.action == "moves right":
        x = x - dist_x * (0.5 - t)
    elif shot.action == "moves up":
        y = y + dist_y * (0.5 - t)
    elif shot.action == "moves down":
        y = y - dist_y * (0.5 - t)
    elif shot.action == "jumps":
        y = y + 0.25 * dist_y - dist_y * np.sin(np.pi * t)
    # Keep the whole character inside the frame whatever the start position.
    margin = r + 2.0
    return np.clip(x, margin, width - margin), np.clip(y, margin, height - margin)


def render_shot(character: Character, shot: ToyShot, height: int = 48, width: int = 64, num_frames: int = 13) -> np.ndarray:
    """(F, H, W, 3) uint8: the character doing the shot's action, antialiased."""
    if height < 16 or width < 16 or num_frames < 1:
        raise ValueError(f"height/width/num_frames: too small ({height}x{width}, {num_frames} frames)")
    scale = min(height / 48.0, width / 64.0)
    r = character.size * scale
    bg = np.asarray(BACKGROUNDS[shot.background], dtype=np.float32)
    # A faint vertical gradient so that the background is not perfectly flat.
    shade = (1.08 - 0.16 * np.arange(height, dtype=np.float32) / max(height - 1, 1))[:, None, None]
    background = np.clip(bg[None, None, :] * shade, 0, 255) * np.ones((1, width, 1), np.float32)
    body = np.asarray(COLOURS[character.body], dtype=np.float32)
    accent = np.asarray(COLOURS[character.accent], dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    xs, ys = _trajectory(shot, num_frames, width, height, r)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        dx, dy = xx - xs[i], yy - ys[i]
        coverage = np.clip(0.5 - _sdf(character.shape, dx, dy, r), 0.0, 1.0)[..., None]
        if character.pattern == "band":
            inner = np.abs(dy) < 0.33 * r
        elif character.pattern == "dot":
            inner = dx * dx + dy * dy < (0.45 * r) ** 2
        elif character.pattern == "split":
            inner = dy < 0
        else:
            inner = np.zeros_like(dx, dtype=bool)
        colour = np.where(inner[..., None], accent, body)
        out[i] = np.clip(background * (1.0 - coverage) + colour * coverage + 0.5, 0, 255).astype(np.uint8)
    return out


def render_story(story: ToyStory, height: int = 48, width: int = 64, num_frames: int = 13) -> list[np.ndarray]:
    return [render_shot(story.character, s, height, width, num_frames) for s in story.shots]


def write_training_set(
    root: str | Path,
    num_stories: int,
    shots_per_story: int,
    seed: int = 0,
    height: int = 48,
    width: int = 64,
    num_frames: int = 13,
    split: Split = "train",
) -> Path:
    """Render stories to `root/clips/*.npy` and write `root/manifest.parquet` (see storymem.training.data).

    One clip per shot; a story is a group (its clips share the character), with the character's mask
    (`character_mask` of the render) as the clip's subject_mask. Returns the manifest path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"clip_id": [], "group_id": [], "path": [], "prompt": [], "subject_mask": []}
    stories = make_stories(num_stories, shots_per_story, seed, split)
    for story in stories:
        for k, (shot, frames) in enumerate(zip(story.shots, render_story(story, height, width, num_frames))):
            clip_id = f"{story.story_id}-{k:02d}"
            np.save(root / "clips" / f"{clip_id}.npy", frames)
            np.save(root / "clips" / f"{clip_id}.mask.npy", character_mask(frames))
            rows["clip_id"].append(clip_id)
            rows["group_id"].append(story.story_id)
            rows["path"].append(f"clips/{clip_id}.npy")
            rows["prompt"].append(shot.prompt)
            rows["subject_mask"].append(f"clips/{clip_id}.mask.npy")
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table(rows), manifest)
    (root / "stories.json").write_text(json.dumps([s.to_dict() for s in stories]))
    return manifest


# ------------------------------------------------------------------------------------------------
# the pixel-space identity measure


MIN_CHARACTER_PIXELS = 6  # fewer pixels off the background: no character in the frame


def frame_background(frames: np.ndarray) -> np.ndarray:
    """(..., F, 1, 1, 3) float32: each frame's background colour, the median of its border pixels."""
    x = np.asarray(frames, dtype=np.float32)
    border = np.concatenate([x[..., 0, :, :], x[..., -1, :, :], x[..., :, 0, :], x[..., :, -1, :]], axis=-2)
    return np.median(border, axis=-2)[..., None, None, :]


def character_mask(frames: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """(F, H, W) bool: pixels far (RGB distance > threshold) from the frame's background colour,
    estimated as the median of the frame's border pixels."""
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames: expected (F, H, W, 3), got shape {x.shape}")
    return np.linalg.norm(x - frame_background(x), axis=-1) > threshold


@dataclass
class IdentityDescriptor:
    """colour: mean RGB in [0, 1] of the character pixels; silhouette: (S, S) mean mask centred on
    the character's centroid; found: fraction of frames where a character was found."""

    colour: np.ndarray
    silhouette: np.ndarray
    found: float


def identity_descriptor(frames: np.ndarray, threshold: float = 60.0, min_pixels: int = MIN_CHARACTER_PIXELS, window: int = 24) -> IdentityDescriptor:
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    masks = character_mask(x, threshold)
    colours, silhouettes = [], []
    half = window // 2
    for frame, mask in zip(x, masks):
        if mask.sum() < min_pixels:
            continue
        colours.append(frame[mask].astype(np.float64).mean(axis=0) / 255.0)
        ys, xs = np.nonzero(mask)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        padded = np.pad(mask, half)
        silhouettes.append(padded[cy : cy + window, cx : cx + window].astype(np.float64))
    if not colours:
        return IdentityDescriptor(np.full(3, np.nan), np.zeros((window, window)), 0.0)
    return IdentityDescriptor(np.mean(colours, axis=0), np.mean(silhouettes, axis=0), len(colours) / len(x))


def identity_error(frames: np.ndarray, reference: np.ndarray | IdentityDescriptor) -> dict[str, float]:
    """How far the character of `frames` is from the one of `reference` (frames or a descriptor).

    colour: Euclidean distance of mean colours in RGB [0, 1] / sqrt(3) (0 same, 1 black vs white);
    shape: 1 - soft IoU of the centred silhouettes; found: fraction of frames with a character.
    A shot without a visible character scores colour = shape = 1."""
    ref = reference if isinstance(reference, IdentityDescriptor) else identity_descriptor(reference)
    d = identity_descriptor(frames)
    if d.found == 0.0 or ref.found == 0.0:
        return {"colour": 1.0, "shape": 1.0, "found": d.found}
    colour = float(np.linalg.norm(d.colour - ref.colour) / np.sqrt(3.0))
    inter = np.minimum(d.silhouette, ref.silhouette).sum()
    union = np.maximum(d.silhouette, ref.silhouette).sum()
    shape = float(1.0 - inter / union) if union > 0 else 1.0
    return {"colour": colour, "shape": shape, "found": d.found}
