"""The job book: every story's state, the queue, event logs, retry-after, idempotency and rebuild.

A `JobBook` is plain asyncio over an artifact store and a `Driver` (what runs a story: Ray
directors in `actors/engine.py`, or anything in-process in tests). It is the engine's logic without
placement or supervision, so its rules (429, 409, tenant scoping and quotas, durable acceptance)
are tested without Ray.

Durability: `submit` answers only after the story's script, settings and a manifest in state
`queued` are in storage; resume and a queued story's cancel are written to the manifest too. So
storage alone says what was accepted. `rebuild` reads one manifest per story (a delimiter listing
of `stories/`, not every object): queued stories come back queued, running ones are queued again
and continue from their last committed shot. A story the book has not met yet is read through from
storage, so a read during the rebuild is never a false 404.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..config import EngineConfig, ServiceLimits
from ..progress import EventLog, Phase, ProgressEvent
from ..script import GenerationSettings, StoryRequest, StoryScript
from ..storage import PreconditionFailed, StorageError, StoryLayout, make_story_id
from ..story import Manifest, read_manifest, read_manifest_versioned, script_digest, write_manifest
from .contract import (
    Conflict,
    InvalidRequest,
    NotFound,
    QueueFull,
    ServiceUnavailable,
    StoryState,
    StoryStatus,
)

log = logging.getLogger(__name__)

MAX_EVENTS_WAIT_S = 60.0
CANCEL_WAIT_S = 10.0
REBUILD_RETRY_S = 5.0
RECORD_RETRY_S = (1.0, 30.0)  # first and longest pause between tries to record a failure
DEFAULT_SHOT_S = 30.0  # retry-after estimate before any shot has been timed
RESTARTED = "the engine restarted while the story ran; it continues from its last committed shot"


@dataclass
class Run:
    """One run of a story, handed to the driver."""

    story_id: str
    run: int
    request: StoryRequest
    tenant: str | None


class Driver(Protocol):
    """Runs stories for the book. `run` returns {state, error?, shots_done?, final?}; it reports
    progress through `book.publish` / `book.shot_committed` and asks `book.new_attempt` per director."""

    async def run(self, job: Run) -> dict: ...

    async def cancel(self, story_id: str) -> None: ...

    async def profile(self) -> dict: ...

    async def health(self) -> dict: ...


@dataclass
class Job:
    status: StoryStatus
    log: EventLog
    tenant: str | None = None
    request: StoryRequest | None = None  # None: in storage, loaded when it runs
    cancel_requested: bool = False
    seconds: dict[int, float] = field(default_factory=dict)
    tick: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def changed(self) -> None:
        """Wake every long-poll waiting on this story."""
        self.status.updated = time.time()
        self.tick.set()
        self.tick = asyncio.Event()


def _attempt_number(attempt: str | None) -> int:
    """The director number in a manifest's fence id (`<number>-<hex>`); 0 when there is none."""
    head = (attempt or "").split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _tenant_key(tenant: str | None) -> str:
    return "" if tenant is None else tenant


class JobBook:
    def __init__(self, store, engine: EngineConfig, limits: ServiceLimits, driver: Driver):
        self.store = store
        self.cfg = engine
        self.limits = limits
        self.driver = driver
        self.jobs: dict[str, Job] = {}
        self.queues: dict[str, deque[str]] = {}  # per tenant, served in turn
        self.turn: deque[str] = deque()
        self.running: set[str] = set()
        self.idempotency: dict[tuple[str, str], tuple[str, str]] = {}  # (tenant, key) -> (story, digest)
        self._reserving: dict[tuple[str, str], asyncio.Future] = {}
        self._pending = 0  # submissions being written
        self.rebuilt = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._profile: dict | None = None

    # -- plumbing -----------------------------------------------------------------------------
    def start(self) -> None:
        """Begin the rebuild (idempotent; needs a running event loop)."""
        if not self._started:
            self._started = True
            self._background(self.rebuild())

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _io(self, fn, *args):
        """A storage call off the event loop; storage trouble is the caller's 503."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StorageError as exc:
            log.warning("storage call failed: %s", exc)
            raise ServiceUnavailable(503, [("<storage>", "the object store did not answer; nothing was accepted")]) from None

    def _event(self, job: Job, phase: Phase, shot: int | None = None, message: str | None = None) -> None:
        s = job.status
        job.log.append(
            ProgressEvent(story=s.id, shot=shot, shots_total=s.shots_total, steps_total=s.steps_total,
                          phase=phase, message=message, run=s.run)  # fmt: skip
        )
        s.phase = phase.value
        job.changed()

    async def _find(self, story_id: str, tenant: str | None) -> Job:
        """The story, read through from storage when the book has not met it; tenants see their own."""
        job = self.jobs.get(story_id)
        if job is None:
            manifest = await self._io(read_manifest, self.store, StoryLayout(story_id))
            job = self.jobs.get(story_id)  # the rebuild may have adopted it meanwhile
            if job is None and manifest is not None:
                job = self._adopt(manifest)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise NotFound(404, [("id", "no story has this id")])
        return job

    # -- rebuild ------------------------------------------------------------------------------
    async def rebuild(self) -> None:
        """Learn the stories in storage from their manifests; retried while storage is down."""
        lister = getattr(self.store, "list_children", None)
        while True:
            try:
                if lister is not None:
                    ids = await asyncio.to_thread(lister, "stories/")
                else:
                    keys = await asyncio.to_thread(self.store.list, "stories/")
                    ids = sorted({k.split("/")[1] for k in keys if k.count("/") == 2 and k.endswith("/manifest.json")})
                break
            except Exception as e:
                log.warning("cannot list stories in storage (%s); retrying in %.0f s", e, REBUILD_RETRY_S)
                await asyncio.sleep(REBUILD_RETRY_S)
        limit = asyncio.Semaphore(8)

        async def load(story_id: str) -> Manifest | None:
            async with limit:
                try:
                    return await asyncio.to_thread(read_manifest, self.store, StoryLayout(story_id))
                except Exception as e:
                    log.warning("skipping story %s: unreadable manifest (%s)", story_id, e)
                    return None

        manifests = await asyncio.gather(*(load(i) for i in ids if i not in self.jobs))
        # Oldest first, so that queued stories keep their order in the queue.
        for manifest in sorted((m for m in manifests if m is not None), key=lambda m: (m.created, m.story_id)):
            if manifest.story_id not in self.jobs:
                self._adopt(manifest)
        self.rebuilt.set()
        self._schedule()

    def _adopt(self, manifest: Manifest) -> Job:
        """A story known from its manifest. Queued and running ones (the engine went away under
        them) go back into the queue and continue from their last committed shot."""
        state = StoryState(manifest.state)
        error = manifest.error
        if state == StoryState.DONE and not manifest.final:
            state = StoryState.QUEUED  # done without a final video: stitching was cut short
        if state == StoryState.RUNNING:
            state = StoryState.QUEUED
        status = StoryStatus(
            id=manifest.story_id,
            state=state,
            story_name=manifest.story_name,
            shots_done=manifest.shots_done,
            shots_total=manifest.shots_total,
            steps_total=manifest.settings.get("num_inference_steps"),
            created=manifest.created,
            updated=manifest.updated,
            finished=manifest.updated if state.terminal else None,
            seconds_per_shot=[r.wall_s or 0.0 for r in manifest.shots],
            error=error if state.resumable else None,
            video_key=manifest.final if state == StoryState.DONE else None,
            owner=manifest.owner,
            run=manifest.run,
        )
        # Seqs above any the lost log handed out (a client's Last-Event-ID then means "after that").
        log_ = EventLog(self.cfg.event_log_capacity, start=int(time.time() * 1000))
        job = Job(status=status, log=log_, tenant=manifest.owner)
        job.seconds = {r.index: r.wall_s or 0.0 for r in manifest.shots}
        self.jobs[manifest.story_id] = job
        if manifest.idempotency_key and manifest.request_sha256:
            key = (_tenant_key(manifest.owner), manifest.idempotency_key)
            self.idempotency[key] = (manifest.story_id, manifest.request_sha256)
        if state == StoryState.QUEUED:
            self._event(job, Phase.QUEUED, message=RESTARTED if manifest.state != StoryState.QUEUED else None)
            self._enqueue(job)
        else:
            job.settled.set()
            self._event(job, Phase(state.value), message=status.error)
        return job

    # -- scheduling ---------------------------------------------------------------------------
    def _active(self, tenant: str | None = None) -> int:
        jobs = (j for j in self.jobs.values() if not j.status.state.terminal)
        if tenant is not None:
            return sum(1 for j in jobs if j.tenant == tenant)
        return sum(1 for _ in jobs) + self._pending

    def _retry_after(self) -> float:
        recent = [s for j in self.jobs.values() for s in j.status.seconds_per_shot if s > 0][-200:]
        per_shot = statistics.median(recent) if recent else DEFAULT_SHOT_S
        running = [self.jobs[i].status for i in self.running]
        if not running:
            return 1.0
        # A place frees when the running story closest to its end finishes; running stories share
        # the generators.
        left = min(max(1, s.shots_total - s.shots_done) for s in running)
        share = max(1.0, len(running) / self.cfg.num_generators)
        return float(min(3600.0, max(1.0, per_shot * left * share)))

    def _check_room(self, tenant: str | None) -> None:
        if self._active() >= self.cfg.max_queued_stories:
            raise QueueFull(429, [("<queue>", "the story queue is full")], retry_after_s=self._retry_after())
        if tenant is not None and self._active(tenant) >= self.limits.max_queued_per_tenant:
            problem = f"this tenant has {self.limits.max_queued_per_tenant} stories queued or running (its quota)"
            raise QueueFull(429, [("<quota>", problem)], retry_after_s=self._retry_after())

    def _enqueue(self, job: Job) -> None:
        key = _tenant_key(job.tenant)
        if key not in self.queues:
            self.queues[key] = deque()
            self.turn.appendleft(key)  # a tenant not served yet goes first; a served one goes to the back
        self.queues[key].append(job.status.id)
        self._schedule()

    def _dequeue(self, job: Job) -> bool:
        queue = self.queues.get(_tenant_key(job.tenant))
        if queue is not None and job.status.id in queue:
            queue.remove(job.status.id)
            return True
        return False

    def _next(self) -> str | None:
        """The next story to run: tenants take turns; a tenant at its running quota waits."""
        for _ in range(len(self.turn)):
            key = self.turn[0]
            self.turn.rotate(-1)
            queue = self.queues[key]
            if not queue:
                continue
            running = sum(1 for i in self.running if _tenant_key(self.jobs[i].tenant) == key)
            if key and running >= self.limits.max_running_per_tenant:
                continue
            return queue.popleft()
        return None

    def _schedule(self) -> None:
        while len(self.running) < self.cfg.max_running_stories:
            story_id = self._next()
            if story_id is None:
                return
            self.running.add(story_id)
            self._background(self._drive(self.jobs[story_id]))

    async def _load_request(self, job: Job) -> StoryRequest:
        layout = StoryLayout(job.status.id)
        script = await asyncio.to_thread(self.store.get_bytes, layout.script)
        settings = await asyncio.to_thread(self.store.get_bytes, layout.settings)
        return StoryRequest(
            script=StoryScript.model_validate_json(script), settings=GenerationSettings.model_validate_json(settings)
        )

    async def _drive(self, job: Job) -> None:
        s = job.status
        s.run += 1
        s.state, s.error = StoryState.RUNNING, None
        s.started = s.started or time.time()
        job.changed()
        try:
            if job.request is None:
                job.request = await self._load_request(job)
            result = await self.driver.run(Run(s.id, s.run, job.request, job.tenant))
        except Exception as e:
            result = {"state": "failed", "error": f"{type(e).__name__}: {e}"}
        finally:
            self.running.discard(s.id)
        self._finish(job, result)
        self._schedule()

    def _finish(self, job: Job, result: dict) -> None:
        s = job.status
        state = {"done": StoryState.DONE, "cancelled": StoryState.CANCELLED}.get(result.get("state"), StoryState.FAILED)
        s.state = state
        s.error = None if state == StoryState.DONE else result.get("error")
        s.shots_done = max(s.shots_done, int(result.get("shots_done") or 0))
        s.video_key = result.get("final") if state == StoryState.DONE else None
        s.current_shot = s.step = None
        s.finished = time.time()
        job.cancel_requested = False
        self._event(job, Phase(state.value), message=s.error)
        job.settled.set()
        if state == StoryState.FAILED:
            self._background(self._record_failure(job, s.run, s.attempts))

    async def _record_failure(self, job: Job, run: int, attempt: int) -> None:
        """Make a failure durable where its director could not: storage that failed every retry
        (the director does not wait another round to report it) or a director that kept dying.
        Without this, the manifest still says running and the next engine start would run a story
        that everyone was told had failed. Retried until storage answers, for as long as the story
        stays failed in this run."""
        delay, longest = RECORD_RETRY_S
        while job.status.state == StoryState.FAILED and job.status.run == run:
            try:
                await asyncio.to_thread(self._write_failure, job.status.id, attempt, job.status.error)
                return
            except Exception as e:  # storage still down: the state stays in memory meanwhile
                log.warning("story %s: cannot record its failure yet (%s); retrying in %.0f s", job.status.id, e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, longest)

    def _write_failure(self, story_id: str, attempt: int, error: str | None) -> None:
        layout = StoryLayout(story_id)
        for _ in range(5):
            manifest, etag = read_manifest_versioned(self.store, layout)
            # Only over what the failed run left: a later run (a resume; directors numbered above
            # `attempt`) or a state the director recorded itself is not the book's to overwrite.
            if manifest is None or manifest.state != StoryState.RUNNING or _attempt_number(manifest.attempt) > attempt:
                return
            manifest.state, manifest.error, manifest.updated = StoryState.FAILED, error, time.time()
            try:
                write_manifest(self.store, layout, manifest, etag)
                return
            except PreconditionFailed:
                continue  # someone wrote meanwhile: look again

    async def _write_state(self, story_id: str, state: StoryState, error: str | None) -> None:
        """Record a transition made while no director runs (cancel of a queued story, resume)."""

        def write() -> None:
            layout = StoryLayout(story_id)
            for _ in range(5):  # a conditional write: a late director's commit is never overwritten blindly
                manifest, etag = read_manifest_versioned(self.store, layout)
                if manifest is None:
                    return
                manifest.state, manifest.error, manifest.updated = state, error, time.time()
                try:
                    write_manifest(self.store, layout, manifest, etag)
                    return
                except PreconditionFailed:
                    continue
            raise StorageError(f"{layout.manifest}: kept changing under a state change")

        await self._io(write)

    # -- called by the driver -----------------------------------------------------------------
    def new_attempt(self, story_id: str) -> int:
        """A director starts on the story: its attempt number (events of older ones are dropped)."""
        job = self.jobs[story_id]
        job.status.attempts += 1
        return job.status.attempts

    def is_cancel_requested(self, story_id: str) -> bool:
        job = self.jobs.get(story_id)
        return job is not None and job.cancel_requested

    def director_lost(self, story_id: str, message: str) -> None:
        job = self.jobs.get(story_id)
        if job is not None:
            self._event(job, Phase.START, message=message)

    def publish(self, story_id: str, event: dict, attempt: int) -> None:
        """A director's progress event. Terminal events are the book's own, and a replaced
        director's late events are dropped."""
        job = self.jobs.get(story_id)
        if job is None or job.status.state != StoryState.RUNNING or attempt != job.status.attempts:
            return
        e = ProgressEvent.model_validate(event)
        if e.phase.terminal:
            return
        job.log.append(e.model_copy(update={"run": job.status.run}))
        s = job.status
        s.phase = e.phase.value
        if e.shot is not None:
            s.current_shot = e.shot
        s.step = e.step
        if e.steps_total is not None:
            s.steps_total = e.steps_total
        job.changed()

    def shot_committed(self, story_id: str, index: int, seconds: float | None) -> None:
        job = self.jobs.get(story_id)
        if job is None:
            return
        job.seconds[index] = float(seconds or 0.0)
        job.status.shots_done = max(job.status.shots_done, index + 1)
        job.status.seconds_per_shot = [job.seconds[k] for k in sorted(job.seconds)]
        job.changed()

    # -- the contract (storymem.service.contract.EngineAPI) -----------------------------------
    async def profile(self) -> dict:
        if self._profile is None:
            self._profile = await self.driver.profile()
        return self._profile

    async def submit(
        self, request, tenant: str | None = None, idempotency_key: str | None = None, digest: str | None = None
    ) -> dict:
        """Accept a validated request; answers once it is durable in storage."""
        self.start()
        if not isinstance(request, StoryRequest):
            raise InvalidRequest(422, [("<request>", "the engine takes a StoryRequest validated by "
                                                     "storymem.service.intake.normalise")])  # fmt: skip
        key = None
        if idempotency_key is not None:
            key = (_tenant_key(tenant), idempotency_key)
            digest = digest or request.model_dump_json()
            try:
                await asyncio.wait_for(self.rebuilt.wait(), 30.0)  # the keys of earlier stories are known
            except asyncio.TimeoutError:
                raise ServiceUnavailable(503, [("<storage>", "the engine is still reading its stories")]) from None
            while key in self._reserving:  # the same key in flight: its answer decides
                await asyncio.shield(self._reserving[key])
            known = self.idempotency.get(key)
            if known is not None:
                if known[1] != digest:
                    raise Conflict(409, [("Idempotency-Key", "was used before with a different request body")])
                return self.jobs[known[0]].status.model_dump(mode="json")
        self._check_room(tenant)
        story_id = make_story_id()
        now = time.time()
        profile = await self.profile()
        settings = request.settings
        manifest = Manifest(
            story_id=story_id,
            story_name=request.script.story_name,
            script_sha256=script_digest(request.script),
            state=StoryState.QUEUED,
            shots_total=request.script.num_shots,
            settings=settings.model_dump(mode="json"),
            model=profile.get("name", ""),
            owner=tenant,
            idempotency_key=idempotency_key,
            request_sha256=digest if idempotency_key is not None else None,
            created=now,
            updated=now,
        )
        layout = StoryLayout(story_id)

        def write() -> None:
            put = self.store.put_bytes
            put(layout.script, request.script.model_dump_json(indent=2).encode(), "application/json")
            put(layout.settings, settings.model_dump_json(indent=2).encode(), "application/json")
            write_manifest(self.store, layout, manifest, None)  # the commit: a new story, no earlier version

        reservation = asyncio.get_running_loop().create_future() if key is not None else None
        if key is not None:
            self._reserving[key] = reservation
        self._pending += 1
        try:
            await self._io(write)
        finally:
            self._pending -= 1
            if key is not None:
                self._reserving.pop(key, None)
                reservation.set_result(None)
        if key is not None:
            self.idempotency[key] = (story_id, digest)
        status = StoryStatus(
            id=story_id,
            state=StoryState.QUEUED,
            story_name=request.script.story_name,
            shots_total=request.script.num_shots,
            steps_total=settings.num_inference_steps,
            created=now,
            updated=now,
            owner=tenant,
        )
        job = Job(status=status, log=EventLog(self.cfg.event_log_capacity), tenant=tenant, request=request)
        self.jobs[story_id] = job
        self._event(job, Phase.QUEUED)
        self._enqueue(job)
        return status.model_dump(mode="json")

    async def status(self, story_id: str, tenant: str | None = None) -> dict:
        self.start()
        return (await self._find(story_id, tenant)).status.model_dump(mode="json")

    async def events(self, story_id: str, after: int = 0, timeout: float = 0.0, tenant: str | None = None) -> list:
        self.start()
        job = await self._find(story_id, tenant)
        deadline = time.monotonic() + min(max(0.0, float(timeout)), MAX_EVENTS_WAIT_S)
        while True:
            events = job.log.since(after)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0 or (job.status.state.terminal and job.settled.is_set()):
                return [e.model_dump(mode="json") for e in events]
            try:
                await asyncio.wait_for(job.tick.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def cancel(self, story_id: str, tenant: str | None = None) -> dict:
        self.start()
        job = await self._find(story_id, tenant)
        s = job.status
        if s.state == StoryState.CANCELLED:
            return s.model_dump(mode="json")
        if s.state.terminal:
            raise Conflict(409, [("id", f"story {story_id} is already {s.state.value}")])
        if s.state == StoryState.QUEUED and self._dequeue(job):
            await self._write_state(story_id, StoryState.CANCELLED, "cancelled by request")
            self._finish(job, {"state": "cancelled", "error": "cancelled by request"})
            return s.model_dump(mode="json")
        job.cancel_requested = True
        await self.driver.cancel(story_id)
        try:
            await asyncio.wait_for(asyncio.shield(job.settled.wait()), CANCEL_WAIT_S)
        except asyncio.TimeoutError:
            pass  # still stopping (a long denoising step); the state follows
        return s.model_dump(mode="json")

    async def resume(self, story_id: str, tenant: str | None = None) -> dict:
        self.start()
        job = await self._find(story_id, tenant)
        s = job.status
        if not s.state.resumable:
            raise Conflict(409, [("id", f"story {story_id} is {s.state.value}; only failed or cancelled stories resume")])
        self._check_room(job.tenant)
        await self._write_state(story_id, StoryState.QUEUED, None)
        if s.state.resumable:  # not resumed by a concurrent call meanwhile
            s.state, s.error, s.finished = StoryState.QUEUED, None, None
            job.settled.clear()
            job.cancel_requested = False
            self._event(job, Phase.QUEUED, message="resumed")
            self._enqueue(job)
        return s.model_dump(mode="json")

    async def list(self, offset: int = 0, limit: int = 20, state: str | None = None, tenant: str | None = None) -> dict:
        self.start()
        if offset < 0:
            raise InvalidRequest(422, [("offset", f"must be >= 0, got {offset}")])
        if limit < 0:
            raise InvalidRequest(422, [("limit", f"must be >= 0, got {limit}")])
        wanted = None if state is None else StoryState(state)
        items = [
            j.status
            for j in self.jobs.values()
            if (wanted is None or j.status.state == wanted) and (tenant is None or j.tenant == tenant)
        ]
        items.sort(key=lambda st: (st.created, st.id), reverse=True)
        return {"items": [st.model_dump(mode="json") for st in items[offset : offset + limit]], "total": len(items)}

    async def memory(self, story_id: str, tenant: str | None = None) -> list:
        self.start()
        await self._find(story_id, tenant)
        manifest = await self._io(read_manifest, self.store, StoryLayout(story_id))
        if manifest is None:
            return []
        return [
            {"index": r.index, "mode": r.mode, "prompt": r.prompt, "cut": r.cut, "frames": r.frames,
             "memory_used": r.memory_used, "keyframes": r.keyframes,
             "memory_after": r.memory_after}  # fmt: skip
            for r in manifest.shots
        ]

    async def health(self) -> dict:
        """Readiness facts only (no story counts: this answers without a token)."""
        self.start()
        driver = await self.driver.health()
        rebuilt = self.rebuilt.is_set()
        return {**driver, "rebuilt": rebuilt, "ready": bool(driver.get("generators")) and rebuilt}

    def counts(self) -> dict:
        """Queue and story counts (for operators: `internals`)."""
        return {
            "queued": sum(len(q) for q in self.queues.values()),
            "running": len(self.running),
            "stories": len(self.jobs),
        }


__all__ = ["Driver", "Job", "JobBook", "Run"]
