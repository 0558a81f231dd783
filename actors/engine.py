"""The story engine: the named async actor that places and supervises stories.

Its rules (queue, states, tenants' turns, event logs, retry-after, idempotency, durable acceptance,
rebuild) are `storymem.service.book.JobBook`; this actor adds what needs Ray: one `StoryDirector`
per running story, replaced when it dies, and the shared actors (generator pool, scorers, memory
actor, stitcher). Its methods are the contract's `ENGINE_METHODS` plus the directors' callbacks.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from storymem.config import StoryMemConfig
from storymem.service.book import JobBook, Run
from storymem.service.contract import StoryState
from storymem.storage import S3Store

from ._common import ACTOR_LOST
from .director import StoryDirector
from .memory_bank import MemoryBankActor
from .pool import GeneratorPool
from .scorer import ScorerActor
from .stitcher import Stitcher

log = logging.getLogger(__name__)


class _Directors:
    """The book's driver: a director actor per run, replaced (resuming from storage) when it dies."""

    def __init__(self, engine: StoryEngine):
        self.engine = engine
        self.live: dict[str, object] = {}  # story -> its director

    async def profile(self) -> dict:
        return await self.engine.pool.profile.remote()

    async def health(self) -> dict:
        return await self.engine.pool.health.remote()

    async def cancel(self, story_id: str) -> None:
        director = self.live.get(story_id)
        if director is not None:
            director.cancel.remote()
            asyncio.get_running_loop().create_task(self._enforce(story_id, director))

    async def _enforce(self, story_id: str, director) -> None:
        """Past the cancel deadline the story's generator is killed and replaced (its step may be
        long or hung); past twice the deadline its director too."""
        deadline = self.engine.cfg.engine.cancel_deadline_s
        await asyncio.sleep(deadline)
        if self.live.get(story_id) is not director:
            return
        killed = await self.engine.pool.kill_story.remote(story_id)
        log.warning("story %s: cancel past its %.0f s deadline; killed %d generator(s)", story_id, deadline, killed)
        await asyncio.sleep(deadline)
        if self.live.get(story_id) is director:
            log.warning("story %s: director still running past the cancel deadline; killing it", story_id)
            ray.kill(director, no_restart=True)

    async def run(self, job: Run) -> dict:
        e, book = self.engine, self.engine.book
        me = ray.get_runtime_context().current_actor
        attempts = e.cfg.engine.max_director_attempts
        profile = await book.profile()
        last = ""
        for attempt in range(1, attempts + 1):
            number = book.new_attempt(job.story_id)
            director = StoryDirector.options(num_cpus=0).remote(
                job.story_id,
                job.request.script.model_dump_json(),
                job.request.settings.model_dump_json(),
                e.cfg,
                me,
                e.pool,
                e.scorers,
                e.bank,
                e.stitcher,
                attempt=number,
                model_name=profile.get("name", ""),
                owner=job.tenant,
            )
            self.live[job.story_id] = director
            if book.is_cancel_requested(job.story_id):
                director.cancel.remote()
            try:
                return await director.run.remote()
            except ACTOR_LOST as err:
                lost = type(err).__name__
                last = str(err).strip().splitlines()[0][:300] if str(err).strip() else lost
                log.warning("director of story %s lost (%s), attempt %d", job.story_id, lost, attempt)
                await e.pool.release_story.remote(job.story_id)
                if book.is_cancel_requested(job.story_id):
                    # The director died before it could record the cancel: the book records it.
                    await book._write_state(job.story_id, StoryState.CANCELLED, "cancelled by request")
                    return {"state": "cancelled", "error": "cancelled by request"}
                if attempt < attempts:
                    book.director_lost(job.story_id, f"director lost ({lost}); resuming from the last committed shot")
            finally:
                self.live.pop(job.story_id, None)
                try:
                    ray.kill(director, no_restart=True)
                except Exception:
                    pass
        return {"state": "failed", "error": f"the story's director died {attempts} times; last: {last}"}


@ray.remote
class StoryEngine:
    def __init__(self, cfg: StoryMemConfig):
        self.cfg = cfg
        e = cfg.engine
        self.pool = GeneratorPool.options(num_cpus=0).remote(cfg.model, e, cfg.speed, cfg.parallel)
        self.scorers = [
            ScorerActor.options(num_cpus=e.cpus_per_scorer, num_gpus=e.gpus_per_scorer).remote(cfg.scoring)
            for _ in range(e.num_scorers)
        ]
        self.bank = MemoryBankActor.options(num_cpus=0).remote(cfg.storage)
        self.stitcher = Stitcher.options(num_cpus=0, max_concurrency=4).remote(cfg.storage)
        self.directors = _Directors(self)
        self.book = JobBook(S3Store(cfg.storage), e, cfg.service.limits, self.directors)
        # Rebuild at once, also after Ray restarts this actor: queued and running stories go on by
        # themselves, before any caller asks (a call to itself runs right after __init__).
        ray.get_runtime_context().current_actor.start.remote()

    async def start(self) -> None:
        self.book.start()

    # -- the contract (storymem.service.contract.EngineAPI) -----------------------------------
    async def submit(self, request, tenant=None, idempotency_key=None, digest=None) -> dict:
        return await self.book.submit(request, tenant, idempotency_key, digest)

    async def status(self, story_id: str, tenant: str | None = None) -> dict:
        return await self.book.status(story_id, tenant)

    async def events(self, story_id: str, after: int = 0, timeout: float = 0.0, tenant: str | None = None) -> list:
        return await self.book.events(story_id, after, timeout, tenant)

    async def cancel(self, story_id: str, tenant: str | None = None) -> dict:
        return await self.book.cancel(story_id, tenant)

    async def resume(self, story_id: str, tenant: str | None = None) -> dict:
        return await self.book.resume(story_id, tenant)

    async def list(self, offset: int = 0, limit: int = 20, state: str | None = None, tenant: str | None = None) -> dict:
        return await self.book.list(offset, limit, state, tenant)

    async def memory(self, story_id: str, tenant: str | None = None) -> list:
        return await self.book.memory(story_id, tenant)

    async def health(self) -> dict:
        return await self.book.health()

    async def profile(self) -> dict:
        self.book.start()
        return await self.book.profile()

    # -- called by directors ------------------------------------------------------------------
    async def publish(self, story_id: str, event: dict, attempt: int) -> None:
        self.book.publish(story_id, event, attempt)

    async def shot_committed(self, story_id: str, index: int, seconds: float | None) -> None:
        self.book.shot_committed(story_id, index, seconds)

    # -- optional extras ----------------------------------------------------------------------
    async def wait_ready(self, timeout: float = 300.0) -> dict:
        """Wait until a generator has loaded the model and the rebuild finished; returns health()."""
        self.book.start()
        await asyncio.wait_for(self.book.profile(), timeout)
        await asyncio.wait_for(self.book.rebuilt.wait(), timeout)
        return await self.health()

    async def internals(self, story_id: str | None = None, history: bool = False) -> dict:
        """Process-level facts for tests, benchmarks and operators: queue counts, the generator
        pool's leases, busy times and pids, leases per story shot (with history: every ended
        lease), the memory actor's pid and a story's director pid."""
        self.book.start()
        out = {**self.book.counts(), "pool": await self.pool.stats.remote(history)}
        try:
            out["memory_pid"] = await asyncio.wait_for(self.bank.pid.remote(), 10)
        except (asyncio.TimeoutError, *ACTOR_LOST):
            out["memory_pid"] = None
        try:
            out["pool_pid"] = await asyncio.wait_for(self.pool.pid.remote(), 10)
        except (asyncio.TimeoutError, *ACTOR_LOST):
            out["pool_pid"] = None
        if story_id is not None:
            await self.book.status(story_id)
            director = self.directors.live.get(story_id)
            pid = None
            if director is not None:
                try:
                    pid = await asyncio.wait_for(director.pid.remote(), 10)
                except (asyncio.TimeoutError, *ACTOR_LOST):
                    pid = None
            out["director_pid"] = pid
            prefix = f"{story_id}/"
            out["calls"] = {int(k[len(prefix) :]): n for k, n in out["pool"]["calls"].items() if k.startswith(prefix)}
        return out
