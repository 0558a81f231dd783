"""The generator pool: leases shot generators to directors, first come first served.

A director asks for a lease per shot attempt (`acquire`), runs the shot on the leased generator
itself (so step progress and frames flow straight back to it), then `release`s. Waiting requests
form one FIFO across stories; a story has one shot in flight at a time, so this is round-robin
between stories. A generator reported failed, or found dead by the monitor, is killed and replaced
by a new actor in its slot; the slot's generation number makes late releases for the old actor
harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import ray

from storymem.config import EngineConfig, ModelConfig
from storymem.parallel import ParallelConfig
from storymem.speed import SpeedConfig

from ._common import ACTOR_LOST
from .gang import release_gang, spawn_gang
from .generator import ShotGeneratorActor, generator_options

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 5.0
PING_TIMEOUT_S = 30.0
HISTORY = 10000  # ended leases kept for stats(): (slot, story, shot, start, end) in unix time


@dataclass
class _Slot:
    index: int
    handle: object = None
    generation: int = 0
    spawned: int = 0  # generators started in this slot (names them)
    name: str = ""
    ready: bool = False
    broken: str | None = None  # the generator could not load its model
    pid: int | None = None
    node: str | None = None  # the Ray node the generator runs on
    lease: tuple[str, int, float, float] | None = None  # (story, shot, since monotonic, since unix)
    idle_since: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0
    leases: int = 0
    replaced: int = 0
    gang: object = None  # the placement group when the generator is a gang of ranks


# Restarted by Ray when it dies, calls in flight retried: its generators die with it (they are its
# children) and come back with it; directors whose shot was lost retry it.
@ray.remote(max_restarts=-1, max_task_retries=-1)
class GeneratorPool:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, speed: SpeedConfig | None = None,
                 parallel: ParallelConfig | None = None):
        self.model_cfg = model_cfg
        self.cfg = engine_cfg
        self.speed = speed
        self.parallel = parallel or ParallelConfig()  # world_size > 1: each slot is a gang (actors/gang.py)
        # Generation numbers start from the clock, so that a restarted pool never takes a release
        # meant for a generator of the pool before it as one for its own.
        epoch = int(time.time() * 1000) * 1000
        self.slots = [_Slot(i, generation=epoch) for i in range(engine_cfg.num_generators)]
        self.waiters: deque[tuple[str, int, asyncio.Future, str]] = deque()  # (story, shot, future, tenant)
        self.served: dict[str, int] = {}  # tenant -> when it was last given a generator
        self._tick = 0
        self.calls: Counter[str] = Counter()
        self.history: deque[tuple[int, str, int, float, float]] = deque(maxlen=HISTORY)
        self.started = time.time()
        self._profile: dict | None = None
        self._tasks: set[asyncio.Task] = set()
        self._monitor: asyncio.Task | None = None
        self._ready_events: dict[int, asyncio.Event] = {}

    # -- generators ---------------------------------------------------------------------------
    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_started(self) -> None:
        if self._monitor is None:
            for slot in self.slots:
                self._spawn(slot)
            self._monitor = asyncio.get_running_loop().create_task(self._watch())

    def _spawn(self, slot: _Slot) -> None:
        slot.generation += 1
        slot.spawned += 1
        slot.name = f"gen-{slot.index}.{slot.spawned}"
        slot.ready, slot.pid, slot.lease = False, None, None
        threads = None if self.cfg.gpus_per_generator else max(1, int(self.cfg.cpus_per_generator))
        if self.parallel.world_size > 1:
            slot.handle, slot.gang = spawn_gang(self.model_cfg, self.speed, self.parallel, self.cfg, slot.name, threads)
        else:
            slot.handle = ShotGeneratorActor.options(**generator_options(self.cfg)).remote(
                self.model_cfg, slot.name, threads, self.speed
            )
        self._background(self._await_ready(slot, slot.generation))

    async def _await_ready(self, slot: _Slot, generation: int) -> None:
        try:
            info = await slot.handle.info.remote()
        except ACTOR_LOST as e:
            if slot.generation == generation:
                # A generator that cannot even load its model is not replaced: the next would fail too.
                slot.broken = f"{type(e).__name__}: {e}"
                log.error("generator %s failed to start: %s", slot.name, slot.broken)
                self._fail_waiters_if_all_broken()
            return
        if slot.generation == generation:
            slot.ready, slot.pid, slot.node = True, info["pid"], info.get("node")
            self._dispatch()

    def _fail_waiters_if_all_broken(self) -> None:
        if all(s.broken for s in self.slots):
            reason = self.slots[0].broken
            while self.waiters:
                _, _, fut, _ = self.waiters.popleft()
                if not fut.done():
                    fut.set_exception(RuntimeError(f"no shot generator could start: {reason}"))

    async def _alive(self, slot: _Slot) -> bool:
        try:
            await asyncio.wait_for(slot.handle.info.remote(), PING_TIMEOUT_S)
            return True
        except (asyncio.TimeoutError, *ACTOR_LOST):
            return False

    def _replace(self, slot: _Slot) -> None:
        log.warning("generator %s is gone; starting a replacement", slot.name)
        self._end_lease(slot)
        if slot.gang is not None:
            release_gang(slot.handle, slot.gang)
            slot.gang = None
        else:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # already dead
                pass
        slot.replaced += 1
        self._spawn(slot)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL_S)
            for slot in self.slots:
                if not slot.ready or slot.broken:
                    continue
                generation = slot.generation
                if not await self._alive(slot) and slot.generation == generation:
                    self._replace(slot)
            self._dispatch()

    # -- leases -------------------------------------------------------------------------------
    def _end_lease(self, slot: _Slot) -> None:
        if slot.lease is not None:
            story, shot, since, since_unix = slot.lease
            held = time.monotonic() - since
            slot.busy_s += held
            self.history.append((slot.index, story, shot, since_unix, since_unix + held))
            slot.lease = None
            slot.idle_since = time.monotonic()

    def _dispatch(self) -> None:
        while self.waiters:
            # Only generators that have loaded the model: a lease starts the director's step clock.
            free = [s for s in self.slots if s.lease is None and not s.broken and s.ready]
            if not free:
                return
            # Tenants in turn: the waiter whose tenant was served longest ago, first come among equals.
            waiter = min(self.waiters, key=lambda w: self.served.get(w[3], -1))
            self.waiters.remove(waiter)
            story, shot, fut, tenant = waiter
            if fut.done():
                continue
            self._tick += 1
            self.served[tenant] = self._tick
            slot = min(free, key=lambda s: s.idle_since)  # the longest idle
            slot.lease = (story, shot, time.monotonic(), time.time())
            slot.leases += 1
            self.calls[f"{story}/{shot}"] += 1
            fut.set_result({"slot": slot.index, "generation": slot.generation, "name": slot.name, "handle": slot.handle})

    async def acquire(self, story: str, shot: int, tenant: str | None = None) -> dict | None:
        """Wait for a generator; returns {slot, generation, name, handle}, or None when the request
        was withdrawn by `release_story`. Tenants take turns; within a tenant, first come first served."""
        self._ensure_started()
        if all(s.broken for s in self.slots):
            raise RuntimeError(f"no shot generator could start: {self.slots[0].broken}")
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((story, shot, fut, tenant or ""))
        self._dispatch()
        await asyncio.wait([fut])
        return None if fut.cancelled() else fut.result()

    async def release(self, slot: int, generation: int, story: str, failed: bool = False) -> None:
        """End a lease. failed: the generator raised an actor error; it is replaced if it is dead."""
        s = self.slots[slot]
        if s.generation != generation or s.lease is None or s.lease[0] != story:
            return  # a lease that already ended (the generator was replaced, or the story released)
        if failed and not await self._alive(s):
            if s.generation == generation:
                self._replace(s)
        else:
            self._end_lease(s)
        self._dispatch()

    async def kill_story(self, story: str) -> int:
        """Kill and replace the generator making `story`'s shot (a cancel past its deadline)."""
        killed = 0
        for slot in self.slots:
            if slot.lease is not None and slot.lease[0] == story:
                self._replace(slot)
                killed += 1
        self._dispatch()
        return killed

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def release_story(self, story: str) -> int:
        """Forget a story whose director died: drop its waiting request, stop and free its generator."""
        for waiter in [w for w in self.waiters if w[0] == story]:
            self.waiters.remove(waiter)
            waiter[2].cancel()
        freed = 0
        for slot in self.slots:
            if slot.lease is not None and slot.lease[0] == story:
                slot.handle.cancel.remote(story=story)
                self._end_lease(slot)
                freed += 1
        self._dispatch()
        return freed

    # -- information --------------------------------------------------------------------------
    async def profile(self) -> dict:
        """{name, defaults} of the loaded model, from the first generator that is ready."""
        self._ensure_started()
        while self._profile is None:
            if all(s.broken for s in self.slots):
                raise RuntimeError(f"no shot generator could start: {self.slots[0].broken}")
            slot = next((s for s in self.slots if s.ready), None)
            if slot is None:
                await asyncio.sleep(0.05)
                continue
            try:
                self._profile = await slot.handle.profile_info.remote()
            except ACTOR_LOST:
                await asyncio.sleep(0.05)
        return self._profile

    async def health(self) -> dict:
        self._ensure_started()
        return {
            "generators": sum(1 for s in self.slots if s.ready and not s.broken),
            "generators_total": len(self.slots),
            "generators_busy": sum(1 for s in self.slots if s.lease is not None),
            "waiting_shots": len(self.waiters),
        }

    async def stats(self, history: bool = False) -> dict:
        """Per-generator leases and busy time (time under lease), leases per story shot, and with
        history the ended leases as [slot, story, shot, start, end] (unix seconds)."""
        self._ensure_started()
        now = time.monotonic()
        gens = []
        for s in self.slots:
            busy = s.busy_s + (now - s.lease[2] if s.lease else 0.0)
            gens.append(
                {
                    "slot": s.index,
                    "name": s.name,
                    "pid": s.pid,
                    "node": s.node,
                    "ready": s.ready,
                    "broken": s.broken,
                    "lease": None if s.lease is None else {"story": s.lease[0], "shot": s.lease[1]},
                    "leases": s.leases,
                    "busy_s": busy,
                    "replaced": s.replaced,
                }
            )
        out = {"uptime_s": time.time() - self.started, "generators": gens, "calls": dict(self.calls)}
        if history:
            out["history"] = [list(h) for h in self.history]
        return out
