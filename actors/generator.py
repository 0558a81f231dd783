"""The shot generator: one actor holding a loaded StoryMemPipeline, making one shot at a time.

`generate` is a streaming method: it yields `{"step", "total"}` after every denoising step, then the
frames (their own object, owned by the caller, so they can be handed on without a copy), then
`{"mode", "timings", "generator", "generator_s"}`. Control methods (cancel, info) run in their own
concurrency group, so they answer while a shot is being made; `generate` itself runs one at a time.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time

import numpy as np
import ray

from storymem.config import EngineConfig, ModelConfig
from storymem.speed import SpeedConfig
from storymem.story import ShotRequest, StoryCancelled


class ShotGenerator:
    """The actor's class, undecorated, so that a gang's leader (actors/gang.py) can extend it."""

    def __init__(self, model_cfg: ModelConfig, name: str, threads: int | None = None, speed: SpeedConfig | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.name = name
        self.pipe, self.profile = self._build(model_cfg, speed)
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._current: tuple[str, str] | None = None  # (token, story) of the shot being made
        self.calls = 0
        self.busy_s = 0.0
        self.started = time.time()

    def _build(self, model_cfg: ModelConfig, speed: SpeedConfig | None):
        """(pipeline, profile); a gang leader builds its rank's share of a parallel pipeline instead."""
        from storymem.pipeline import build_pipeline

        return build_pipeline(model_cfg, speed)

    def generate(self, request: ShotRequest, token: str):
        """Make one shot; stops between denoising steps once `cancel` names its token or story."""
        with self._lock:
            if token in self._cancelled:
                self._cancelled.discard(token)
                raise StoryCancelled("cancelled by request")
            self._current = (token, request.story)
            self.calls += 1
        # Arrays from the object store are read-only views; torch wants writable ones (small: memory).
        request = dataclasses.replace(
            request,
            memory=[np.array(m) for m in request.memory],
            motion_frames=None if request.motion_frames is None else np.array(request.motion_frames),
        )
        events: queue.Queue = queue.Queue()

        def on_step(step: int, total: int) -> None:
            if token in self._cancelled:
                raise StoryCancelled("cancelled by request")
            events.put(("step", step, total))

        def work() -> None:
            try:
                self.pipe.activate_lora(request.transition)  # the LoRA set of the story's transition
                out = self.pipe(**request.pipeline_kwargs(), step_callback=on_step)
                events.put(("done", out))
            except BaseException as e:  # handed to the streaming side, which re-raises it
                events.put(("error", e))

        t0 = time.perf_counter()
        # The pipeline reports steps through a callback; a thread turns them into yields.
        thread = threading.Thread(target=work, name=f"{self.name}-shot", daemon=True)
        thread.start()
        try:
            while True:
                kind, *rest = events.get()
                if kind == "step":
                    yield {"step": rest[0], "total": rest[1]}
                elif kind == "error":
                    raise rest[0]
                else:
                    out = rest[0]
                    elapsed = time.perf_counter() - t0
                    yield out.frames
                    yield {
                        "mode": out.mode, "timings": out.timings, "generator": self.name, "generator_s": elapsed,
                        "model": out.model, "notes": list(out.notes),
                    }  # fmt: skip
                    return
        finally:
            if thread.is_alive():  # the stream was closed early: stop the shot at its next step
                self._cancelled.add(token)
            thread.join()
            with self._lock:
                self.busy_s += time.perf_counter() - t0
                self._current = None
                self._cancelled.discard(token)

    @ray.method(concurrency_group="control")
    def cancel(self, token: str | None = None, story: str | None = None) -> bool:
        """Stop the shot with this token (also before it starts) or the running shot of `story`."""
        with self._lock:
            if token is not None:
                self._cancelled.add(token)
                return True
            if story is not None and self._current is not None and self._current[1] == story:
                self._cancelled.add(self._current[0])
                return True
        return False

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        with self._lock:
            current = self._current
        return {
            "name": self.name,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "calls": self.calls,
            "busy_s": self.busy_s,
            "uptime_s": time.time() - self.started,
            "story": None if current is None else current[1],
        }

    @ray.method(concurrency_group="control")
    def profile_info(self) -> dict:
        """The loaded model's name, the settings defaults stories resolve against and the transitions
        its LoRA sets serve."""
        return {
            "name": self.profile.name,
            "defaults": dict(self.profile.defaults),
            "transitions": sorted(self.profile.transitions),
        }


ShotGeneratorActor = ray.remote(concurrency_groups={"control": 4}, max_restarts=0)(ShotGenerator)


def generator_options(engine: EngineConfig) -> dict:
    """Ray options of a generator actor from the engine configuration."""
    options = {"num_cpus": engine.cpus_per_generator, "num_gpus": engine.gpus_per_generator}
    if engine.generator_resources:
        options["resources"] = dict(engine.generator_resources)
    return options
