"""StoryMem's HTTP API: a FastAPI app behind Ray Serve, over the story engine (actors/api.py).

    serve run serve_app:build_app config=storymem.yaml          # or `serve deploy` with a config file
    make serve                                                  # Ray head + S3 + engine + this app

Routes (all under /v1 need `Authorization: Bearer <token>`; /healthz does not):

    POST   /v1/stories                 a script (ST-Bench or flat form) + settings -> 202 {id, ...}
    GET    /v1/stories                 paged list: offset, limit (<= service.page_size_max), state
    GET    /v1/stories/{id}            state, shots done of total, current shot and step, timings, error
    GET    /v1/stories/{id}/events     progress as server-sent events (resumable with Last-Event-ID)
    GET    /v1/stories/{id}/video      presigned URL (JSON) or the MP4 (?download=1 or Accept: video/mp4)
    GET    /v1/stories/{id}/shots/{k}  the same for shot k (0-based) once committed
    GET    /v1/stories/{id}/memory     the keyframes in memory for each shot, with image links
    POST   /v1/stories/{id}/resume     continue a failed or cancelled story from its last committed shot
    DELETE /v1/stories/{id}            cancel
    GET    /healthz                    liveness of the API and the engine
    GET    /docs, /openapi.json        OpenAPI
    GET    /, /board/...               the storyboard page (static; no token, the page sends it)

Every error is `{"detail": [{"field": ..., "problem": ...}]}` with a 4xx/5xx status. Story ids are
made by the server and checked against its pattern; no request names a path or an object key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.api import StoryState, StoryStatus, get_engine
from storymem.client import (
    AsyncEngine,
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    StoryMemError,
    StoryPage,
    Unauthorized,
    engine_error,
)
from storymem.board import mount as mount_board
from storymem.board import stored_story
from storymem.config import ServiceConfig, StoryMemConfig, load_config
from storymem.progress import Phase
from storymem.script import ScriptError, StoryRequest, load_request
from storymem.storage import STORY_ID_RE, S3Store, StorageError, StoryLayout

log = logging.getLogger("storymem.serve")

API_VERSION = "v1"
APP_NAME = "storymem"
MIN_TOKEN_CHARS = 16
_ID_PROBLEM = "not a story id (1 to 64 letters, digits, '_' or '-', starting with a letter or digit)"


# ---------------------------------------------------------------------------------------- models


class ErrorItem(BaseModel):
    field: str = Field(description="The request field at fault, dotted (script.shots.0.prompt), or <json>, id, ...")
    problem: str


class ErrorBody(BaseModel):
    detail: list[ErrorItem]


class SubmitResponse(StoryStatus):
    links: dict[str, str] = Field(description="Where to follow the story.")


class VideoLink(BaseModel):
    id: str
    shot: int | None = Field(None, description="Shot index, or None for the final video.")
    url: str = Field(description="Presigned GET URL of the MP4.")
    expires_s: int
    expires_at: float = Field(description="Unix time the URL stops working.")
    content_type: str = "video/mp4"


class MemoryReport(BaseModel):
    id: str
    expires_s: int
    shots: list[dict] = Field(
        description="Per committed shot: index, prompt, cut, mode, frames, keyframes [{frame, key, url, "
        "aesthetic, similarity_prev}] taken into memory, and memory_used [{shot, frame, source, slot: "
        "sink|window, url?}] the shot was conditioned on."
    )
    script: dict | None = Field(
        None, description="The story's script as stored once it started: story_name, story_overview, shots "
        "[{prompt, cut, scene}], reference_images (data: URIs). None while queued."
    )
    settings: dict | None = Field(None, description="The story's resolved generation settings, once it started.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "Missing or wrong bearer token."),
        (404, "No such story (or shot)."),
        (422, "A parameter is malformed; `detail` names it."),
    )
}


# ---------------------------------------------------------------------------------------- security


def check_security(cfg: ServiceConfig) -> bytes | None:
    """The API token as bytes, or None when `allow_no_auth` is set; refuses weak or missing tokens."""
    token = cfg.api_token.get_secret_value() if cfg.api_token is not None else ""
    if not token:
        if cfg.allow_no_auth:
            log.warning("the StoryMem API runs WITHOUT authentication (service.allow_no_auth is set)")
            return None
        raise ValueError(
            "service.api_token: no API token is configured; set STORYMEM_API_TOKEN (or service.api_token), "
            "or set service.allow_no_auth for a machine whose API port nobody else can reach"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"service.api_token: must be at least {MIN_TOKEN_CHARS} characters")
    if not token.isprintable() or any(c.isspace() for c in token) or not token.isascii():
        raise ValueError("service.api_token: must be printable ASCII without spaces")
    return token.encode()


def check_id(story_id: str) -> str:
    if not STORY_ID_RE.match(story_id):
        raise InvalidRequest(422, [("id", _ID_PROBLEM)])
    return story_id


class _Presigner:
    """Presigned GETs for a public S3 host: signing is local, so nothing dials that host from here."""

    def __init__(self, cfg: StoryMemConfig):
        from minio import Minio

        s = cfg.storage
        self.bucket = s.bucket
        self._client = Minio(
            cfg.service.public_s3_endpoint,
            access_key=s.access_key.get_secret_value() or None,
            secret_key=s.secret_key.get_secret_value() or None,
            secure=cfg.service.public_s3_secure,
            region=s.region or "us-east-1",  # a set region keeps minio from asking the server
        )

    def url(self, key: str, expires_s: int) -> str:
        from datetime import timedelta

        return self._client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=expires_s))


# ---------------------------------------------------------------------------------------- service


class StoryService:
    """What the routes do, over an engine and a store; raises StoryMemError subclasses (status + fields).

    Shared by the HTTP routes and the ingress deployment's handle methods (EngineClient), so both
    apply the same validation and limits.
    """

    def __init__(self, engine: AsyncEngine, store, cfg: StoryMemConfig):
        self.engine = engine
        self.store = store
        self.cfg = cfg
        self.token = check_security(cfg.service)
        self._presigner = _Presigner(cfg) if cfg.service.public_s3_endpoint else None
        self._status_cache: dict[str, tuple[float, dict]] = {}
        self._status_calls: dict[str, asyncio.Future] = {}

    @classmethod
    def connect(cls, cfg: StoryMemConfig) -> StoryService:
        """The running engine (started here when none runs and service.start_engine), and the bucket."""
        check_security(cfg.service)
        try:
            handle = get_engine(cfg.engine.namespace)
        except ValueError:
            if not cfg.service.start_engine:
                raise
            from actors import start_engine

            # Detached: the engine must outlive this replica (other replicas and batch jobs use it).
            engine_cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"detached": True})})
            handle = start_engine(engine_cfg)
        return cls(AsyncEngine(handle), S3Store(cfg.storage), cfg)

    async def _engine(self, coro):
        try:
            return await coro
        except StoryMemError:
            raise
        except Exception as exc:
            mapped = engine_error(exc)
            if isinstance(mapped, StoryMemError):
                raise mapped from None
            log.exception("engine call failed")
            raise ServiceUnavailable(503, [("<engine>", "the engine failed to answer")]) from None

    async def _storage(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except KeyError:
            raise NotFound(404, [("id", "the object is missing from storage")]) from None
        except StorageError:
            log.exception("storage call failed")
            raise ServiceUnavailable(503, [("<storage>", "the object store did not answer")]) from None

    # -- stories
    async def submit(self, data: Any) -> dict:
        """Validate a parsed JSON body and hand it to the engine; nothing is stored when it is rejected."""
        if not isinstance(data, dict):
            raise InvalidRequest(422, [("<json>", f"the body must be a JSON object, got {type(data).__name__}")])
        try:
            load_request(data, allow_paths=False)
        except ScriptError as exc:
            raise InvalidRequest(422, exc.errors) from None
        # The engine gets what the client wrote (unset settings stay unset, so that the model
        # profile's defaults apply), in the wrapped form.
        if "script" in data:
            body = {k: data[k] for k in ("script", "settings") if k in data}
        else:
            body = {"script": {k: v for k, v in data.items() if k != "settings"}}
            if "settings" in data:
                body["settings"] = data["settings"]
        return await self._engine(self.engine.submit(body, None))

    async def status(self, story_id: str) -> dict:
        return await self._engine(self.engine.status(check_id(story_id)))

    async def polled_status(self, story_id: str) -> dict:
        """status() for pollers: answered from a copy at most service.status_cache_s old, and
        concurrent polls of one story share one engine call (many pollers, one engine actor)."""
        ttl = self.cfg.service.status_cache_s
        if ttl <= 0:
            return await self.status(story_id)
        hit = self._status_cache.get(story_id)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return hit[1]
        call = self._status_calls.get(story_id)
        if call is None:
            call = asyncio.ensure_future(self.status(story_id))
            self._status_calls[story_id] = call
            call.add_done_callback(lambda f: self._call_done(story_id, f))
        result = await asyncio.shield(call)  # a poller that hangs up must not cancel the others' call
        now = time.monotonic()
        if len(self._status_cache) >= 4096:
            self._status_cache = {k: v for k, v in self._status_cache.items() if now - v[0] < ttl}
        self._status_cache[story_id] = (now, result)
        return result

    def _call_done(self, story_id: str, call: asyncio.Future) -> None:
        self._status_calls.pop(story_id, None)
        if not call.cancelled():
            call.exception()  # retrieved here too, so an error nobody awaited any more is not logged

    async def cancel(self, story_id: str) -> dict:
        self._status_cache.pop(story_id, None)
        return await self._engine(self.engine.cancel(check_id(story_id)))

    async def resume(self, story_id: str) -> dict:
        self._status_cache.pop(story_id, None)
        return await self._engine(self.engine.resume(check_id(story_id)))

    async def list(self, offset: int = 0, limit: int = 20, state: str | None = None) -> dict:
        errors = []
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            errors.append(("offset", "must be an integer >= 0"))
        top = self.cfg.service.page_size_max
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= top:
            errors.append(("limit", f"must be an integer in 1..{top}"))
        if state is not None and state not in {s.value for s in StoryState}:
            errors.append(("state", f"must be one of {', '.join(s.value for s in StoryState)}"))
        if errors:
            raise InvalidRequest(422, errors)
        page = await self._engine(self.engine.list(offset, limit, state))
        return {"items": page["items"], "total": page["total"], "offset": offset, "limit": limit}

    async def events(self, story_id: str, after: int = 0, timeout: float = 0.0) -> list[dict]:
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise InvalidRequest(422, [("after", "must be an integer >= 0")])
        timeout = min(max(float(timeout), 0.0), 60.0)
        return await self._engine(self.engine.events(check_id(story_id), after, timeout))

    async def health(self) -> dict:
        try:
            engine = await asyncio.wait_for(self.engine.health(), timeout=10.0)
        except Exception as exc:
            log.warning("engine health check failed: %s", type(exc).__name__)
            raise ServiceUnavailable(503, [("<engine>", "the engine did not answer")]) from None
        return {"status": "ok", "api": API_VERSION, "engine": engine}

    # -- artefacts
    def _expiry(self, expires_s: int | None) -> int:
        top = self.cfg.storage.presign_expiry_s
        if expires_s is None:
            return top
        if isinstance(expires_s, bool) or not isinstance(expires_s, int) or not 60 <= expires_s <= top:
            raise InvalidRequest(422, [("expires_s", f"must be an integer in 60..{top}")])
        return expires_s

    def _presign(self, key: str, expires_s: int) -> str:
        if self._presigner is not None:
            return self._presigner.url(key, expires_s)
        return self.store.url(key, expires_s)

    async def video_key(self, story_id: str, shot: int | None) -> str:
        status = StoryStatus.model_validate(await self.status(story_id))
        if shot is None:
            if status.state != StoryState.DONE or not status.video_key:
                raise Conflict(409, [("id", f"the story is {status.state.value}; its video exists once it is done")])
            return status.video_key
        if isinstance(shot, bool) or not isinstance(shot, int) or shot < 0:
            raise InvalidRequest(422, [("k", "must be an integer >= 0")])
        if shot >= status.shots_total:
            raise NotFound(404, [("k", f"the story has {status.shots_total} shots (0..{status.shots_total - 1})")])
        if shot >= status.shots_done:
            raise Conflict(409, [("k", f"shot {shot} is not committed yet ({status.shots_done} done)")])
        return StoryLayout(story_id).shot(shot)

    async def video_link(self, story_id: str, shot: int | None = None, expires_s: int | None = None) -> dict:
        seconds = self._expiry(expires_s)
        key = await self.video_key(story_id, shot)
        url = await self._storage(self._presign, key, seconds)
        return {"id": story_id, "shot": shot, "url": url, "expires_s": seconds, "expires_at": time.time() + seconds}

    async def video_bytes(self, story_id: str, shot: int | None = None) -> bytes:
        key = await self.video_key(story_id, shot)
        return await self._storage(self.store.get_bytes, key)

    async def memory(self, story_id: str, expires_s: int | None = None) -> dict:
        seconds = self._expiry(expires_s)
        shots = await self._engine(self.engine.memory(check_id(story_id)))

        def sign() -> list[dict]:
            by_frame: dict[tuple[int, int], dict] = {}
            out = []
            for record in shots:
                keyframes = [dict(kf, url=self._presign(kf["key"], seconds)) for kf in record.get("keyframes", [])]
                for kf in keyframes:
                    by_frame[(record.get("index"), kf.get("frame"))] = kf
                used = []
                for item in record.get("memory_used", []):
                    known = by_frame.get((item.get("shot"), item.get("frame")))
                    used.append(dict(item, key=known["key"], url=known["url"]) if known else dict(item))
                out.append(dict(record, keyframes=keyframes, memory_used=used))
            return out

        stored = await self._storage(stored_story, self.store, story_id)  # script and settings, for the page
        return {"id": story_id, "expires_s": seconds, "shots": await self._storage(sign), **stored}


# ---------------------------------------------------------------------------------------- HTTP


def _error_response(status: int, errors: list[tuple[str, str]], headers: dict | None = None) -> JSONResponse:
    body = {"detail": [{"field": f, "problem": p} for f, p in errors]}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyLimit:
    """Refuses bodies over `max_bytes` with 413 before the app reads (Content-Length) or while it
    reads (chunked bodies), so an oversize request is never parsed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = f"the body exceeds {self.max_bytes} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await _error_response(400, [("Content-Length", "not an integer")])(scope, receive, send)
            if too_big:
                return await _error_response(413, [("<body>", problem)])(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise InvalidRequest(413, [("<body>", problem)])
            return message

        await self.app(scope, limited, send)


def _validation_detail(exc: RequestValidationError) -> tuple[int, list[tuple[str, str]]]:
    errors, status = [], 422
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = loc.pop(0) if loc and loc[0] in ("query", "path", "header", "body", "cookie") else ""
        if err.get("type") == "json_invalid":
            status = 400
        errors.append((".".join(loc) or where or "<request>", str(err.get("msg", "invalid"))))
    return status, errors


def _sse(kind: str, data: str, seq: int | None = None) -> str:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n"


def create_app(service: StoryService | None = None) -> FastAPI:
    """The FastAPI app over `service`. Without one (for the OpenAPI schema), story routes answer 503."""
    cfg = service.cfg.service if service is not None else ServiceConfig(allow_no_auth=True)
    app = FastAPI(
        title="StoryMem API",
        version=API_VERSION,
        description="Multi-shot long video storytelling with memory (arXiv 2512.19539) as a service.",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(StoryMemError)
    async def _typed(request: Request, exc: StoryMemError):
        headers = {}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="storymem"'
        return _error_response(exc.status, exc.errors, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        status, errors = _validation_detail(exc)
        return _error_response(status, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        field = {404: "<path>", 405: "<method>"}.get(exc.status_code, "<request>")
        return _error_response(exc.status_code, [(field, str(exc.detail))], getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, [("<server>", "internal error")])

    def svc() -> StoryService:
        if service is None:
            raise ServiceUnavailable(503, [("<server>", "this app is not bound to an engine")])
        return service

    async def auth(request: Request) -> None:
        token = svc().token
        if token is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise Unauthorized(401, [("Authorization", "missing bearer token")])
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized(401, [("Authorization", "expected 'Bearer <token>'")])
        if not hmac.compare_digest(value.strip().encode("utf-8", "replace"), token):
            raise Unauthorized(401, [("Authorization", "invalid token")])

    guarded = [Depends(auth)]
    id_p = PathParam(alias="id", description="Story id, as returned by POST /v1/stories.")
    k_p = PathParam(description="Shot index, 0-based.")
    v1 = f"/{API_VERSION}/stories"

    @app.get("/healthz", tags=["health"], summary="Liveness of the API and the engine (no token).")
    async def healthz():
        return await svc().health()

    @app.post(
        v1,
        status_code=202,
        response_model=SubmitResponse,
        dependencies=guarded,
        tags=["stories"],
        summary="Submit a story script and its settings.",
        responses={**_ERRORS, 400: {"model": ErrorBody}, 413: {"model": ErrorBody}, 415: {"model": ErrorBody},
                   429: {"model": ErrorBody, "description": "The queue is full; see Retry-After."}},  # fmt: skip
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}},
    )
    async def submit(request: Request, response: Response):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise InvalidRequest(415, [("Content-Type", "must be application/json")])
        raw = await request.body()
        if not raw.strip():
            raise InvalidRequest(400, [("<json>", "the body is empty")])
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(400, [("<json>", f"line {exc.lineno} column {exc.colno}: {exc.msg}")]) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidRequest(400, [("<json>", f"not valid JSON ({type(exc).__name__})")]) from None
        status = await svc().submit(data)
        story = status["id"]
        response.headers["Location"] = f"{v1}/{story}"
        links = {
            "self": f"{v1}/{story}",
            "events": f"{v1}/{story}/events",
            "video": f"{v1}/{story}/video",
            "memory": f"{v1}/{story}/memory",
        }
        return {**status, "links": links}

    @app.get(v1, response_model=StoryPage, dependencies=guarded, tags=["stories"], summary="List stories.",
             responses=_ERRORS)  # fmt: skip
    async def list_stories(
        offset: int = Query(0, ge=0, le=10**9, description="Stories to skip."),
        limit: int = Query(20, ge=1, le=cfg.page_size_max, description="Page size."),
        state: StoryState | None = Query(None, description="Only stories in this state."),
    ):
        return await svc().list(offset, limit, None if state is None else state.value)

    @app.get(f"{v1}/{{id}}", response_model=StoryStatus, dependencies=guarded, tags=["stories"],
             summary="A story's state and progress.", responses=_ERRORS)  # fmt: skip
    async def story_status(story_id: str = id_p):
        # The engine's dict is a StoryStatus already: skip re-validating it on the hot polling path.
        return JSONResponse(await svc().polled_status(story_id))

    @app.delete(f"{v1}/{{id}}", response_model=StoryStatus, dependencies=guarded, tags=["stories"],
                summary="Cancel a story.", responses={**_ERRORS, 409: {"model": ErrorBody}})  # fmt: skip
    async def cancel(story_id: str = id_p):
        return await svc().cancel(story_id)

    @app.post(f"{v1}/{{id}}/resume", status_code=202, response_model=StoryStatus, dependencies=guarded,
              tags=["stories"], summary="Resume a failed or cancelled story.",
              responses={**_ERRORS, 409: {"model": ErrorBody}, 429: {"model": ErrorBody}})  # fmt: skip
    async def resume(story_id: str = id_p):
        return await svc().resume(story_id)

    @app.get(
        f"{v1}/{{id}}/events",
        dependencies=guarded,
        tags=["stories"],
        summary="Progress events as a server-sent event stream, ending after done/failed/cancelled.",
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "`event: progress` "
                   "lines carry ProgressEvent JSON with `id:` = seq; a final `event: status` when the log "
                   "holds no terminal event."}},  # fmt: skip
    )
    async def events(
        request: Request,
        story_id: str = id_p,
        after: int | None = Query(None, ge=0, description="Send events after this seq (Last-Event-ID wins)."),
    ):
        service_ = svc()
        start = after or 0
        header = request.headers.get("last-event-id")
        if header is not None:
            if not header.strip().isdigit():
                raise InvalidRequest(422, [("Last-Event-ID", "must be a non-negative integer (an event seq)")])
            start = int(header.strip())
        first = StoryStatus.model_validate(await service_.status(story_id))  # 404 before the stream starts
        keepalive = cfg.sse_keepalive_s

        async def stream():
            last, ended = start, first.state.terminal
            yield "retry: 2000\n\n"
            try:
                while True:
                    batch = await service_.events(story_id, last, 0.0 if ended else keepalive)
                    for e in batch:
                        last = max(last, int(e.get("seq", 0)))
                        yield _sse("progress", json.dumps(e, separators=(",", ":")), e.get("seq"))
                        if Phase(e["phase"]).terminal:
                            return
                    if batch:
                        continue
                    status = await service_.status(story_id)
                    if StoryState(status["state"]).terminal:
                        if ended:  # a second quiet round: the log holds no terminal event
                            yield _sse("status", json.dumps(status, separators=(",", ":")))
                            return
                        ended = True
                        continue
                    yield ": keep-alive\n\n"
            except StoryMemError as exc:
                yield _sse("error", json.dumps({"detail": exc.detail()}))

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def wants_bytes(request: Request, download: bool) -> bool:
        return download or "video/mp4" in request.headers.get("accept", "").lower()

    async def video_response(story_id: str, shot: int | None, request: Request, download: bool, expires_s):
        service_ = svc()
        if wants_bytes(request, download):
            data = await service_.video_bytes(story_id, shot)
            name = f"{story_id}.mp4" if shot is None else f"{story_id}-shot-{shot:03d}.mp4"
            return Response(data, media_type="video/mp4",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
        return await service_.video_link(story_id, shot, expires_s)

    video_responses = {
        **_ERRORS,
        409: {"model": ErrorBody, "description": "Not ready yet."},
        200: {"model": VideoLink, "content": {"video/mp4": {}}, "description": "A link (JSON) or the MP4."},
    }
    download_q = Query(False, description="Send the MP4 bytes instead of a presigned link.")
    expires_q = Query(None, ge=60, le=7 * 24 * 3600, description="Lifetime of the link in seconds.")

    @app.get(f"{v1}/{{id}}/video", dependencies=guarded, tags=["videos"], responses=video_responses,
             summary="The final video: a presigned link, or the bytes.")  # fmt: skip
    async def video(
        request: Request, story_id: str = id_p, download: bool = download_q, expires_s: int | None = expires_q
    ):
        return await video_response(story_id, None, request, download, expires_s)

    @app.get(f"{v1}/{{id}}/shots/{{k}}", dependencies=guarded, tags=["videos"], responses=video_responses,
             summary="Shot k (0-based) once committed: a presigned link, or the bytes.")  # fmt: skip
    async def shot_video(
        request: Request,
        story_id: str = id_p,
        k: int = k_p,
        download: bool = download_q,
        expires_s: int | None = expires_q,
    ):
        if k < 0:
            raise InvalidRequest(422, [("k", "must be an integer >= 0")])
        return await video_response(story_id, k, request, download, expires_s)

    @app.get(f"{v1}/{{id}}/memory", response_model=MemoryReport, dependencies=guarded, tags=["stories"],
             summary="Keyframes in memory for each committed shot, with presigned image links.",
             responses=_ERRORS)  # fmt: skip
    async def memory(story_id: str = id_p, expires_s: int | None = expires_q):
        return await svc().memory(story_id, expires_s)

    _document_request_body(app, v1)
    mount_board(app)  # the storyboard page at / (static files; it sends the token to the routes above)
    return app


def _document_request_body(app: FastAPI, path: str) -> None:
    """The submit route reads its body itself (to report every problem in one schema); show the
    StoryRequest model in the OpenAPI document all the same."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            model = StoryRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(model.pop("$defs", {}))
            components["StoryRequest"] = model
            body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
            body["schema"] = {"$ref": "#/components/schemas/StoryRequest"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# ---------------------------------------------------------------------------------------- Serve


@serve.deployment(name="StoryMemIngress")
@serve.ingress()
class StoryMemIngress:
    """The HTTP ingress. Its app is built once the replica holds the engine handle and the store
    (Serve's late-bound ingress); the methods below serve `EngineClient` over a deployment handle."""

    def __init__(self, cfg: StoryMemConfig):
        self.service = StoryService.connect(cfg)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service)

    async def submit(self, body: dict) -> dict:
        return await self.service.submit(body)

    async def status(self, story_id: str) -> dict:
        return await self.service.status(story_id)

    async def events(self, story_id: str, after: int = 0, timeout: float = 0.0) -> list[dict]:
        return await self.service.events(story_id, after, timeout)

    async def cancel(self, story_id: str) -> dict:
        return await self.service.cancel(story_id)

    async def resume(self, story_id: str) -> dict:
        return await self.service.resume(story_id)

    async def list(self, offset: int = 0, limit: int = 20, state: str | None = None) -> dict:
        return await self.service.list(offset, limit, state)

    async def memory(self, story_id: str) -> dict:
        return await self.service.memory(story_id)

    async def health(self) -> dict:
        return await self.service.health()

    async def video_bytes(self, story_id: str, shot: int | None = None) -> bytes:
        return await self.service.video_bytes(story_id, shot)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def build_app(args: dict | None = None):
    """Serve application builder: `serve run serve_app:build_app [config=PATH] [allow_no_auth=true]
    [replicas=N]`, or `import_path: serve_app:build_app` with `args:` in a Serve config file.

    The config file (default env STORYMEM_CONFIG, else built-in defaults) plus the STORYMEM_*
    environment give every setting; secrets come from the environment. Refuses to build without
    an API token unless allow_no_auth is given.
    """
    args = dict(args or {})
    path = args.pop("config", None) or os.environ.get("STORYMEM_CONFIG") or None
    cfg = load_config(path)
    service_updates: dict[str, Any] = {}
    if "allow_no_auth" in args:
        service_updates["allow_no_auth"] = _flag("allow_no_auth", args.pop("allow_no_auth"))
    if "replicas" in args:
        service_updates["ingress_replicas"] = int(args.pop("replicas"))
    if "start_engine" in args:
        service_updates["start_engine"] = _flag("start_engine", args.pop("start_engine"))
    if args:
        raise ValueError(f"args: unknown option(s) {', '.join(sorted(args))}; use config, allow_no_auth, "
                         "replicas, start_engine")  # fmt: skip
    if service_updates:
        service = ServiceConfig.model_validate({**cfg.service.model_dump(), **service_updates})
        cfg = cfg.model_copy(update={"service": service})
    return ingress_app(cfg)


def ingress_app(cfg: StoryMemConfig):
    """The Serve application for a resolved config: replicas, concurrency and CPUs from cfg.service."""
    check_security(cfg.service)
    s = cfg.service
    return StoryMemIngress.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    ).bind(cfg)


# An app without an engine: its OpenAPI document (`python -c "import serve_app, json;
# print(json.dumps(serve_app.app.openapi()))"`); story routes answer 503.
app = create_app()
