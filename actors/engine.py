"""The story engine: the named async actor behind the service, the batch job and the demo.

It accepts stories into a bounded queue, runs up to `max_running_stories` of them at once (one
`StoryDirector` each), keeps every story's status and event log, and owns the shared actors: the
generator pool, the scorers, the memory actor and the stitcher. The contract is `actors/api.py`.

The engine keeps state in memory only; storage is the truth. When it starts it lists the bucket's
manifests, so a restarted engine still knows earlier stories (those that were running when it went
away are marked failed and can be resumed). A story's objects are written by its director only: a
rejected or merely queued story has written nothing.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import ray

from storymem.config import StoryMemConfig
from storymem.progress import EventLog, Phase, ProgressEvent
from storymem.script import StoryRequest, StoryScript, load_request
from storymem.storage import S3Store, StoryLayout, make_story_id
from storymem.story import Manifest, read_manifest

from ._common import ACTOR_LOST, cause
from .api import EngineFull, StoryConflict, StoryNotFound, StoryState, StoryStatus
from .director import StoryDirector
from .memory_bank import MemoryBankActor
from .pool import GeneratorPool
from .scorer import ScorerActor
from .stitcher import Stitcher

log = logging.getLogger(__name__)

MAX_EVENTS_WAIT_S = 60.0
CANCEL_WAIT_S = 10.0
REBUILD_RETRY_S = 30.0
DEFAULT_SHOT_S = 30.0  # retry-after estimate before any shot has been timed


@dataclass
class _Story:
    status: StoryStatus
    log: EventLog
    script_json: str | None = None  # None: rebuilt from storage, loaded on resume
    settings_json: str | None = None
    owner: str | None = None
    director: object = None
    cancel_requested: bool = False
    seconds: dict[int, float] = field(default_factory=dict)
    tick: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def changed(self) -> None:
        """Wake every long-poll waiting on this story."""
        self.status.updated = time.time()
        self.tick.set()
        self.tick = asyncio.Event()


def _state_of(manifest: Manifest) -> tuple[StoryState, str | None]:
    if manifest.state == "done" and manifest.final:
        return StoryState.DONE, None
    if manifest.state in ("failed", "cancelled"):
        return StoryState(manifest.state), manifest.error
    return StoryState.FAILED, "interrupted: the engine restarted while the story ran; resume() continues it"


@ray.remote
class StoryEngine:
    def __init__(self, cfg: StoryMemConfig):
        self.cfg = cfg
        self.ecfg = cfg.engine
        self.store = S3Store(cfg.storage)
        self.stories: dict[str, _Story] = {}
        self.queue: deque[str] = deque()
        self.running: set[str] = set()
        e = cfg.engine
        self.pool = GeneratorPool.options(num_cpus=0).remote(cfg.model, e)
        self.scorers = [
            ScorerActor.options(num_cpus=e.cpus_per_scorer, num_gpus=e.gpus_per_scorer).remote(cfg.scoring)
            for _ in range(e.num_scorers)
        ]
        self.bank = MemoryBankActor.options(num_cpus=0).remote(cfg.storage)
        self.stitcher = Stitcher.options(num_cpus=0, max_concurrency=4).remote(cfg.storage)
        self.profile: dict | None = None
        self.rebuilt = False
        self._tasks: set[asyncio.Task] = set()
        self._started = False

    # -- plumbing -----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            self._background(self._rebuild())

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _get(self, story_id: str) -> _Story:
        rec = self.stories.get(story_id)
        if rec is None:
            raise StoryNotFound(f"no story {story_id!r}")
        return rec

    def _event(self, rec: _Story, phase: Phase, shot: int | None = None, message: str | None = None) -> None:
        s = rec.status
        rec.log.append(
            ProgressEvent(
                story=s.id, shot=shot, shots_total=s.shots_total, steps_total=s.steps_total, phase=phase, message=message
            )
        )
        s.phase = phase.value
        rec.changed()

    async def _rebuild(self) -> None:
        """Learn the stories already in the bucket (a restarted engine); retried while storage is down."""
        while True:
            try:
                keys = await asyncio.to_thread(self.store.list, "stories/")
                break
            except Exception as e:
                log.warning("cannot list stories in storage (%s); retrying in %.0f s", e, REBUILD_RETRY_S)
                await asyncio.sleep(REBUILD_RETRY_S)
        ids = [k.split("/")[1] for k in keys if k.count("/") == 2 and k.endswith("/manifest.json")]
        limit = asyncio.Semaphore(8)

        async def load(story_id: str) -> None:
            async with limit:
                try:
                    manifest = await asyncio.to_thread(read_manifest, self.store, StoryLayout(story_id))
                except Exception as e:
                    log.warning("skipping story %s: unreadable manifest (%s)", story_id, e)
                    return
            if manifest is None or story_id in self.stories:
                return
            state, error = _state_of(manifest)
            status = StoryStatus(
                id=story_id,
                state=state,
                story_name=manifest.story_name,
                shots_done=manifest.shots_done,
                shots_total=manifest.shots_total,
                steps_total=manifest.settings.get("num_inference_steps"),
                created=manifest.created,
                updated=manifest.updated,
                finished=manifest.updated,
                seconds_per_shot=[r.wall_s or 0.0 for r in manifest.shots],
                error=error,
                video_key=manifest.final if state == StoryState.DONE else None,
                owner=manifest.owner,
            )
            rec = _Story(status=status, log=EventLog(self.ecfg.event_log_capacity), owner=manifest.owner)
            rec.seconds = {r.index: r.wall_s or 0.0 for r in manifest.shots}
            rec.settled.set()
            self.stories[story_id] = rec
            self._event(rec, Phase(state.value), message=error)

        await asyncio.gather(*(load(i) for i in ids))
        self.rebuilt = True

    # -- scheduling ---------------------------------------------------------------------------
    def _active(self) -> int:
        return len(self.queue) + len(self.running)

    def _retry_after(self) -> float:
        recent = [s for rec in self.stories.values() for s in rec.status.seconds_per_shot if s > 0][-200:]
        per_shot = statistics.median(recent) if recent else DEFAULT_SHOT_S
        running = [self.stories[i].status for i in self.running]
        if not running:
            return 1.0
        # The queue frees a place when the running story closest to its end finishes; running
        # stories share the generators.
        left = min(max(1, s.shots_total - s.shots_done) for s in running)
        share = max(1.0, len(running) / self.ecfg.num_generators)
        return float(min(3600.0, max(1.0, per_shot * left * share)))

    def _schedule(self) -> None:
        while self.queue and len(self.running) < self.ecfg.max_running_stories:
            story_id = self.queue.popleft()
            self.running.add(story_id)
            self._background(self._drive(story_id))

    async def _load_request(self, rec: _Story) -> None:
        layout = StoryLayout(rec.status.id)
        script = await asyncio.to_thread(self.store.get_bytes, layout.script)
        settings = await asyncio.to_thread(self.store.get_bytes, layout.settings)
        rec.script_json = StoryScript.model_validate_json(script).model_dump_json()
        rec.settings_json = settings.decode()

    async def _drive(self, story_id: str) -> None:
        rec = self.stories[story_id]
        s = rec.status
        s.state, s.error = StoryState.RUNNING, None
        s.started = s.started or time.time()
        rec.changed()
        result: dict
        try:
            if rec.script_json is None:
                await self._load_request(rec)
            result = await self._direct(rec)
        except Exception as e:
            result = {"state": "failed", "error": f"{type(cause(e)).__name__}: {cause(e)}"}
        finally:
            self.running.discard(story_id)
        self._finish(rec, result)
        self._schedule()

    async def _direct(self, rec: _Story) -> dict:
        """Run directors until one returns; a director that dies is replaced (resuming from storage)."""
        me = ray.get_runtime_context().current_actor
        last = ""
        for attempt in range(1, self.ecfg.max_director_attempts + 1):
            rec.status.attempts += 1
            director = StoryDirector.options(num_cpus=0).remote(
                rec.status.id,
                rec.script_json,
                rec.settings_json,
                self.cfg,
                me,
                self.pool,
                self.scorers,
                self.bank,
                self.stitcher,
                attempt=rec.status.attempts,
                model_name=(self.profile or {}).get("name", ""),
                owner=rec.owner,
            )
            rec.director = director
            if rec.cancel_requested:
                director.cancel.remote()
            try:
                return await director.run.remote()
            except ACTOR_LOST as e:
                lost = f"{type(e).__name__}"
                last = str(e).strip().splitlines()[0][:300] if str(e).strip() else lost
                log.warning("director of story %s lost (%s), attempt %d", rec.status.id, lost, attempt)
                await self.pool.release_story.remote(rec.status.id)
                if rec.cancel_requested:
                    return {"state": "cancelled", "error": "cancelled by request"}
                if attempt < self.ecfg.max_director_attempts:
                    self._event(rec, Phase.START, message=f"director lost ({lost}); resuming from the last committed shot")
            finally:
                rec.director = None
                try:
                    ray.kill(director, no_restart=True)
                except Exception:
                    pass
        return {
            "state": "failed",
            "error": f"the story's director died {self.ecfg.max_director_attempts} times; last: {last}",
        }

    def _finish(self, rec: _Story, result: dict) -> None:
        s = rec.status
        state = {"done": StoryState.DONE, "cancelled": StoryState.CANCELLED}.get(result.get("state"), StoryState.FAILED)
        s.state = state
        s.error = None if state == StoryState.DONE else result.get("error")
        s.shots_done = max(s.shots_done, int(result.get("shots_done") or 0))
        s.video_key = result.get("final") if state == StoryState.DONE else None
        s.current_shot = s.step = None
        s.finished = time.time()
        rec.cancel_requested = False
        self._event(rec, Phase(state.value), shot=None, message=s.error)
        rec.settled.set()

    # -- called by directors ------------------------------------------------------------------
    async def publish(self, story_id: str, event: dict, attempt: int) -> None:
        """A director's progress event. Terminal events are the engine's own, and a replaced
        director's late events are dropped."""
        rec = self.stories.get(story_id)
        if rec is None or rec.status.state != StoryState.RUNNING or attempt != rec.status.attempts:
            return
        e = ProgressEvent.model_validate(event)
        if e.phase.terminal:
            return
        rec.log.append(e)
        s = rec.status
        s.phase = e.phase.value
        if e.shot is not None:
            s.current_shot = e.shot
        s.step = e.step
        if e.steps_total is not None:
            s.steps_total = e.steps_total
        rec.changed()

    async def shot_committed(self, story_id: str, index: int, seconds: float | None) -> None:
        rec = self.stories.get(story_id)
        if rec is None:
            return
        rec.seconds[index] = float(seconds or 0.0)
        rec.status.shots_done = max(rec.status.shots_done, index + 1)
        rec.status.seconds_per_shot = [rec.seconds[k] for k in sorted(rec.seconds)]
        rec.changed()

    # -- the contract (actors/api.py) ---------------------------------------------------------
    async def submit(self, request, owner: str | None = None) -> dict:
        self._ensure_started()
        if isinstance(request, StoryRequest):  # only what was set: the rest takes the model's defaults
            request = request.model_dump(mode="json", exclude_unset=True)
        req = load_request(request, allow_paths=False)  # ScriptError on bad input
        if self._active() >= self.ecfg.max_queued_stories:
            raise EngineFull(self._retry_after())
        if self.profile is None:
            self.profile = await self.pool.profile.remote()
        settings = req.settings.resolve(self.profile["defaults"])
        if self._active() >= self.ecfg.max_queued_stories:  # others may have been accepted meanwhile
            raise EngineFull(self._retry_after())
        story_id = make_story_id()
        now = time.time()
        status = StoryStatus(
            id=story_id,
            state=StoryState.QUEUED,
            story_name=req.script.story_name,
            shots_total=req.script.num_shots,
            steps_total=settings.num_inference_steps,
            created=now,
            updated=now,
            owner=owner,
        )
        rec = _Story(
            status=status,
            log=EventLog(self.ecfg.event_log_capacity),
            script_json=req.script.model_dump_json(),
            settings_json=settings.model_dump_json(),
            owner=owner,
        )
        self.stories[story_id] = rec
        self._event(rec, Phase.QUEUED)
        self.queue.append(story_id)
        self._schedule()
        return status.model_dump(mode="json")

    async def status(self, story_id: str) -> dict:
        self._ensure_started()
        return self._get(story_id).status.model_dump(mode="json")

    async def events(self, story_id: str, after: int = 0, timeout: float = 0.0) -> list[dict]:
        self._ensure_started()
        rec = self._get(story_id)
        deadline = time.monotonic() + min(max(0.0, float(timeout)), MAX_EVENTS_WAIT_S)
        while True:
            events = rec.log.since(after)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0 or (rec.status.state.terminal and rec.settled.is_set()):
                return [e.model_dump(mode="json") for e in events]
            try:
                await asyncio.wait_for(rec.tick.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def cancel(self, story_id: str) -> dict:
        self._ensure_started()
        rec = self._get(story_id)
        s = rec.status
        if s.state == StoryState.CANCELLED:
            return s.model_dump(mode="json")
        if s.state.terminal:
            raise StoryConflict(f"story {story_id} is already {s.state.value}")
        if s.state == StoryState.QUEUED and story_id in self.queue:
            self.queue.remove(story_id)
            self._finish(rec, {"state": "cancelled", "error": "cancelled by request"})
            return s.model_dump(mode="json")
        rec.cancel_requested = True
        if rec.director is not None:
            rec.director.cancel.remote()
        try:
            await asyncio.wait_for(rec.settled.wait(), CANCEL_WAIT_S)
        except asyncio.TimeoutError:
            pass  # still stopping (a long denoising step); the state follows
        return s.model_dump(mode="json")

    async def resume(self, story_id: str) -> dict:
        self._ensure_started()
        rec = self._get(story_id)
        s = rec.status
        if s.state not in (StoryState.FAILED, StoryState.CANCELLED):
            raise StoryConflict(f"story {story_id} is {s.state.value}; only failed or cancelled stories resume")
        if self._active() >= self.ecfg.max_queued_stories:
            raise EngineFull(self._retry_after())
        s.state, s.error, s.finished = StoryState.QUEUED, None, None
        rec.settled.clear()
        rec.cancel_requested = False
        self._event(rec, Phase.QUEUED, message="resumed")
        self.queue.append(story_id)
        self._schedule()
        return s.model_dump(mode="json")

    async def list(self, offset: int = 0, limit: int = 20, state: str | None = None, owner: str | None = None) -> dict:
        self._ensure_started()
        if offset < 0:
            raise ValueError(f"offset: must be >= 0, got {offset}")
        if limit < 0:
            raise ValueError(f"limit: must be >= 0, got {limit}")
        wanted = None if state is None else StoryState(state)
        items = [
            r.status
            for r in self.stories.values()
            if (wanted is None or r.status.state == wanted) and (owner is None or r.owner == owner)
        ]
        items.sort(key=lambda st: (st.created, st.id), reverse=True)
        return {"items": [st.model_dump(mode="json") for st in items[offset : offset + limit]], "total": len(items)}

    async def memory(self, story_id: str) -> list[dict]:
        self._ensure_started()
        self._get(story_id)
        manifest = await asyncio.to_thread(read_manifest, self.store, StoryLayout(story_id))
        if manifest is None:
            return []
        return [
            {
                "index": r.index,
                "mode": r.mode,
                "prompt": r.prompt,
                "cut": r.cut,
                "frames": r.frames,
                "memory_used": r.memory_used,
                "keyframes": r.keyframes,
                "memory_after": r.memory_after,
            }
            for r in manifest.shots
        ]

    async def health(self) -> dict:
        self._ensure_started()
        pool = await self.pool.health.remote()
        return {
            **pool,
            "queued": len(self.queue),
            "running": len(self.running),
            "stories": len(self.stories),
            "rebuilt": self.rebuilt,
            "ready": pool["generators"] > 0,
        }

    # -- optional extras ----------------------------------------------------------------------
    async def wait_ready(self, timeout: float = 300.0) -> dict:
        """Wait until a generator has loaded the model (and storage was listed); returns health()."""
        self._ensure_started()
        self.profile = await asyncio.wait_for(self.pool.profile.remote(), timeout)
        return await self.health()

    async def internals(self, story_id: str | None = None, history: bool = False) -> dict:
        """Process-level facts for tests, benchmarks and operators: the generator pool's leases,
        busy times and pids, leases per story shot (with history: every ended lease), the memory
        actor's pid and a story's director pid."""
        self._ensure_started()
        out = {"pool": await self.pool.stats.remote(history)}
        try:
            out["memory_pid"] = await asyncio.wait_for(self.bank.pid.remote(), 10)
        except (asyncio.TimeoutError, *ACTOR_LOST):
            out["memory_pid"] = None
        if story_id is not None:
            rec = self._get(story_id)
            pid = None
            if rec.director is not None:
                try:
                    pid = await asyncio.wait_for(rec.director.pid.remote(), 10)
                except (asyncio.TimeoutError, *ACTOR_LOST):
                    pid = None
            out["director_pid"] = pid
            prefix = f"{story_id}/"
            out["calls"] = {int(k[len(prefix) :]): n for k, n in out["pool"]["calls"].items() if k.startswith(prefix)}
        return out
