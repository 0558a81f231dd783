"""Handles on the service from inside the Ray cluster.

* `AsyncEngine`: the engine actor's contract methods (`ENGINE_METHODS`) as coroutines, with the
  contract's errors unwrapped from Ray's and actor loss as ServiceUnavailable. What the Serve
  ingress's `StoryService` holds.
* `EngineClient`: the HTTP client's methods for code in the cluster (batch jobs, other
  deployments), through the ingress deployment (`serve.get_app_handle("storymem")`) or straight
  to the engine actor, then through a `StoryService` of its own: either way the request is
  validated once, by the same facade.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from storymem.client import build_request
from storymem.config import StoryMemConfig
from storymem.progress import ProgressEvent
from storymem.script import GenerationSettings
from storymem.service import follow as _follow
from storymem.service.contract import ENGINE_METHODS, ServiceUnavailable, StoryMemError, StoryPage, StoryState, StoryStatus
from storymem.service.facade import StoryService


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The contract error inside a Ray task error; actor loss and timeouts become ServiceUnavailable."""
    from ray import exceptions as rex

    if isinstance(exc, rex.RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    if isinstance(exc, (rex.RayActorError, rex.GetTimeoutError, rex.ActorUnavailableError)):
        return ServiceUnavailable(503, [("<engine>", f"the engine did not answer ({type(exc).__name__})")])
    return exc


class AsyncEngine:
    """The engine actor's ENGINE_METHODS as coroutines."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, name: str):
        if name not in ENGINE_METHODS:
            raise AttributeError(name)

        async def call(*args, **kwargs):
            try:
                return await getattr(self.handle, name).remote(*args, **kwargs)
            except Exception as exc:
                raise unwrap_ray_error(exc) from None

        return call


class EngineClient:
    """StoryMemClient's methods in-cluster. `handle`: the ingress deployment's DeploymentHandle or
    the engine actor's handle; `cfg` (default from the environment) gives the store and limits."""

    def __init__(self, handle, cfg: StoryMemConfig | None = None, call_timeout_s: float = 120.0):
        from ray.serve.handle import DeploymentHandle

        self.handle = handle
        self.via_serve = isinstance(handle, DeploymentHandle)
        self.call_timeout_s = call_timeout_s
        self._service = None
        if not self.via_serve:
            from storymem.storage import S3Store

            cfg = cfg or StoryMemConfig()
            # Trusted in-cluster code: the facade without a token, as the admin.
            service_cfg = cfg.service.model_copy(update={"allow_no_auth": True, "api_token": None, "api_keys": {}})
            cfg = cfg.model_copy(update={"service": service_cfg})
            self._service = StoryService(AsyncEngine(handle), S3Store(cfg.storage), cfg)
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="engine-client", daemon=True).start()

    @classmethod
    def connect(cls, namespace: str = "storymem", address: str = "auto", cfg: StoryMemConfig | None = None) -> EngineClient:
        """Join the running cluster (unless this process already has) and use its engine actor."""
        import ray

        from .api import get_engine

        if not ray.is_initialized():
            ray.init(address=address, logging_level="WARNING")
        return cls(get_engine(namespace), cfg=cfg)

    def _call(self, method: str, *args, timeout: float | None = None):
        timeout = self.call_timeout_s if timeout is None else timeout
        try:
            if self.via_serve:
                return getattr(self.handle, method).remote(*args).result(timeout_s=timeout)
            future = asyncio.run_coroutine_threadsafe(getattr(self._service, method)(*args), self._loop)
            return future.result(timeout)
        except StoryMemError:
            raise
        except Exception as exc:
            raise unwrap_ray_error(exc) from None

    def submit(
        self,
        script: str | os.PathLike | dict,
        settings: dict | GenerationSettings | None = None,
        idempotency_key: str | None = None,
        retries: int = 4,
    ) -> str:
        """Submit a story; returns its id. Retried on lost calls with one Idempotency-Key."""
        body = build_request(script, settings)
        key = idempotency_key or uuid.uuid4().hex
        for attempt in range(retries + 1):
            try:
                return self._submit_once(body, key)
            except ServiceUnavailable:
                if attempt == retries:
                    raise
                time.sleep(min(0.25 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def _submit_once(self, body: dict, key: str) -> str:
        if self.via_serve:
            return self._call("submit", body, key)["id"]
        from storymem.service.facade import ADMIN

        return self._call("submit", body, ADMIN, key)["id"]

    def status(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._call("status", story_id))

    def cancel(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._call("cancel", story_id))

    def resume(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._call("resume", story_id))

    def list(self, offset: int = 0, limit: int = 20, state: str | StoryState | None = None) -> StoryPage:
        state_value = None if state is None else StoryState(state).value
        return StoryPage.model_validate(self._call("list", offset, limit, state_value))

    def memory(self, story_id: str) -> builtins.list[dict]:
        return self._call("memory", story_id)["shots"]

    def health(self) -> dict:
        return self._call("health")

    def events(self, story_id: str, after: int = 0, poll_s: float = 10.0) -> Iterator[ProgressEvent]:
        """Progress events until the story ends (long-polling)."""

        def fetch(last: int) -> list:
            return self._call("events", story_id, last, poll_s, timeout=poll_s + self.call_timeout_s)

        return _follow.follow(fetch, after, lambda: self.status(story_id).state.terminal)

    def wait(self, story_id: str, progress: bool = True, timeout: float | None = None) -> StoryStatus:
        """Like `StoryMemClient.wait`."""
        return _follow.wait(self, story_id, progress, timeout)

    def fetch_video(self, story_id: str, path: str | os.PathLike, shot: int | None = None) -> Path:
        """Write the final video (or shot `shot`) to `path`; returns the path."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            if self.via_serve:
                tmp.write_bytes(self._call("video_bytes", story_id, shot))
            else:
                chunks = self._call("video_stream", story_id, shot)
                with open(tmp, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


__all__ = ["AsyncEngine", "EngineClient", "unwrap_ray_error"]
