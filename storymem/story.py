"""The shot loop of one story, shared by the CLI (one process) and the Ray director.

`StoryRunner` makes shots in order: memory -> generate -> score -> update memory -> commit. Every
collaborator is an interface, so the same loop runs with a local pipeline and scorer or with Ray
actor handles behind them. The manifest is the commit point: a shot's objects are written first,
then the manifest names the shot; a restarted runner continues after the last named shot and
never remakes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from .config import MemoryConfig
from .memory import MemoryBank
from .progress import EventSink, Phase, ProgressEvent
from .script import WAN_NEGATIVE_PROMPT_EN, GenerationSettings, StoryScript, TransitionMode
from .service.contract import StoryState
from .stitch import encode_video, overlap_frames, read_video, stitch_videos
from .storage import ArtifactStore, PreconditionFailed, StorageUnavailable, StoryLayout

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2
# What settings absent from a version-1 manifest meant then, so that resuming such a story keeps
# making its shots as it began them (version 2 made the authors' inference the default).
_V1_SETTINGS = {"memory_mask": "sink_window", "sigma_schedule": "diffusers", "size_from_reference": False}


class StoryCancelled(Exception):
    """Raised inside a shot (between denoising steps) when the story was cancelled."""


class StoryFenced(Exception):
    """Another run of the story claimed its manifest (a conditional write found it changed): this
    runner is stale and must stop without writing anything more."""


class StoryInterrupted(Exception):
    """A collaborator of the runner was lost (e.g. a memory actor restarted) before the shot in
    flight was committed. `run` leaves the manifest as it is and re-raises, so that the caller can
    run the story again from its last committed shot."""


# ------------------------------------------------------------------------------------ shots


@dataclass
class ShotRequest:
    """Everything a generator needs for one shot; plain data (the settings a pydantic object), so it
    pickles across process boundaries."""

    story: str
    index: int
    prompt: str
    mode: str
    seed: int
    settings: GenerationSettings
    memory: list[np.ndarray] = field(default_factory=list)
    motion_frames: np.ndarray | None = None
    fix: int = 3

    @property
    def transition(self) -> str:
        """The story's TransitionMode value: it picks the shot's LoRA set (StoryMemPipeline.activate_lora)."""
        return TransitionMode(self.settings.transition).value

    def pipeline_kwargs(self) -> dict:
        """StoryMemPipeline keyword arguments of this shot."""
        s = self.settings
        if not isinstance(s, GenerationSettings):
            raise TypeError(f"settings: expected GenerationSettings, got {type(s).__name__}")
        return dict(
            prompt=self.prompt,
            negative_prompt=s.negative_prompt,
            memory=self.memory,
            motion_frames=self.motion_frames,
            mode=self.mode,
            fix=self.fix,
            memory_mask=s.memory_mask,
            height=s.height,
            width=s.width,
            num_frames=s.num_frames,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            guidance_scale_2=s.guidance_scale_2,
            memory_guidance_scale=s.memory_guidance_scale,
            shift=s.shift,
            sigma_schedule=s.sigma_schedule,
            t2v_shift=s.t2v_shift,
            t2v_guidance_scale=s.t2v_guidance_scale,
            seed=self.seed,
        )


@dataclass
class ShotResult:
    """frames: (F, H, W, 3) uint8. ref: an opaque handle to the same frames (a Ray ObjectRef
    wrapper) that the runner hands to the scorer and the memory bank instead of the array, so that
    remote collaborators fetch them from the object store rather than receiving a copy."""

    frames: np.ndarray
    mode: str
    timings: dict = field(default_factory=dict)
    generator: str | None = None
    attempts: int = 1
    ref: object | None = None
    queue_s: float = 0.0  # waiting for a free generator (pooled generators)
    generator_s: float | None = None  # the generator's own wall time for the successful attempt
    model: str = ""  # which transformers made it: "t2v" or "m2v"
    notes: list[str] = field(default_factory=list)  # facts a reader should know (e.g. no T2V model)


StepCallback = Callable[[int, int], None]


class ShotGenerator(Protocol):
    def generate(self, request: ShotRequest, step_callback: StepCallback | None = None) -> ShotResult: ...


class FrameScorer(Protocol):
    def score_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class PipelineGenerator:
    """A ShotGenerator over a StoryMemPipeline in this process."""

    def __init__(self, pipe, name: str = "local"):
        self.pipe = pipe
        self.name = name

    def generate(self, request: ShotRequest, step_callback: StepCallback | None = None) -> ShotResult:
        self.pipe.activate_lora(request.transition)
        out = self.pipe(**request.pipeline_kwargs(), step_callback=step_callback)
        return ShotResult(
            frames=out.frames,
            mode=out.mode,
            timings=out.timings,
            generator=self.name,
            model=out.model,
            notes=list(out.notes),
        )


# ------------------------------------------------------------------------------------ manifest


class ShotRecord(BaseModel):
    index: int
    prompt: str
    cut: bool
    mode: str
    seed: int
    frames: int
    drop: int = Field(description="Leading frames dropped when stitching (overlap with the previous shot).")
    video: str
    keyframes: list[dict] = Field(
        description="Frames of this shot taken into memory: {frame, key, aesthetic, similarity_prev}. Chosen among "
        "the frames the final video keeps (after the `drop` overlap frames); `frame` counts from the start of the "
        "stored shot video (the scores are absent in manifests written before they existed; see keyframe_scores)."
    )
    memory_used: list[dict] = Field(
        description="The memory this shot was conditioned on (the bank before it, MemoryBank.describe(): "
        "{shot, frame, source, slot: sink|window, height, width})."
    )
    memory_after: str = Field(description="Key of the bank description after this shot.")
    memory_state: str = Field(description="Key of the lossless bank after this shot.")
    timings: dict = Field(default_factory=dict)
    generator: str | None = None
    attempts: int = 1
    wall_s: float | None = Field(None, description="Wall seconds from the shot's start to its commit.")
    queue_s: float | None = Field(None, description="Seconds spent waiting for a free generator.")
    generator_s: float | None = Field(None, description="The generator's own seconds (successful attempt).")
    model: str | None = Field(None, description="Which transformers made the shot: 't2v' or 'm2v'.")
    notes: list[str] = Field(
        default_factory=list,
        description="What a reader should know about how the shot was made, e.g. that no text-to-video model "
        "was configured and shot 1 came from the M2V model with empty memory.",
    )


class Manifest(BaseModel):
    """The commit record of a story. Readers trust only what it names."""

    version: int = MANIFEST_VERSION
    story_id: str
    story_name: str | None = None
    script_sha256: str
    state: StoryState = StoryState.RUNNING
    shots_total: int
    settings: dict
    model: str = ""
    owner: str | None = Field(None, description="The tenant the story belongs to.")
    idempotency_key: str | None = Field(None, description="The submission's Idempotency-Key, when it had one.")
    request_sha256: str | None = Field(None, description="Digest of the submitted body (Idempotency-Key checks).")
    run: int = Field(0, description="The story's run that last wrote this manifest.")
    attempt: str | None = Field(None, description="Id of the director run that owns the story (the fence).")
    shots: list[ShotRecord] = Field(default_factory=list)
    final: str | None = None
    final_frames: int | None = None
    stitch: dict | None = Field(
        None,
        description="How the final video was made: {method: 'remux' (the shots' H.264 packets copied, no "
        "re-encoding) or 'reencode', reason: why remuxing was not possible (null after a remux), seconds}.",
    )
    error: str | None = None
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)

    @property
    def shots_done(self) -> int:
        return len(self.shots)


def script_digest(script: StoryScript) -> str:
    return hashlib.sha256(script.model_dump_json().encode()).hexdigest()


def read_manifest(store: ArtifactStore, layout: StoryLayout) -> Manifest | None:
    try:
        return Manifest.model_validate_json(store.get_bytes(layout.manifest))
    except KeyError:
        return None


def read_manifest_versioned(store: ArtifactStore, layout: StoryLayout) -> tuple[Manifest | None, str | None]:
    """The manifest and its ETag (None for stores without conditional writes)."""
    getter = getattr(store, "get_versioned", None)
    if getter is None:
        return read_manifest(store, layout), None
    try:
        data, etag = getter(layout.manifest)
    except KeyError:
        return None, None
    return Manifest.model_validate_json(data), etag


def write_manifest(store: ArtifactStore, layout: StoryLayout, manifest: Manifest, match: str | None) -> str | None:
    """Commit the manifest, fenced: only over the version `match` (None: only when there is none)
    on stores with conditional writes; the new ETag. PreconditionFailed when another writer won."""
    data = manifest.model_dump_json(indent=2).encode()
    put_if = getattr(store, "put_if", None)
    if put_if is None:
        store.put_bytes(layout.manifest, data, "application/json")
        return None
    return put_if(layout.manifest, data, "application/json", match)


# Modes by their `storymem.m2v.ShotMode` values: this module is imported by every Ray director and
# by the engine, which must not pay for importing torch and diffusers (seconds and ~1 GB each).
_MOTION_FRAMES = {"mi2v": 1, "mm2v": 5}


def shot_mode(index: int, cut: bool, transition: TransitionMode, has_references: bool) -> str:
    """The ShotMode value of shot `index`: t2v/mr2v first, mi2v/mm2v continuing, m2v after a cut."""
    if index == 0:
        return "mr2v" if has_references else "t2v"
    if not cut and transition == TransitionMode.MI2V:
        return "mi2v"
    if not cut and transition == TransitionMode.MM2V:
        return "mm2v"
    return "m2v"


def keyframe_scores(embeddings, quality, selected: list[int]) -> list[dict]:
    """Why each selected frame was kept, for readers of the manifest and the storyboard:
    `aesthetic` (the scorer's quality score) and `similarity_prev`, the CLIP cosine similarity to the
    previous keyframe of the same shot (None for the first), the criterion of the selection chain."""
    emb = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb / np.where(norms == 0, 1.0, norms)
    q = None if quality is None else np.asarray(quality, dtype=np.float64).reshape(-1)
    out = []
    for j, i in enumerate(selected):
        sim = None if j == 0 else round(float(emb[i] @ emb[selected[j - 1]]), 4)
        aesthetic = None if q is None or i >= q.size else round(float(q[i]), 4)
        out.append({"aesthetic": aesthetic, "similarity_prev": sim})
    return out


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ runner


class StoryRunner:
    """Runs (or resumes) one story.

    store/layout: where objects go. generator/scorer: the ShotGenerator and FrameScorer.
    settings: already resolved against the model profile (the manifest keeps them, and a resumed
    story uses the manifest's copy). on_event: progress sink. is_cancelled: polled between steps.
    """

    def __init__(
        self,
        store: ArtifactStore,
        layout: StoryLayout,
        script: StoryScript,
        settings: GenerationSettings,
        generator: ShotGenerator,
        scorer: FrameScorer,
        memory_cfg: MemoryConfig | None = None,
        on_event: EventSink | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        model_name: str = "",
        reference_base_dir=None,
        owner: str | None = None,
        attempt_id: str | None = None,
    ):
        import uuid

        self.attempt_id = attempt_id or uuid.uuid4().hex
        self._etag: str | None = None
        self.store = store
        self.layout = layout
        self.script = script
        self.settings = settings
        self.generator = generator
        self.scorer = scorer
        self.memory_cfg = memory_cfg or MemoryConfig()
        self.on_event = on_event
        self.is_cancelled = is_cancelled or (lambda: False)
        self.model_name = model_name
        self.reference_base_dir = reference_base_dir
        self.owner = owner

    # -- events
    def emit(self, phase: Phase, shot: int | None = None, step: int | None = None, message: str | None = None):
        if self.on_event is None:
            return
        self.on_event(
            ProgressEvent(
                story=self.layout.story_id,
                shot=shot,
                shots_total=self.script.num_shots,
                step=step,
                steps_total=self.settings.num_inference_steps,
                phase=phase,
                message=message,
            )
        )

    def _check_cancel(self):
        if self.is_cancelled():
            raise StoryCancelled("cancelled by request")

    # -- state
    def open(self) -> Manifest:
        """The story's manifest: the stored one (after checking it is this story) or a new one."""
        digest = script_digest(self.script)
        manifest, self._etag = read_manifest_versioned(self.store, self.layout)
        if manifest is not None:
            if manifest.script_sha256 != digest:
                raise ValueError(
                    f"{self.layout.manifest} belongs to a different script; use another story id or output folder"
                )
            if manifest.version < 2:
                legacy = {**_V1_SETTINGS, "t2v_shift": manifest.settings.get("shift", 4.0)}
                if manifest.settings.get("negative_prompt") is None:
                    legacy["negative_prompt"] = WAN_NEGATIVE_PROMPT_EN
                missing = {k: v for k, v in legacy.items() if manifest.settings.get(k) is None}
                manifest.settings = {**manifest.settings, **missing}
                manifest.version = MANIFEST_VERSION
            self.settings = GenerationSettings.model_validate(manifest.settings)
            return manifest
        if self.script.reference_images:
            # Customised story: the shots take the first reference's aspect ratio (unless the story set a size).
            first = self.script.reference_images[0].load(self.reference_base_dir)
            self.settings = self.settings.fit_reference(*first.shape[:2])
        self.store.put_bytes(self.layout.script, self.script.model_dump_json(indent=2).encode(), "application/json")
        self.store.put_bytes(self.layout.settings, self.settings.model_dump_json(indent=2).encode(), "application/json")
        manifest = Manifest(
            story_id=self.layout.story_id,
            story_name=self.script.story_name,
            script_sha256=digest,
            shots_total=self.script.num_shots,
            settings=self.settings.model_dump(mode="json"),
            model=self.model_name,
            owner=self.owner,
        )
        self._save(manifest)
        return manifest

    def _save(self, manifest: Manifest) -> None:
        """Commit the manifest over the version this runner last read or wrote: a runner whose
        story another run has claimed since gets StoryFenced and writes nothing more."""
        manifest.updated = time.time()
        manifest.attempt = self.attempt_id
        try:
            self._etag = write_manifest(self.store, self.layout, manifest, self._etag)
        except PreconditionFailed as e:
            raise StoryFenced(f"{self.layout.story_id}: another run owns the story ({e})") from None

    def _check_fence(self) -> None:
        """Before writing a shot's objects: stop if another run has claimed the story since (the
        commit is fenced anyway; this keeps a stale run from overwriting committed objects)."""
        if self._etag is None or getattr(self.store, "get_versioned", None) is None:
            return
        _, etag = read_manifest_versioned(self.store, self.layout)
        if etag != self._etag:
            raise StoryFenced(f"{self.layout.story_id}: another run owns the story")

    def _initial_bank(self) -> MemoryBank:
        bank = MemoryBank(max_size=self.settings.max_memory_size, fix=self.settings.fix)
        if self.script.reference_images:
            images = [ref.load(self.reference_base_dir) for ref in self.script.reference_images]
            embeddings, _ = _score_each(self.scorer, images)
            bank.add_references(images, embeddings)
        return bank

    def _bank_after(self, manifest: Manifest) -> MemoryBank:
        if not manifest.shots:
            return self._initial_bank()
        return MemoryBank.from_bytes(self.store.get_bytes(manifest.shots[-1].memory_state))

    # -- the loop
    def run(self) -> Manifest:
        """Make every unfinished shot, then stitch. Returns the manifest (state done or cancelled);
        on any other error the manifest is marked failed with the reason and the error re-raised."""
        manifest = self.open()
        if manifest.state == StoryState.DONE and manifest.final is not None:
            return manifest
        manifest.state, manifest.error = StoryState.RUNNING, None
        self._save(manifest)
        self.emit(Phase.START, shot=manifest.shots_done)
        try:
            bank = self._bank_after(manifest)
            for k in range(manifest.shots_done, self.script.num_shots):
                self._check_cancel()
                self.make_shot(k, bank, manifest)
            self._check_cancel()
            self.stitch(manifest)
        except (StoryInterrupted, StoryFenced):
            raise
        except StoryCancelled as e:
            manifest.state, manifest.error = StoryState.CANCELLED, str(e)
            self._save_quietly(manifest)
            self.emit(Phase.CANCELLED, message=str(e))
            return manifest
        except Exception as e:
            manifest.state, manifest.error = StoryState.FAILED, f"{type(e).__name__}: {e}"
            # Storage that just failed every retry would make the report wait another full round.
            if not isinstance(e, StorageUnavailable):
                self._save_quietly(manifest)
            self.emit(Phase.FAILED, message=manifest.error)
            raise
        manifest.state = StoryState.DONE
        self._save(manifest)
        self.emit(Phase.DONE, shot=self.script.num_shots - 1)
        return manifest

    def _save_quietly(self, manifest: Manifest) -> None:
        try:
            self._save(manifest)
        except Exception:  # storage may be the thing that failed; the caller reports the reason
            log.warning("could not record state %s of %s", manifest.state, manifest.story_id, exc_info=True)

    def request_for(self, k: int, bank: MemoryBank) -> ShotRequest:
        shot = self.script.shots[k]
        s = self.settings
        mode = shot_mode(k, shot.cut, s.transition, bool(self.script.reference_images))
        remembers = k == 0 or s.use_memory  # shot 1's memory is its reference images, kept either way
        if not remembers and mode == "m2v":
            mode = "t2v"  # what the pipeline does when called with no memory
        n_motion = _MOTION_FRAMES.get(mode, 0)
        motion = bank.tail if n_motion else None
        if n_motion and (motion is None or len(motion) < n_motion):
            raise RuntimeError(f"shot {k}: {mode} needs the previous shot's last frames, which memory lacks")
        return ShotRequest(
            story=self.layout.story_id,
            index=k,
            prompt=shot.prompt,
            mode=mode,
            seed=s.seed + k,
            settings=s,
            memory=bank.images() if remembers and mode != "t2v" else [],
            motion_frames=None if motion is None else motion[-n_motion:],
            fix=s.fix,
        )

    def make_shot(self, k: int, bank: MemoryBank, manifest: Manifest) -> ShotRecord:
        t_shot = time.perf_counter()
        shot = self.script.shots[k]
        request = self.request_for(k, bank)
        memory_used = bank.describe() if request.memory else []
        self.emit(Phase.ENCODE, shot=k, step=0)

        steps_total = self.settings.num_inference_steps

        def on_step(step: int, total: int) -> None:
            self.emit(Phase.DENOISE if step < total else Phase.DECODE, shot=k, step=step)
            self._check_cancel()

        result = self.generator.generate(request, on_step)
        frames = np.asarray(result.frames)
        expected = (self.settings.num_frames, self.settings.height, self.settings.width, 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            raise RuntimeError(f"shot {k}: generator returned {frames.shape} {frames.dtype}, expected {expected} uint8")

        # Remote collaborators take the handle (frames stay in the object store); local ones the array.
        data = frames if result.ref is None else result.ref
        self.emit(Phase.SCORE, shot=k, step=steps_total)
        t0 = time.perf_counter()
        embeddings, quality = self.scorer.score_frames(data)
        nxt = self.script.shots[k + 1] if k + 1 < self.script.num_shots else None
        tail = 0
        if nxt is not None and not nxt.cut:
            tail = overlap_frames(False, self.settings.transition)
        # Keyframes come from the frames the final video keeps: the overlap frames repeat the previous shot.
        drop = 0 if k == 0 else overlap_frames(shot.cut, self.settings.transition)
        skip = max(drop, self.settings.keyframe_skip)
        selected = bank.update(k, data, embeddings, quality, self.memory_cfg, tail_frames=tail, skip=skip)
        score_s = time.perf_counter() - t0

        self.emit(Phase.COMMIT, shot=k, step=steps_total)
        t0 = time.perf_counter()
        self._check_fence()
        L = self.layout
        # An IDR frame where the stitched part of the shot begins lets stitching copy packets.
        video = encode_video(frames, fps=self.settings.fps, keyframes=[drop] if drop else None)
        self.store.put_bytes(L.shot(k), video, "video/mp4")
        keyframes = []
        for j, (i, scores) in enumerate(zip(selected, keyframe_scores(embeddings, quality, selected))):
            self.store.put_bytes(L.keyframe(k, j), _jpeg(frames[i]), "image/jpeg")
            keyframes.append({"frame": int(i), "key": L.keyframe(k, j), **scores})
        description = {
            "shot": k,
            "selected": [int(i) for i in selected],
            "keyframes": keyframes,
            "conditioned_on": memory_used,
            "bank": bank.describe(),
        }
        self.store.put_bytes(L.memory(k), json.dumps(description, indent=2).encode(), "application/json")
        self.store.put_bytes(L.memory_state(k), bank.to_bytes(), "application/octet-stream")
        record = ShotRecord(
            index=k,
            prompt=shot.prompt,
            cut=shot.cut,
            mode=result.mode,
            seed=request.seed,
            frames=int(frames.shape[0]),
            drop=drop,
            video=L.shot(k),
            keyframes=keyframes,
            memory_used=memory_used,
            memory_after=L.memory(k),
            memory_state=L.memory_state(k),
            timings={**result.timings, "score": score_s, "write": time.perf_counter() - t0},
            generator=result.generator,
            attempts=result.attempts,
            wall_s=time.perf_counter() - t_shot,
            queue_s=result.queue_s,
            generator_s=result.generator_s,
            model=result.model or None,
            notes=list(result.notes),
        )
        for note in record.notes:
            log.warning("story %s shot %d: %s", self.layout.story_id, k, note)
        manifest.shots.append(record)
        self._save(manifest)  # the commit point
        return record

    def stitch(self, manifest: Manifest) -> None:
        self.emit(Phase.STITCH, shot=self.script.num_shots - 1)
        manifest.final, manifest.final_frames, manifest.stitch = stitch_story(self.store, self.layout, manifest)


def stitch_story(store: ArtifactStore, layout: StoryLayout, manifest: Manifest) -> tuple[str, int, dict]:
    """Assemble the final video from the shots the manifest names (never from unnamed objects),
    store it and return (key, frames, how: Manifest.stitch). The shots' packets are remuxed when
    they allow it, else re-encoded (storymem.stitch.stitch_videos). Used by the runner and by the
    Ray stitcher."""
    if len(manifest.shots) != manifest.shots_total:
        raise ValueError(f"manifest: {manifest.shots_done} of {manifest.shots_total} shots committed; nothing to stitch yet")
    videos = [store.get_bytes(r.video) for r in manifest.shots]
    drops = [r.drop for r in manifest.shots]
    fps = GenerationSettings.model_validate(manifest.settings).fps
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "final.mp4"
        report = stitch_videos(videos, drops, out, fps=fps)
        store.put_file(layout.final, out, "video/mp4")
    if report.method == "reencode":
        log.info("story %s: final video re-encoded (%s)", layout.story_id, report.reason)
    return layout.final, report.frames, report.as_dict()


def _score_each(scorer: FrameScorer, images: list[np.ndarray]):
    """Reference images may differ in size: score them one at a time."""
    embs, quals = zip(*(scorer.score_frames(img[None]) for img in images))
    return np.concatenate(embs), np.concatenate(quals)


def read_final(store: ArtifactStore, layout: StoryLayout) -> np.ndarray:
    return read_video(store.get_bytes(layout.final))
