"""Story scripts and per-story generation settings.

A script is a list of shots, each a text prompt plus a `cut` flag (`False`: the shot continues the
previous one smoothly). Two input forms are accepted and give identical `StoryScript` objects:

* flat: ``{"story_name"?, "story_overview"?, "shots": [{"prompt", "cut"?, "scene"?, "first_frame_prompt"?}],
  "reference_images"?: [{"data": base64} | {"path": file}]}``
* ST-Bench (the paper's benchmark files): ``{"story_name", "story_overview", "scenes": [{"scene_num",
  "video_prompts": [...], "first_frame_prompt": [...], "cut": [...]}]}``

A request (`StoryRequest`, `load_request`) adds `GenerationSettings`: either
``{"script": SCRIPT, "settings"?: SETTINGS}`` or a bare script (either form) with an optional top-level
``"settings"`` key. Every validation problem is reported as a `(field, problem)` pair in `ScriptError`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

MAX_SHOTS = 100
MAX_PROMPT_CHARS = 4000
MAX_REFERENCE_IMAGES = 10
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
IMAGE_FORMATS = ("PNG", "JPEG")

# Wan's default negative prompt, verbatim (sample_neg_prompt of Wan2.1/Wan2.2's shared config,
# 137 characters); the authors' driver uses it for every shot whose negative prompt is unset.
WAN_DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，"
    "最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

# An English rendering of it: the default of the embedded tiny model (its character-level tokenizer
# spells no Chinese; storymem.models) and of stories recorded before manifest version 2.
WAN_NEGATIVE_PROMPT_EN = (
    "oversaturated colours, overexposed, static, motionless, blurry details, subtitles, captions, "
    "text, watermark, logo, painting, still picture, greyish overall tone, worst quality, low quality, "
    "jpeg artifacts, compression noise, ugly, mutilated, deformed, disfigured, extra fingers, "
    "fused fingers, poorly drawn hands, poorly drawn face, malformed limbs, extra limbs, "
    "cluttered background, crowded background, people walking backwards, flickering"
)


class ScriptError(ValueError):
    """Bad script, settings or request: `errors` holds `(field, problem)` pairs, field a dotted path."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = list(errors)
        super().__init__("\n".join(f"{field}: {problem}" for field, problem in self.errors))

    def __reduce__(self):
        # Exceptions pickle as cls(*args); args here is the joined message, not the pairs. Ray
        # pickles exceptions raised in actors (the engine's submit), so rebuild from the pairs.
        return (type(self), (self.errors,))

    @classmethod
    def from_validation_error(cls, exc: ValidationError, prefix: str = "") -> "ScriptError":
        errors = []
        for err in exc.errors(include_url=False):
            field = _dotted(err["loc"])
            if prefix:
                field = f"{prefix}.{field}" if field else prefix
            errors.append((field or "<root>", _problem(err["msg"])))
        return cls(errors)


# Union branches and wrapped validators add entries such as "function-after[...]" to error
# locations; they name no field the user wrote, so they are dropped.
_INTERNAL_LOC = re.compile(r"^[\w-]+\[.*\]$")
_INTERNAL_TAGS = {"lax-or-strict", "json-or-python", "strict", "lax"}


def _dotted(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (_INTERNAL_LOC.match(p) or p in _INTERNAL_TAGS))]
    return ".".join(parts)


def _problem(msg: str) -> str:
    for lead in ("Value error, ", "Assertion failed, "):
        if msg.startswith(lead):
            return msg[len(lead) :]
    return msg


def _error_at(loc: tuple, problem: str) -> ValidationError:
    # Raised inside a validator, a ValidationError keeps its locations (prefixed by the validator's
    # own), which lets model-level checks name the exact field instead of the model.
    kind = PydanticCustomError("storymem", "{problem}", {"problem": problem})
    detail = InitErrorDetails(type=kind, loc=loc, input=None)
    return ValidationError.from_exception_data("StoryScript", [detail])


# ----------------------------------------------------------------------------------------------
# Settings


class TransitionMode(str, Enum):
    """How a shot with `cut=False` continues the previous one (method.md, 'The loop')."""

    NONE = "none"  # memory only, no frame conditioning
    MI2V = "mi2v"  # condition on the last frame, drop the first generated frame
    MM2V = "mm2v"  # condition on the last 5 frames, drop the first 5


class MemoryMask(str, Enum):
    """Mask value of the memory frames in the M2V condition (method.md, 'Mask')."""

    ONES = "ones"  # every memory frame 1: what the authors' released inference does
    SINK_WINDOW = "sink_window"  # the first `fix` frames 1, later (window) frames 2: an untested reference option


class SigmaSchedule(str, Enum):
    """Where the sampler's noise levels come from, before the shift."""

    WAN = "wan"  # Wan's own UniPC solver: linspace(0.999, 0, n + 1)[:-1]
    DIFFUSERS = "diffusers"  # diffusers' use_flow_sigmas grid: linspace(1, 1/1000, n + 1)[:-1]


def _four_n_plus_one(v: int) -> int:
    if (v - 1) % 4:
        raise ValueError(f"must be 4n+1 (5, 9, ..., 81, ...) so the VAE's 4x temporal compression fits; got {v}")
    return v


class GenerationSettings(BaseModel):
    """Per-story generation settings; defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(832, ge=32, le=2048, multiple_of=16, description="Frame width in pixels (multiple of 16).")
    height: int = Field(480, ge=32, le=2048, multiple_of=16, description="Frame height in pixels (multiple of 16).")
    num_frames: Annotated[int, AfterValidator(_four_n_plus_one)] = Field(
        81, ge=5, le=257, description="Frames per shot, 4n+1 (81 = 5 s at 16 fps)."
    )
    fps: int = Field(16, ge=1, le=60, description="Frame rate of the shots and of the stitched video.")
    num_inference_steps: int = Field(40, ge=1, le=200, description="Sampler steps per shot.")
    guidance_scale: float = Field(
        3.5, ge=0.0, le=30.0, description="Classifier-free guidance scale (the high-noise expert's, with two experts)."
    )
    guidance_scale_2: float | None = Field(
        None, ge=0.0, le=30.0, description="Guidance scale of the low-noise expert. None: same as guidance_scale."
    )
    memory_guidance_scale: float = Field(
        1.0,
        ge=1.0,
        le=10.0,
        description="Guidance on memory: > 1 adds a pass without memory per step and pushes the shot away "
        "from it (stronger identity, ~50% more compute). 1: off (the released LoRA's setting).",
    )
    shift: float = Field(4.0, gt=0.0, le=20.0, description="Flow-matching timestep shift of the scheduler.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Base seed; shot k (0-based) uses seed + k.")
    negative_prompt: str | None = Field(
        None, max_length=2000, description="Negative prompt for CFG. None: Wan's default negative prompt."
    )
    transition: TransitionMode = Field(
        TransitionMode.MI2V, description="How shots with cut=false continue the previous shot: none, mi2v or mm2v."
    )
    max_memory_size: int = Field(10, ge=1, le=64, description="Memory bank capacity in keyframes.")
    fix: int = Field(3, ge=0, le=64, description="Memory sink: the first `fix` keyframes are never evicted.")
    keyframe_skip: int = Field(
        0,
        ge=0,
        le=256,
        description="Leading frames of every shot that never become keyframes (a MI2V/MM2V shot's repeated "
        "frames are skipped anyway). 0: the method's rule, the first frame that passes the quality filter. "
        "The embedded profile sets 1: its frame 0 (the causal VAE's single-frame latent) is its least "
        "faithful frame (docs/identity.md).",
    )
    memory_mask: MemoryMask = Field(
        MemoryMask.ONES,
        description="Mask value of memory frames: 'ones' (every memory frame 1, the authors' released inference) "
        "or 'sink_window' (frames after the first `fix` get 2, an option of the reference code its driver never uses).",
    )
    sigma_schedule: SigmaSchedule = Field(
        SigmaSchedule.WAN,
        description="Noise levels before the shift: 'wan' (Wan's solver, linspace(0.999, 0, n+1)[:-1]) or "
        "'diffusers' (diffusers' flow grid, linspace(1, 1/1000, n+1)[:-1]). At 40 steps, shift 4, 28 of the 40 "
        "integer timesteps differ by up to 4.",
    )
    t2v_shift: float = Field(
        12.0,
        gt=0.0,
        le=20.0,
        description="Timestep shift of shot 1 when a text-to-video model makes it (Wan2.2-T2V-A14B: 12).",
    )
    t2v_guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=30.0,
        description="Guidance scale of the text-to-video model (both experts). None: guidance_scale / guidance_scale_2, "
        "as the authors' driver passes its one value (3.5) to T2V and M2V alike.",
    )
    size_from_reference: bool | None = Field(
        None,
        description="With reference images: the shots take the first reference's aspect ratio at the area "
        "width x height (each side rounded to a multiple of 16). None: true unless the story sets width or height.",
    )
    use_memory: bool = Field(
        True,
        description="False: shots 2..N are generated without memory (the ablation 'memory removed' that "
        "bench/proof.py measures): an M2V shot becomes text-to-video, an MI2V/MM2V transition keeps its motion "
        "frames but no memory. Shot 1 (text, or the reference images) is unchanged, and the bank is still "
        "updated and stored, so a run shows what memory would have held; each shot's memory_used is empty.",
    )

    @model_validator(mode="after")
    def _check_fields_together(self) -> "GenerationSettings":
        if self.fix > self.max_memory_size:
            raise _error_at(("fix",), f"must be at most max_memory_size ({self.max_memory_size}); got {self.fix}")
        if self.keyframe_skip >= self.num_frames:
            raise _error_at(
                ("keyframe_skip",),
                f"must be below num_frames ({self.num_frames}) so that a frame is left; got {self.keyframe_skip}",
            )
        if self.size_from_reference is None:
            # Derived, not set: stored in __dict__ so exclude_unset dumps (requests, digests) leave it out
            # and a re-validation derives it again from the fields that were set.
            self.__dict__["size_from_reference"] = not ({"width", "height"} & self.model_fields_set)
        return self

    def fit_reference(self, reference_height: int, reference_width: int) -> "GenerationSettings":
        """A copy sized to the first reference image when `size_from_reference` (else self).

        Area width x height, aspect ratio of the reference, each side rounded to a multiple of 16 and
        kept within the width/height limits: 832x480 becomes 480x832 for a portrait reference."""
        if not self.size_from_reference or reference_height <= 0 or reference_width <= 0:
            return self
        area, aspect = self.width * self.height, reference_height / reference_width
        limits = type(self).model_fields["width"].metadata
        lo = next(m.ge for m in limits if hasattr(m, "ge"))
        hi = next(m.le for m in limits if hasattr(m, "le"))

        def snap(x: float) -> int:
            return int(min(hi, max(lo, round(x / 16) * 16)))

        height, width = snap((area * aspect) ** 0.5), snap((area / aspect) ** 0.5)
        return self.model_copy(update={"height": height, "width": width})

    @staticmethod
    def default_negative_prompt() -> str:
        return WAN_DEFAULT_NEGATIVE_PROMPT

    @property
    def effective_negative_prompt(self) -> str:
        return WAN_DEFAULT_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt

    @property
    def effective_guidance_scale_2(self) -> float:
        return self.guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2

    @property
    def effective_t2v_guidance_scales(self) -> tuple[float, float]:
        """(high-noise, low-noise) guidance of the text-to-video model."""
        if self.t2v_guidance_scale is not None:
            return self.t2v_guidance_scale, self.t2v_guidance_scale
        return self.guidance_scale, self.effective_guidance_scale_2

    def resolve(self, defaults: dict) -> "GenerationSettings":
        """A copy where every field the user did not set takes `defaults[field]` when present.

        Lets a model profile (the embedded tiny model: small size, few frames and steps) supply its
        own defaults without overriding what a story asked for explicitly.
        """
        unknown = sorted(set(defaults) - set(type(self).model_fields))
        if unknown:
            raise ValueError(f"defaults: unknown settings field(s) {', '.join(unknown)}")
        values = self.model_dump()
        values.update({k: v for k, v in defaults.items() if k not in self.model_fields_set})
        try:
            return type(self).model_validate(values)
        except ValidationError as exc:
            raise ScriptError.from_validation_error(exc, prefix="settings") from None


def check_transition_supported(settings: GenerationSettings, supported) -> None:
    """Refuse a story whose transition no loaded LoRA set serves (model.lora_release loads the MI2V
    and/or MM2V set; each serves its own continuation and "none"). `supported`: TransitionMode
    values or members, from the model profile. Raises ScriptError on `settings.transition`."""
    have = {TransitionMode(getattr(t, "value", t)) for t in supported}
    if settings.transition in have:
        return
    need = {TransitionMode.MI2V: "Wan2.2-MI2V-A14B", TransitionMode.MM2V: "Wan2.2-MM2V-A14B"}.get(settings.transition)
    loaded = ", ".join(sorted(t.value for t in have)) or "no transition"
    hint = f"; load the {need} set (model.lora_release)" if need else ""
    raise ScriptError([(
        "settings.transition",
        f"{settings.transition.value!r} is not served by the loaded M2V LoRA sets, which cover {loaded}{hint}",
    )])


# ----------------------------------------------------------------------------------------------
# Reference images


def probe_image(raw: bytes) -> Image.Image:
    """The image opened lazily: format and size from the header, no pixel decoded yet."""
    try:
        img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a {' or '.join(IMAGE_FORMATS)} image ({exc.__class__.__name__})") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large to decode ({exc})") from None
    if img.format not in IMAGE_FORMATS:
        raise ValueError(f"image format {img.format} is not accepted; use {' or '.join(IMAGE_FORMATS)}")
    # Checked from the header, before any pixel is decoded, so a small file cannot expand to gigabytes.
    if max(img.size) > MAX_IMAGE_SIDE:
        raise ValueError(f"image of {img.size[0]}x{img.size[1]} exceeds {MAX_IMAGE_SIDE} pixels a side")
    return img


def _decode_image(raw: bytes) -> Image.Image:
    img = probe_image(raw)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"corrupt {img.format} image ({exc})") from None
    return img


def _b64_bytes(data: str) -> bytes:
    # Accept data URIs ("data:image/png;base64,...") since browsers produce them.
    if data.startswith("data:"):
        data = data.partition(",")[2]
    data = "".join(data.split())
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES + 3:
        raise ValueError(f"image larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None


def _rgb(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


class ImageRef(BaseModel):
    """A reference image (customised story, MR2V): base64 `data`, or a local `path` (CLI only)."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="Base64 PNG or JPEG (a data: URI is accepted), at most 8 MiB decoded.")
    path: str | None = Field(None, description="Local image file; relative paths resolve against the script's folder.")

    @field_validator("data")
    @classmethod
    def _data_is_image(cls, v: str | None) -> str | None:
        if v is not None:  # the header only: pixels are decoded once, where the image is used
            probe_image(_b64_bytes(v))
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        if (self.data is None) == (self.path is None):
            raise ValueError("give exactly one of 'data' (base64 image) or 'path'")
        return self

    def resolved_path(self, base_dir: str | os.PathLike | None = None) -> Path | None:
        if self.path is None:
            return None
        p = Path(self.path).expanduser()
        return p if p.is_absolute() or base_dir is None else Path(base_dir) / p

    def size(self) -> tuple[int, int]:
        """(width, height) from the image header of `data`, without decoding pixels."""
        return probe_image(_b64_bytes(self.data)).size

    def load(self, base_dir: str | os.PathLike | None = None) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB."""
        if self.data is not None:
            try:
                return _rgb(_decode_image(_b64_bytes(self.data)))
            except ValueError as exc:
                raise ValueError(f"data: {exc}") from None
        path = self.resolved_path(base_dir)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"path: cannot read {path} ({exc.strerror or exc})") from None
        try:
            return _rgb(_decode_image(raw))
        except ValueError as exc:
            raise ValueError(f"path: {path}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Shots and scripts


def _non_blank(v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError("must not be empty")
    return v


def _parse_cut(v: Any) -> Any:
    # Hand-written scripts sometimes quote booleans ("True"); anything else must be a real bool, so
    # that a typo such as "flase" is an error rather than pydantic's lax truthiness.
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return v


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_non_blank)]
Cut = Annotated[bool, Strict(), BeforeValidator(_parse_cut)]
OptionalPrompt = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]


class Shot(BaseModel):
    """One shot: a prompt for one clip (81 frames in the paper)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(description="What the shot shows.")
    cut: Cut = Field(True, description="True: a scene cut. False: continue smoothly from the previous shot.")
    scene: int | None = Field(None, ge=0, description="Scene number (ST-Bench scene_num); informational.")
    first_frame_prompt: OptionalPrompt = Field(
        None, description="Prompt of the shot's first frame; used only by keyframe-first baselines."
    )


class _StBenchScene(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scene_num: int = Field(ge=0)
    video_prompts: list[Prompt] = Field(min_length=1)
    first_frame_prompt: list[OptionalPrompt]
    cut: list[Cut]

    @model_validator(mode="after")
    def _equal_lengths(self) -> "_StBenchScene":
        n = (len(self.video_prompts), len(self.first_frame_prompt), len(self.cut))
        if len(set(n)) != 1:
            raise ValueError(
                f"video_prompts, first_frame_prompt and cut must have equal lengths; got {n[0]}, {n[1]}, {n[2]}"
            )
        return self


class _StBenchStory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    story_name: str | None = None
    story_overview: str | None = None
    scenes: list[_StBenchScene] = Field(min_length=1)
    reference_images: list[ImageRef] = []

    @model_validator(mode="after")
    def _shot_count(self) -> "_StBenchStory":
        total = sum(len(s.video_prompts) for s in self.scenes)
        if total > MAX_SHOTS:
            raise _error_at(("scenes",), f"{total} shots in total; at most {MAX_SHOTS}")
        if not self.scenes[0].cut[0]:
            raise _error_at(("scenes", 0, "cut", 0), "the first shot must be a cut")
        return self

    def to_flat(self) -> dict:
        shots = [
            {"prompt": p, "cut": c, "scene": s.scene_num, "first_frame_prompt": f}
            for s in self.scenes
            for p, f, c in zip(s.video_prompts, s.first_frame_prompt, s.cut)
        ]
        flat = {"story_name": self.story_name, "story_overview": self.story_overview, "shots": shots}
        if self.reference_images:
            flat["reference_images"] = self.reference_images
        return flat


class StoryScript(BaseModel):
    """A story: shots in order, optional reference images. Accepts the ST-Bench form too."""

    model_config = ConfigDict(extra="forbid")

    story_name: str | None = Field(None, max_length=200, description="Title of the story.")
    story_overview: str | None = Field(None, max_length=8000, description="Synopsis; informational.")
    shots: list[Shot] = Field(min_length=1, max_length=MAX_SHOTS, description="Shots in story order.")
    reference_images: list[ImageRef] = Field(
        [], max_length=MAX_REFERENCE_IMAGES, description="Character/scene references that seed the memory (MR2V)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_st_bench(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "scenes" not in data:
            return data
        if "shots" in data:
            raise _error_at(("scenes",), "give either 'scenes' (ST-Bench form) or 'shots' (flat form), not both")
        return _StBenchStory.model_validate(data).to_flat()

    @field_validator("shots")
    @classmethod
    def _first_is_cut(cls, shots: list[Shot]) -> list[Shot]:
        if not shots[0].cut:
            raise _error_at((0, "cut"), "the first shot must be a cut")
        return shots

    @property
    def num_shots(self) -> int:
        return len(self.shots)


def reject_paths(script: "StoryScript | StoryRequest") -> "StoryScript | StoryRequest":
    """Raise ScriptError if any reference image names a file: a service must not read server paths."""
    prefix, story = ("script.", script.script) if isinstance(script, StoryRequest) else ("", script)
    errors = [
        (f"{prefix}reference_images.{i}.path", "file paths are not accepted here; send the image as base64 'data'")
        for i, ref in enumerate(story.reference_images)
        if ref.path is not None
    ]
    if errors:
        raise ScriptError(errors)
    return script


# ----------------------------------------------------------------------------------------------
# Requests and loading


class StoryRequest(BaseModel):
    """A script plus its settings: the body of a story submission (HTTP, batch files)."""

    model_config = ConfigDict(extra="forbid")

    script: StoryScript
    settings: GenerationSettings = Field(default_factory=GenerationSettings)

    @model_validator(mode="before")
    @classmethod
    def _bare_script(cls, data: Any) -> Any:
        # A dict without "script" is a bare script (flat or ST-Bench); its optional top-level
        # "settings" key belongs to the request. Neither script form has a "script" field, so the
        # two shapes cannot be confused.
        if isinstance(data, dict) and "script" not in data:
            data = dict(data)
            wrapped = {"script": data}
            if "settings" in data:
                wrapped["settings"] = data.pop("settings")
            return wrapped
        return data


def _read_source(source: str | os.PathLike | dict | bytes) -> tuple[Any, Path | None]:
    """Parsed JSON of the source and the folder of its file (None when not a file)."""
    if isinstance(source, dict):
        return source, None
    text: str | bytes
    folder = None
    if isinstance(source, (bytes, bytearray)):
        text = bytes(source)
    elif isinstance(source, str) and source.lstrip().startswith(("{", "[")):
        text = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ScriptError([("<file>", f"cannot read {path} ({exc.strerror or exc})")]) from None
        folder = path.resolve().parent
    else:
        raise ScriptError([("<source>", f"expected a path, JSON text or a dict, got {type(source).__name__}")])
    try:
        return json.loads(text), folder
    except json.JSONDecodeError as exc:
        raise ScriptError([("<json>", f"line {exc.lineno} column {exc.colno}: {exc.msg}")]) from None
    except UnicodeDecodeError as exc:
        raise ScriptError([("<json>", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None


def load_request(
    source: str | os.PathLike | dict | bytes,
    base_dir: str | os.PathLike | None = None,
    allow_paths: bool = True,
) -> StoryRequest:
    """Load a request: ``{"script": ..., "settings"?: ...}``, or a bare script with optional ``"settings"``.

    `source` is a JSON file path, JSON text/bytes, or a parsed dict. Error fields are relative to
    what the caller wrote: ``script.shots.0.prompt`` in the wrapped form, ``shots.0.prompt`` in the
    bare one. Reference images given by path resolve against `base_dir` (default: the file's folder)
    and must be readable images; with `allow_paths=False` (services) they are rejected unread.
    """
    data, folder = _read_source(source)
    if not isinstance(data, dict):
        raise ScriptError([("<json>", f"the top level must be a JSON object, got {type(data).__name__}")])
    bare = "script" not in data
    try:
        request = StoryRequest.model_validate(data)
    except ValidationError as exc:
        err = ScriptError.from_validation_error(exc)
        if bare:
            err = ScriptError([(f.removeprefix("script.") if f != "script" else "<root>", p) for f, p in err.errors])
        raise err from None
    if not allow_paths:
        reject_paths(request.script if bare else request)
        return request
    base = base_dir if base_dir is not None else folder
    return _check_paths(request, base, prefix="" if bare else "script.")


def _check_paths(request: StoryRequest, base_dir: str | os.PathLike | None, prefix: str) -> StoryRequest:
    refs, errors = [], []
    for i, ref in enumerate(request.script.reference_images):
        if ref.path is not None:
            ref = ImageRef(path=str(ref.resolved_path(base_dir)))
            try:
                ref.load()
            except ValueError as exc:
                errors.append((f"{prefix}reference_images.{i}.path", str(exc).removeprefix("path: ")))
        refs.append(ref)
    if errors:
        raise ScriptError(errors)
    script = request.script.model_copy(update={"reference_images": refs})
    return request.model_copy(update={"script": script})


def load_script(source: str | os.PathLike | dict | bytes, base_dir: str | os.PathLike | None = None) -> StoryScript:
    """Load and validate a story script (flat or ST-Bench form); raises ScriptError.

    A file may also carry a ``"settings"`` object (see `load_request`); it is validated and dropped.
    """
    return load_request(source, base_dir=base_dir).script
