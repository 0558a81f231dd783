"""Python clients of a StoryMem service.

* `StoryMemClient`: over HTTP (httpx) against the Serve API (`serve_app.py`).
* `EngineClient`: inside a Ray cluster, through the ingress deployment's handle or the engine actor.
* `AsyncEngine`: the engine actor's methods as coroutines (the Serve app's view of the engine).

All three speak the same data (`actors.api.StoryStatus`, `storymem.progress.ProgressEvent`) and raise
the same typed errors, each carrying the server's `(field, problem)` list:

    client = StoryMemClient("http://127.0.0.1:8000", token=os.environ["STORYMEM_API_TOKEN"])
    story = client.submit("story.json", {"num_inference_steps": 20})
    client.wait(story)                      # a progress bar from the event stream
    client.fetch_video(story, "story.mp4")
"""

from __future__ import annotations

import base64
import builtins
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from actors.api import EngineFull, StoryConflict, StoryNotFound, StoryState, StoryStatus
from .progress import Phase, ProgressEvent
from .script import GenerationSettings, ScriptError, load_request

# ---------------------------------------------------------------------------------------- errors


class StoryMemError(RuntimeError):
    """A request the service refused or could not serve. `errors`: the server's (field, problem)
    pairs; `status`: the HTTP status (or its equivalent in-cluster)."""

    status_code = 500

    def __init__(self, status: int, errors: list[tuple[str, str]], retry_after_s: float | None = None):
        # The constructor arguments are kept as `args` so that the error pickles across Ray.
        super().__init__(status, [tuple(e) for e in errors], retry_after_s)
        self.status = status
        self.errors = [(str(f), str(p)) for f, p in errors]
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        text = "; ".join(f"{f}: {p}" for f, p in self.errors) or "error"
        return f"HTTP {self.status}: {text}"

    def detail(self) -> list[dict]:
        """The JSON error body's `detail` list."""
        return [{"field": f, "problem": p} for f, p in self.errors]


class InvalidRequest(StoryMemError, ValueError):
    """Malformed request: bad JSON, a bad field, an oversize body, a wrong content type (400/413/415/422)."""

    status_code = 422


class Unauthorized(StoryMemError):
    """Missing or wrong bearer token (401)."""

    status_code = 401


class NotFound(StoryMemError):
    """No such story, shot or route (404)."""

    status_code = 404


class Conflict(StoryMemError):
    """The story's state does not allow this yet, e.g. its video before it is done (409)."""

    status_code = 409


class QueueFull(StoryMemError):
    """The engine's queue is full; retry after `retry_after_s` (429)."""

    status_code = 429


class ServiceUnavailable(StoryMemError):
    """The engine or the storage did not answer, or the server failed (5xx)."""

    status_code = 503


def error_for_status(status: int, errors: list[tuple[str, str]], retry_after_s: float | None = None) -> StoryMemError:
    """The typed error for an HTTP status."""
    kind: type[StoryMemError]
    if status == 401 or status == 403:
        kind = Unauthorized
    elif status == 404:
        kind = NotFound
    elif status == 409:
        kind = Conflict
    elif status == 429:
        kind = QueueFull
    elif 400 <= status < 500:
        kind = InvalidRequest
    else:
        kind = ServiceUnavailable
    return kind(status, errors, retry_after_s)


def engine_error(exc: BaseException, story_id: str | None = None) -> BaseException:
    """Map an engine exception (already unwrapped from Ray) to the typed client error, or return it."""
    if isinstance(exc, StoryMemError):
        return exc
    if isinstance(exc, ScriptError):
        return InvalidRequest(422, exc.errors)
    if isinstance(exc, EngineFull):
        return QueueFull(429, [("<queue>", str(exc))], retry_after_s=float(exc.retry_after_s))
    if isinstance(exc, StoryNotFound):
        return NotFound(404, [("id", "no story has this id")])
    if isinstance(exc, StoryConflict):
        return Conflict(409, [("id", str(exc))])
    return exc


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The user exception inside a Ray task error; actor loss and timeouts become ServiceUnavailable."""
    try:
        from ray import exceptions as rex
    except ImportError:  # a pure HTTP client need not have Ray
        return exc
    if isinstance(exc, rex.RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        return exc.cause
    if isinstance(exc, (rex.RayActorError, rex.GetTimeoutError, rex.ActorUnavailableError)):
        return ServiceUnavailable(503, [("<engine>", f"the engine did not answer ({type(exc).__name__})")])
    return exc


# ---------------------------------------------------------------------------------------- data


class StoryPage(BaseModel):
    """One page of GET /v1/stories."""

    items: list[StoryStatus]
    total: int = Field(description="Stories matching the filter.")
    offset: int = 0
    limit: int = 20


def build_request(script: str | os.PathLike | dict, settings: dict | GenerationSettings | None = None) -> dict:
    """A submission body `{"script", "settings"?}` from a script file, JSON text or dict.

    Reference images named by `path` are read here and sent as base64 `data`, because the service
    never reads files named in a request. `settings` (fields the caller sets) override the script's.
    """
    base: Path | None = None
    if isinstance(script, dict):
        data = json.loads(json.dumps(script))  # a deep copy that is also checked to be JSON
    elif isinstance(script, (str, os.PathLike)) and not (isinstance(script, str) and script.lstrip().startswith("{")):
        path = Path(script)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ScriptError([("<file>", f"cannot read {path} ({exc.strerror or exc})")]) from None
        except json.JSONDecodeError as exc:
            raise ScriptError([("<json>", f"{path}: line {exc.lineno} column {exc.colno}: {exc.msg}")]) from None
        base = path.resolve().parent
    elif isinstance(script, str):
        try:
            data = json.loads(script)
        except json.JSONDecodeError as exc:
            raise ScriptError([("<json>", f"line {exc.lineno} column {exc.colno}: {exc.msg}")]) from None
    else:
        raise ScriptError([("<source>", f"expected a path, JSON text or a dict, got {type(script).__name__}")])
    if not isinstance(data, dict):
        raise ScriptError([("<json>", f"the top level must be a JSON object, got {type(data).__name__}")])

    if "script" in data:
        body = {"script": data["script"], **({"settings": data["settings"]} if "settings" in data else {})}
    else:
        body = {"script": {k: v for k, v in data.items() if k != "settings"}}
        if "settings" in data:
            body["settings"] = data["settings"]
    if settings is not None:
        extra = settings.model_dump(mode="json", exclude_unset=True) if isinstance(settings, BaseModel) else settings
        if not isinstance(extra, dict):
            raise ScriptError([("settings", f"expected an object, got {type(extra).__name__}")])
        own = body.get("settings") or {}
        if not isinstance(own, dict):
            raise ScriptError([("settings", f"expected an object, got {type(own).__name__}")])
        merged = {**own, **extra}
        body["settings"] = merged
    _inline_references(body, base)
    return body


def _inline_references(body: dict, base: Path | None) -> None:
    script = body.get("script")
    refs = script.get("reference_images") if isinstance(script, dict) else None
    if not isinstance(refs, builtins.list):
        return
    for i, ref in enumerate(refs):
        if isinstance(ref, dict) and isinstance(ref.get("path"), str) and "data" not in ref:
            p = Path(ref["path"]).expanduser()
            if not p.is_absolute() and base is not None:
                p = base / p
            try:
                raw = p.read_bytes()
            except OSError as exc:
                raise ScriptError(
                    [(f"script.reference_images.{i}.path", f"cannot read {p} ({exc.strerror or exc})")]
                ) from None
            refs[i] = {"data": base64.b64encode(raw).decode("ascii")}


class _Bar:
    """Two tqdm bars (shots, steps of the current shot) fed by progress events."""

    def __init__(self, story_id: str):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.story_id = story_id
        self.shots = None
        self.steps = None

    def __call__(self, e: ProgressEvent) -> None:
        if self.shots is None:
            self.shots = self._tqdm(total=e.shots_total, desc=self.story_id[-8:], unit="shot", position=0)
            self.steps = self._tqdm(total=e.steps_total or 0, desc="steps", unit="step", position=1, leave=False)
        if e.phase == Phase.ENCODE and e.shot is not None:
            self.steps.reset(total=e.steps_total or self.steps.total)
            self.steps.set_description(f"shot {e.shot + 1}/{e.shots_total}")
        elif e.phase in (Phase.DENOISE, Phase.DECODE) and e.step is not None:
            self.steps.n = e.step
            self.steps.refresh()
        elif e.phase == Phase.COMMIT and e.shot is not None:
            self.shots.n = e.shot + 1
            self.shots.refresh()
        elif e.phase.terminal:
            self.shots.set_postfix_str(e.phase.value)

    def close(self) -> None:
        for bar in (self.steps, self.shots):
            if bar is not None:
                bar.close()


def _follow(client, story_id: str, progress: bool, timeout: float | None) -> StoryStatus:
    """Consume the story's events (feeding a bar) until it ends; its final status. The timeout is
    checked as events and keep-alives arrive."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    bar = _Bar(story_id) if progress else None
    try:
        for e in client.events(story_id):
            if bar is not None:
                bar(e)
            if late():
                break
    finally:
        if bar is not None:
            bar.close()
    status = client.status(story_id)
    while not status.state.terminal:  # the stream ended early (a dropped connection, a late state)
        if late():
            raise TimeoutError(f"story {story_id} is still {status.state.value} after {timeout} s")
        time.sleep(0.5)
        status = client.status(story_id)
    return status


# ---------------------------------------------------------------------------------------- HTTP


def _q(story_id: str) -> str:
    # One path segment whatever the caller passes; the server checks the id itself.
    from urllib.parse import quote

    return quote(str(story_id), safe="")


class StoryMemClient:
    """The HTTP API's client. `token` defaults to env STORYMEM_API_TOKEN."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 30.0,
        transport=None,
    ):
        import httpx

        token = token if token is not None else os.environ.get("STORYMEM_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> StoryMemClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:  # never the token
        return f"StoryMemClient({self.base_url!r})"

    # -- plumbing
    @staticmethod
    def _raise_for(response) -> None:
        if response.status_code < 400:
            return
        errors: list[tuple[str, str]] = []
        try:
            body = response.json()
            errors = [(d["field"], d["problem"]) for d in body.get("detail", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            errors = [("<response>", response.text[:500] or response.reason_phrase)]
        retry = response.headers.get("Retry-After", "")
        retry_s = float(retry) if retry.replace(".", "", 1).isdigit() else None
        raise error_for_status(response.status_code, errors, retry_s)

    def _request(self, method: str, url: str, **kw):
        import httpx

        try:
            response = self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(503, [("<connection>", f"{self.base_url}: {type(exc).__name__}")]) from None
        self._raise_for(response)
        return response

    # -- the API
    def submit(self, script: str | os.PathLike | dict, settings: dict | GenerationSettings | None = None) -> str:
        """Submit a story (a script file, JSON text or dict; ST-Bench or flat form); returns its id."""
        return self._request("POST", "/v1/stories", json=build_request(script, settings)).json()["id"]

    def status(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._request("GET", f"/v1/stories/{_q(story_id)}").json())

    def cancel(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._request("DELETE", f"/v1/stories/{_q(story_id)}").json())

    def resume(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._request("POST", f"/v1/stories/{_q(story_id)}/resume").json())

    def list(self, offset: int = 0, limit: int = 20, state: str | StoryState | None = None) -> StoryPage:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state is not None:
            params["state"] = StoryState(state).value
        return StoryPage.model_validate(self._request("GET", "/v1/stories", params=params).json())

    def memory(self, story_id: str) -> builtins.list[dict]:
        return self._request("GET", f"/v1/stories/{_q(story_id)}/memory").json()["shots"]

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def video_url(self, story_id: str, shot: int | None = None, expires_s: int | None = None) -> dict:
        """`{"url", "expires_s", "expires_at", ...}`: a presigned link to the final video or a shot."""
        params = {} if expires_s is None else {"expires_s": expires_s}
        return self._request("GET", self._video_path(story_id, shot), params=params).json()

    @staticmethod
    def _video_path(story_id: str, shot: int | None) -> str:
        return f"/v1/stories/{_q(story_id)}/video" if shot is None else f"/v1/stories/{_q(story_id)}/shots/{shot}"

    def fetch_video(self, story_id: str, path: str | os.PathLike, shot: int | None = None) -> Path:
        """Download the final video (or shot `shot`) to `path` through the API; returns the path."""
        import httpx

        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with self._http.stream(
                "GET", self._video_path(story_id, shot), params={"download": 1}, headers={"Accept": "video/mp4"}
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
            os.replace(tmp, dest)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(503, [("<connection>", f"{self.base_url}: {type(exc).__name__}")]) from None
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def events(self, story_id: str, after: int = 0, reconnects: int = 5) -> Iterator[ProgressEvent]:
        """The story's progress events from the SSE stream, until a terminal phase. A dropped
        connection is resumed from the last event seen (Last-Event-ID)."""
        import httpx

        last = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            # The server sends a keep-alive comment well within this read timeout.
            timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 60.0))
            try:
                with self._http.stream(
                    "GET", f"/v1/stories/{_q(story_id)}/events", headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise_for(response)
                    for kind, seq, data in _parse_sse(response.iter_lines()):
                        failures = 0
                        if kind == "progress":
                            event = ProgressEvent.model_validate_json(data)
                            last = max(last, event.seq)
                            yield event
                            if event.phase.terminal:
                                return
                        elif kind == "status":
                            return  # the story ended without a terminal event left in the log
                        elif kind == "error":
                            detail = json.loads(data).get("detail", [])
                            raise ServiceUnavailable(503, [(d["field"], d["problem"]) for d in detail])
                return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                failures += 1
                if failures > reconnects:
                    lost = [("<connection>", f"event stream lost ({type(exc).__name__})")]
                    raise ServiceUnavailable(503, lost) from None
                time.sleep(min(2.0**failures * 0.25, 5.0))

    def wait(self, story_id: str, progress: bool = True, timeout: float | None = None) -> StoryStatus:
        """Follow the story until it is done, failed or cancelled (a tqdm bar when `progress`); returns
        its final status. `timeout` seconds: raise TimeoutError when it has not ended by then."""
        return _follow(self, story_id, progress, timeout)


def _parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, int | None, str]]:
    """(event, id, data) per server-sent event; comments and unknown fields are skipped."""
    kind, seq, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield kind, seq, "\n".join(data)
            kind, seq, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            seq = int(value) if value.isdigit() else None


# ---------------------------------------------------------------------------------------- in-cluster


class AsyncEngine:
    """The engine actor's methods as coroutines with unwrapped, typed errors (ScriptError,
    EngineFull, StoryNotFound, StoryConflict stay as the engine raised them)."""

    def __init__(self, handle):
        self.handle = handle

    async def _call(self, method: str, *args, **kwargs):
        try:
            return await getattr(self.handle, method).remote(*args, **kwargs)
        except Exception as exc:
            raise unwrap_ray_error(exc) from None

    async def submit(self, request: dict, owner: str | None = None) -> dict:
        return await self._call("submit", request, owner)

    async def status(self, story_id: str) -> dict:
        return await self._call("status", story_id)

    async def events(self, story_id: str, after: int = 0, timeout: float = 0.0) -> builtins.list[dict]:
        return await self._call("events", story_id, after, timeout)

    async def cancel(self, story_id: str) -> dict:
        return await self._call("cancel", story_id)

    async def resume(self, story_id: str) -> dict:
        return await self._call("resume", story_id)

    async def list(self, offset: int = 0, limit: int = 20, state: str | None = None) -> dict:
        return await self._call("list", offset, limit, state)

    async def memory(self, story_id: str) -> builtins.list[dict]:
        return await self._call("memory", story_id)

    async def health(self) -> dict:
        return await self._call("health")


class EngineClient:
    """The client's methods for code running inside the Ray cluster (batch jobs, other deployments).

    `handle`: the ingress deployment's `DeploymentHandle` (`serve.get_app_handle("storymem")`, same
    validation and limits as HTTP) or the engine actor's handle (`actors.api.get_engine()`, direct).
    `store`: where videos are read from with the engine handle (default: S3 from the environment).
    Errors are the HTTP client's typed errors.
    """

    def __init__(self, handle, store=None, call_timeout_s: float = 120.0):
        from ray.serve.handle import DeploymentHandle

        self.handle = handle
        self.via_serve = isinstance(handle, DeploymentHandle)
        self._store = store
        self.call_timeout_s = call_timeout_s

    @classmethod
    def connect(cls, namespace: str = "storymem", address: str = "auto", store=None) -> EngineClient:
        """Join the running cluster (unless this process already has) and use its engine actor."""
        import ray

        from actors.api import get_engine

        if not ray.is_initialized():
            ray.init(address=address, logging_level="WARNING")
        return cls(get_engine(namespace), store=store)

    def _call(self, method: str, *args, timeout: float | None = None):
        timeout = self.call_timeout_s if timeout is None else timeout
        try:
            if self.via_serve:
                return getattr(self.handle, method).remote(*args).result(timeout_s=timeout)
            import ray

            return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout)
        except Exception as exc:
            raise engine_error(unwrap_ray_error(exc)) from None

    def submit(self, script: str | os.PathLike | dict, settings: dict | GenerationSettings | None = None) -> str:
        body = build_request(script, settings)
        if not self.via_serve:
            try:  # the ingress validates on its side; straight to the engine, check here first
                load_request(body, allow_paths=False)
            except ScriptError as exc:
                raise InvalidRequest(422, exc.errors) from None
            return self._call("submit", body, None)["id"]
        return self._call("submit", body)["id"]

    def status(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._call("status", story_id))

    def cancel(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._call("cancel", story_id))

    def resume(self, story_id: str) -> StoryStatus:
        return StoryStatus.model_validate(self._call("resume", story_id))

    def list(self, offset: int = 0, limit: int = 20, state: str | StoryState | None = None) -> StoryPage:
        state_value = None if state is None else StoryState(state).value
        page = self._call("list", offset, limit, state_value)
        return StoryPage.model_validate({"offset": offset, "limit": limit, **page})

    def memory(self, story_id: str) -> builtins.list[dict]:
        result = self._call("memory", story_id)
        return result["shots"] if isinstance(result, dict) else result

    def health(self) -> dict:
        return self._call("health")

    def events(self, story_id: str, after: int = 0, poll_s: float = 10.0) -> Iterator[ProgressEvent]:
        """Progress events until a terminal phase (long-polling the engine)."""
        last = after
        while True:
            batch = self._call("events", story_id, last, poll_s, timeout=poll_s + self.call_timeout_s)
            for raw in batch:
                event = ProgressEvent.model_validate(raw)
                last = max(last, event.seq)
                yield event
                if event.phase.terminal:
                    return
            if not batch and self.status(story_id).state.terminal:
                return

    def wait(self, story_id: str, progress: bool = True, timeout: float | None = None) -> StoryStatus:
        """Like `StoryMemClient.wait`."""
        return _follow(self, story_id, progress, timeout)

    def _video_key(self, story_id: str, shot: int | None) -> str:
        from .storage import StoryLayout

        status = self.status(story_id)
        if shot is None:
            if status.state != StoryState.DONE or not status.video_key:
                raise Conflict(409, [("id", f"the story is {status.state.value}; its video exists once it is done")])
            return status.video_key
        if not 0 <= shot < status.shots_total:
            raise NotFound(404, [("k", f"shot {shot} is outside 0..{status.shots_total - 1}")])
        if shot >= status.shots_done:
            raise Conflict(409, [("k", f"shot {shot} is not committed yet ({status.shots_done} done)")])
        return StoryLayout(story_id).shot(shot)

    def fetch_video(self, story_id: str, path: str | os.PathLike, shot: int | None = None) -> Path:
        """Write the final video (or shot `shot`) to `path`; returns the path."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.via_serve:
            data = self._call("video_bytes", story_id, shot)
            tmp = dest.with_name(f".{dest.name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
            return dest
        key = self._video_key(story_id, shot)
        if self._store is None:
            from .config import StorageConfig
            from .storage import S3Store

            self._store = S3Store(StorageConfig.from_env())
        self._store.get_file(key, dest)
        return dest


def retry_after(exc: QueueFull, default: float = 1.0) -> float:
    """Seconds to wait before resubmitting after a QueueFull."""
    value = exc.retry_after_s if exc.retry_after_s is not None else default
    return max(0.1, float(value)) if math.isfinite(value) else default


__all__ = [
    "StoryMemClient",
    "EngineClient",
    "AsyncEngine",
    "StoryPage",
    "StoryMemError",
    "InvalidRequest",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "QueueFull",
    "ServiceUnavailable",
    "build_request",
    "error_for_status",
    "engine_error",
    "unwrap_ray_error",
]
