"""The Python client of a StoryMem service over HTTP (httpx), against the Serve API (`serve_app.py`).

Inside a Ray cluster, `actors.client.EngineClient` has the same methods without HTTP. Both speak
the contract's data (`storymem.service.contract.StoryStatus`, `storymem.progress.ProgressEvent`)
and raise its typed errors, each carrying the server's `(field, problem)` list:

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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .progress import ProgressEvent
from .script import GenerationSettings, ScriptError
from .service import follow as _follow
from .service.contract import (
    Conflict,
    InvalidRequest,
    NotFound,
    QueueFull,
    ServiceUnavailable,
    StoryMemError,
    StoryPage,
    StoryState,
    StoryStatus,
    Unauthorized,
    error_for_status,
)

# ---------------------------------------------------------------------------------------- data


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
        retry_s = float(retry) if retry.isascii() and retry.replace(".", "", 1).isdigit() else None
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
    def submit(
        self,
        script: str | os.PathLike | dict,
        settings: dict | GenerationSettings | None = None,
        idempotency_key: str | None = None,
        retries: int = 4,
    ) -> str:
        """Submit a story (a script file, JSON text or dict; ST-Bench or flat form); returns its id.

        The request carries an Idempotency-Key (a new one unless given), so it is retried on
        network errors up to `retries` times without ever making the story twice."""
        body = build_request(script, settings)
        key = idempotency_key or uuid.uuid4().hex
        for attempt in range(retries + 1):
            try:
                return self._request("POST", "/v1/stories", json=body, headers={"Idempotency-Key": key}).json()["id"]
            except ServiceUnavailable as exc:
                if attempt == retries or exc.errors[:1] and exc.errors[0][0] != "<connection>":
                    raise
                time.sleep(min(0.25 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

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
        """The story's progress events from the SSE stream until the server ends it (after a
        terminal event that nothing follows). A dropped connection is resumed from the last event
        seen (Last-Event-ID)."""
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
        return _follow.wait(self, story_id, progress, timeout)


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
            seq = int(value) if value.isascii() and value.isdigit() else None


def retry_after(exc: QueueFull, default: float = 1.0) -> float:
    """Seconds to wait before resubmitting after a QueueFull."""
    value = exc.retry_after_s if exc.retry_after_s is not None else default
    return max(0.1, float(value)) if math.isfinite(value) else default


__all__ = [
    "StoryMemClient",
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
    "retry_after",
]
