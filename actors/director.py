"""The story director: one actor per running story, driving `StoryRunner` with actor-backed parts.

Shots of a story are made in order; stories run side by side, each in its own director. For every
shot the director leases a generator from the pool and streams the shot from it (step progress
comes back as it happens), sends the frames' object to the scorers and to the memory actor, writes
the shot's objects and commits the manifest, then hands the committed shots to the stitcher.
Progress events and commits are published to the engine.

A generator that dies mid-shot is replaced and the shot retried on another one, up to
`max_shot_attempts`; seeds are per shot, so the retried shot is the same. If the director itself
dies, the engine starts a new one, which resumes after the manifest's last committed shot.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import zlib

import numpy as np
import ray

from storymem.config import StoryMemConfig
from storymem.progress import Phase, ProgressEvent
from storymem.script import GenerationSettings, StoryScript
from storymem.storage import S3Store, StoryLayout
from storymem.story import (
    Manifest,
    ShotRecord,
    ShotRequest,
    ShotResult,
    StoryCancelled,
    StoryInterrupted,
    StoryRunner,
    _score_each,
)

from ._common import ACTOR_LOST, FramesRef, get
from .memory_bank import BankProxy
from .scorer import PooledScorer

log = logging.getLogger(__name__)

MAX_INTERRUPTIONS = 3  # reruns after losing the memory actor, per director
_POLL_S = 0.25


class PooledGenerator:
    """A ShotGenerator over the generator pool: lease, stream the shot, release; retry on death."""

    def __init__(self, pool, story: str, max_attempts: int, is_cancelled, tenant: str | None = None,
                 step_timeout_s: float = 900.0):  # fmt: skip
        self.pool = pool
        self.story = story
        self.tenant = tenant
        self.max_attempts = max_attempts
        self.is_cancelled = is_cancelled
        self.step_timeout_s = step_timeout_s
        self._lock = threading.Lock()
        self._current: tuple[object, str] | None = None  # (generator handle, token)
        self._progress = time.monotonic()  # the last step (or the start) of the shot in flight
        threading.Thread(target=self._watch, name=f"watchdog-{story}", daemon=True).start()

    def _watch(self) -> None:
        """Kill a generator that reports no step for step_timeout_s; the shot is retried elsewhere."""
        while True:
            time.sleep(min(1.0, self.step_timeout_s / 4))
            with self._lock:
                current, since = self._current, self._progress
            if current is not None and time.monotonic() - since > self.step_timeout_s:
                log.warning("story %s: generator silent for %.0f s; killing it", self.story, time.monotonic() - since)
                with self._lock:
                    self._progress = time.monotonic()
                try:
                    ray.kill(current[0], no_restart=True)
                except Exception:  # already gone
                    pass

    def cancel(self) -> None:
        """Stop the shot in flight at its next denoising step."""
        with self._lock:
            current = self._current
        if current is not None:
            current[0].cancel.remote(token=current[1])

    def _acquire(self, index: int) -> dict:
        ref = self.pool.acquire.remote(self.story, index, self.tenant)
        while True:
            ready, _ = ray.wait([ref], timeout=_POLL_S)
            if ready:
                try:
                    lease = get(ref)
                except ACTOR_LOST as e:  # the pool is being restarted: run again from the manifest
                    raise StoryInterrupted(f"generator pool lost: {type(e).__name__}") from e
                if lease is None:  # withdrawn: only a cancel or the engine does that
                    raise StoryCancelled("cancelled by request")
                return lease
            if self.is_cancelled():
                self.pool.release_story.remote(self.story)  # withdraws the waiting request
                raise StoryCancelled("cancelled by request")

    def generate(self, request: ShotRequest, step_callback=None) -> ShotResult:
        request_ref = ray.put(request)  # once: every attempt reads the same object
        queue_s = 0.0
        last: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            if self.is_cancelled():  # e.g. the generator was killed past the cancel deadline
                raise StoryCancelled("cancelled by request")
            t0 = time.perf_counter()
            lease = self._acquire(request.index)
            queue_s += time.perf_counter() - t0
            token = uuid.uuid4().hex
            with self._lock:
                self._current = (lease["handle"], token)
                self._progress = time.monotonic()
            failed = False
            try:
                result = self._stream(lease["handle"], request_ref, token, step_callback)
            except ACTOR_LOST as e:
                failed, last = True, e
                log.warning("story %s shot %d: generator %s lost (%s); attempt %d of %d",
                            self.story, request.index, lease["name"], type(e).__name__, attempt, self.max_attempts)  # fmt: skip
                continue
            finally:
                with self._lock:
                    self._current = None
                self.pool.release.remote(lease["slot"], lease["generation"], self.story, failed)
            result.attempts, result.queue_s = attempt, queue_s
            return result
        raise RuntimeError(
            f"shot {request.index}: no generator finished it in {self.max_attempts} attempts; last error: {last}"
        )

    def _stream(self, handle, request_ref, token: str, step_callback) -> ShotResult:
        frames = frames_ref = meta = None
        for ref in handle.generate.remote(request_ref, token):
            item = get(ref)
            if isinstance(item, np.ndarray):
                frames, frames_ref = item, ref
            elif "step" in item:
                with self._lock:
                    self._progress = time.monotonic()
                if step_callback is not None:
                    try:
                        step_callback(item["step"], item["total"])
                    except StoryCancelled:
                        handle.cancel.remote(token=token)
                        raise
            else:
                meta = item
        if frames is None or meta is None:
            raise RuntimeError("the generator's stream ended without a shot")
        return ShotResult(
            frames=frames,
            mode=meta["mode"],
            timings=meta["timings"],
            generator=meta["generator"],
            ref=FramesRef(frames_ref, len(frames)),
            generator_s=meta["generator_s"],
            model=meta.get("model", ""),
            notes=list(meta.get("notes", [])),
        )


class ActorStoryRunner(StoryRunner):
    """StoryRunner whose memory lives in the memory actor and whose final video the stitcher makes."""

    def __init__(self, *args, bank: BankProxy, stitcher, on_commit=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bank = bank
        self.stitcher = stitcher
        self.on_commit = on_commit

    def _seed(self) -> BankProxy:
        if self.script.reference_images:
            images = [ref.load(self.reference_base_dir) for ref in self.script.reference_images]
            embeddings, _ = _score_each(self.scorer, images)
            self.bank.add_references(images, embeddings)
        return self.bank

    def _initial_bank(self) -> BankProxy:
        self.bank.open(0, None, self.settings.max_memory_size, self.settings.fix)
        return self._seed()

    def _bank_after(self, manifest: Manifest) -> BankProxy:
        key = manifest.shots[-1].memory_state if manifest.shots else None
        if self.bank.open(manifest.shots_done, key, self.settings.max_memory_size, self.settings.fix):
            return self.bank
        return self._seed()

    def make_shot(self, k: int, bank, manifest: Manifest) -> ShotRecord:
        record = super().make_shot(k, bank, manifest)
        self.bank.committed(k + 1, record.memory_state)
        if self.on_commit is not None:
            self.on_commit(record)
        return record

    def stitch(self, manifest: Manifest) -> None:
        self.emit(Phase.STITCH, shot=self.script.num_shots - 1)
        out = get(self.stitcher.stitch.remote(self.layout.story_id, manifest.model_dump_json()))
        manifest.final, manifest.final_frames, manifest.stitch = out["final"], out["final_frames"], out.get("stitch")


@ray.remote(max_restarts=0, max_concurrency=4)
class StoryDirector:
    """Runs one story. `run` returns {state, error, shots_done, final, final_frames}."""

    def __init__(
        self,
        story_id: str,
        script_json: str,
        settings_json: str,
        cfg: StoryMemConfig,
        engine,
        pool,
        scorers: list,
        bank,
        stitcher,
        attempt: int = 1,
        model_name: str = "",
        owner: str | None = None,
    ):
        self.story_id = story_id
        self.engine = engine
        self.attempt = attempt
        self._sent: dict[str, ray.ObjectRef] = {}  # the last call of each kind to the engine
        self._cancel = threading.Event()
        script = StoryScript.model_validate_json(script_json)
        settings = GenerationSettings.model_validate_json(settings_json)
        self.generator = PooledGenerator(pool, story_id, cfg.engine.max_shot_attempts, self._cancel.is_set,
                                         tenant=owner, step_timeout_s=cfg.engine.step_timeout_s)  # fmt: skip
        start = zlib.crc32(story_id.encode())  # spreads stories over the scorers
        self.bank = BankProxy(bank, story_id)
        self.runner = ActorStoryRunner(
            S3Store(cfg.storage),
            StoryLayout(story_id),
            script,
            settings,
            self.generator,
            PooledScorer(scorers, cfg.scoring.batch_size, start=start),
            memory_cfg=cfg.memory,
            on_event=self._publish,
            is_cancelled=self._cancel.is_set,
            model_name=model_name,
            owner=owner,
            attempt_id=f"{attempt}-{uuid.uuid4().hex[:12]}",  # the fence: a later director's claim stops this one
            bank=self.bank,
            stitcher=stitcher,
            on_commit=self._committed,
        )

    def _publish(self, event: ProgressEvent) -> None:
        self._sent["publish"] = self.engine.publish.remote(self.story_id, event.model_dump(mode="json"), self.attempt)

    def _committed(self, record: ShotRecord) -> None:
        self._sent["commit"] = self.engine.shot_committed.remote(self.story_id, record.index, record.wall_s)

    def _flush(self) -> None:
        """Wait until the engine has taken every event and commit sent so far. Calls from one caller
        run in order and these handlers never wait, so the last of each kind covers the rest; without
        this the engine could see the end of `run` first and kill this actor with messages unsent."""
        refs = list(self._sent.values())
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=10)

    def run(self) -> dict:
        try:
            for _ in range(MAX_INTERRUPTIONS + 1):
                try:
                    manifest = self.runner.run()
                except StoryInterrupted as e:
                    log.warning("story %s interrupted (%s); running again from its manifest", self.story_id, e)
                    time.sleep(1.0)  # let the lost actor come back
                    continue
                except Exception as e:  # the runner recorded the failure in the manifest when it could
                    return {"state": "failed", "error": f"{type(e).__name__}: {e}"}
                return {
                    "state": manifest.state,
                    "error": manifest.error,
                    "shots_done": manifest.shots_done,
                    "final": manifest.final,
                    "final_frames": manifest.final_frames,
                }
            return {"state": "failed", "error": f"interrupted {MAX_INTERRUPTIONS + 1} times (memory actor lost)"}
        finally:
            self.bank.drop()
            self._flush()

    def cancel(self) -> None:
        self._cancel.set()
        self.generator.cancel()

    def pid(self) -> int:
        return os.getpid()
