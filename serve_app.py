"""StoryMem's HTTP API: routes only, over the service facade (`storymem.service.facade.StoryService`).

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
    GET    /readyz                     readiness: a generator loaded and the engine's stories read
    GET    /docs, /openapi.json        OpenAPI

Every error is `{"detail": [{"field": ..., "problem": ...}]}` with a 4xx/5xx status. Story ids are
made by the server and checked against its pattern; no request names a path or an object key.
What each route does (validation, tenants, limits, idempotency) is the facade's; this module parses
HTTP and shapes responses.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from storymem.board import mount as mount_board
from storymem.config import ServiceConfig, StoryMemConfig, load_config
from storymem.progress import EventCursor
from storymem.script import StoryRequest
from storymem.service.contract import (
    InvalidRequest,
    ServiceUnavailable,
    StoryMemError,
    StoryPage,
    StoryState,
    StoryStatus,
)
from storymem.service.facade import (
    ADMIN,
    API_VERSION,
    FACADE_METHODS,
    Principal,
    StoryService,
    check_deployment,
    check_security,
    parse_count,
)

log = logging.getLogger("storymem.serve")

APP_NAME = "storymem"


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
        description="Per committed shot: index, keyframes [{frame, key, url}] taken into memory, and "
        "memory_used [{shot, frame, source, slot, url?}] the shot was conditioned on."
    )
    script: dict | None = Field(None, description="The stored script (storyboard form), once started.")
    settings: dict | None = Field(None, description="The resolved settings, once started.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "Missing or wrong bearer token."),
        (404, "No such story (or shot), or a story of another tenant."),
        (422, "A parameter is malformed; `detail` names it."),
    )
}


def connect(cfg: StoryMemConfig) -> StoryService:
    """The facade over the running engine (started here when none runs and service.start_engine)."""
    from actors.api import get_engine
    from actors.client import AsyncEngine
    from storymem.storage import S3Store

    check_deployment(cfg)
    try:
        handle = get_engine(cfg.engine.namespace)
    except ValueError:
        if not cfg.service.start_engine:
            raise
        from actors import start_engine

        # Detached: the engine must outlive this replica (other replicas and batch jobs use it).
        engine_cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"detached": True})})
        handle = start_engine(engine_cfg)
    return StoryService(AsyncEngine(handle), S3Store(cfg.storage), cfg)


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

    async def who(request: Request) -> Principal:
        return svc().auth(request.headers.get("authorization"))

    guarded = [Depends(who)]
    id_p = PathParam(alias="id", description="Story id, as returned by POST /v1/stories.")
    k_p = PathParam(description="Shot index, 0-based.")
    v1 = f"/{API_VERSION}/stories"

    @app.get("/healthz", tags=["health"], summary="Liveness: the API and the engine answer (no token).")
    async def healthz():
        return await svc().health()

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorBody}},
             summary="Readiness: 200 only with a loaded generator and the engine's stories read (no token).")  # fmt: skip
    async def readyz():
        return await svc().ready()

    @app.post(
        v1,
        status_code=202,
        response_model=SubmitResponse,
        tags=["stories"],
        summary="Submit a story script and its settings (answered once the story is stored).",
        responses={**_ERRORS, 400: {"model": ErrorBody}, 409: {"model": ErrorBody, "description": "The "
                   "Idempotency-Key was used with another body."}, 413: {"model": ErrorBody},
                   415: {"model": ErrorBody}, 429: {"model": ErrorBody, "description": "The queue or the "
                   "tenant's quota is full; see Retry-After."}},  # fmt: skip
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}},
    )
    async def submit(request: Request, response: Response, caller: Principal = Depends(who)):
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
        status = await svc().submit(data, caller, request.headers.get("idempotency-key"))
        story = status["id"]
        response.headers["Location"] = f"{v1}/{story}"
        links = {
            "self": f"{v1}/{story}",
            "events": f"{v1}/{story}/events",
            "video": f"{v1}/{story}/video",
            "memory": f"{v1}/{story}/memory",
        }
        return {**status, "links": links}

    @app.get(v1, response_model=StoryPage, tags=["stories"], summary="List stories (a tenant sees its own).",
             responses=_ERRORS)  # fmt: skip
    async def list_stories(
        caller: Principal = Depends(who),
        offset: str = Query("0", description="Stories to skip (an integer >= 0)."),
        limit: str = Query("20", description=f"Page size (1..{cfg.page_size_max})."),
        state: StoryState | None = Query(None, description="Only stories in this state."),
    ):
        return await svc().list(offset, limit, None if state is None else state.value, caller)

    @app.get(f"{v1}/{{id}}", response_model=StoryStatus, tags=["stories"],
             summary="A story's state and progress.", responses=_ERRORS)  # fmt: skip
    async def story_status(story_id: str = id_p, caller: Principal = Depends(who)):
        # The engine's dict is a StoryStatus already: skip re-validating it on the hot polling path.
        return JSONResponse(await svc().polled_status(story_id, caller))

    @app.delete(f"{v1}/{{id}}", response_model=StoryStatus, tags=["stories"],
                summary="Cancel a story.", responses={**_ERRORS, 409: {"model": ErrorBody}})  # fmt: skip
    async def cancel(story_id: str = id_p, caller: Principal = Depends(who)):
        return await svc().cancel(story_id, caller)

    @app.post(f"{v1}/{{id}}/resume", status_code=202, response_model=StoryStatus,
              tags=["stories"], summary="Resume a failed or cancelled story.",
              responses={**_ERRORS, 409: {"model": ErrorBody}, 429: {"model": ErrorBody}})  # fmt: skip
    async def resume(story_id: str = id_p, caller: Principal = Depends(who)):
        return await svc().resume(story_id, caller)

    @app.get(
        f"{v1}/{{id}}/events",
        tags=["stories"],
        summary="Progress events as a server-sent event stream, ending after the story ends.",
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "`event: progress` "
                   "lines carry ProgressEvent JSON with `id:` = seq; a resumed story's stream goes on into "
                   "its new run; a final `event: status` when the log holds no terminal event."}},  # fmt: skip
    )
    async def events(
        request: Request,
        story_id: str = id_p,
        caller: Principal = Depends(who),
        after: str | None = Query(None, description="Send events after this seq (Last-Event-ID wins)."),
    ):
        service_ = svc()
        start = 0 if after is None else parse_count(after, "after")
        header = request.headers.get("last-event-id")
        if header is not None:
            start = parse_count(header, "Last-Event-ID")
        first = StoryStatus.model_validate(await service_.status(story_id, caller))  # 404 before the stream starts
        keepalive = cfg.sse_keepalive_s

        async def stream():
            cursor, ended = EventCursor(start), first.state.terminal
            yield "retry: 2000\n\n"
            try:
                while True:
                    batch = await service_.events(story_id, cursor.last, 0.0 if ended else keepalive, caller)
                    for e in cursor.feed(batch):
                        yield _sse("progress", json.dumps(e, separators=(",", ":")), e.get("seq"))
                    if cursor.ended:
                        return
                    if batch:
                        continue
                    status = await service_.status(story_id, caller)
                    if StoryState(status["state"]).terminal:
                        if ended:  # a second quiet round: the log holds no terminal event
                            yield _sse("status", json.dumps(status, separators=(",", ":")))
                            return
                        ended = True
                        continue
                    ended = False
                    yield ": keep-alive\n\n"
            except StoryMemError as exc:
                yield _sse("error", json.dumps({"detail": exc.detail()}))

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def wants_bytes(request: Request, download: bool) -> bool:
        return download or "video/mp4" in request.headers.get("accept", "").lower()

    async def video_response(story_id: str, shot, request: Request, download: bool, expires_s, caller):
        service_ = svc()
        if wants_bytes(request, download):
            chunks = await service_.video_stream(story_id, shot, caller)
            name = f"{story_id}.mp4" if shot is None else f"{story_id}-shot-{int(shot):03d}.mp4"
            return StreamingResponse(chunks, media_type="video/mp4",
                                     headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
        return await service_.video_link(story_id, shot, expires_s, caller)

    video_responses = {
        **_ERRORS,
        409: {"model": ErrorBody, "description": "Not ready yet."},
        200: {"model": VideoLink, "content": {"video/mp4": {}}, "description": "A link (JSON) or the MP4 (streamed)."},
    }
    download_q = Query(False, description="Send the MP4 bytes instead of a presigned link.")
    expires_q = Query(None, description="Lifetime of the link in seconds (60..storage.presign_expiry_s).")

    @app.get(f"{v1}/{{id}}/video", tags=["videos"], responses=video_responses,
             summary="The final video: a presigned link, or the bytes.")  # fmt: skip
    async def video(request: Request, story_id: str = id_p, caller: Principal = Depends(who),
                    download: bool = download_q, expires_s: str | None = expires_q):  # fmt: skip
        return await video_response(story_id, None, request, download, expires_s, caller)

    @app.get(f"{v1}/{{id}}/shots/{{k}}", tags=["videos"], responses=video_responses,
             summary="Shot k (0-based) once committed: a presigned link, or the bytes.")  # fmt: skip
    async def shot_video(request: Request, story_id: str = id_p, k: str = k_p, caller: Principal = Depends(who),
                         download: bool = download_q, expires_s: str | None = expires_q):  # fmt: skip
        return await video_response(story_id, parse_count(k, "k"), request, download, expires_s, caller)

    @app.get(f"{v1}/{{id}}/memory", response_model=MemoryReport, tags=["stories"],
             summary="Keyframes in memory for each committed shot, with presigned image links.",
             responses=_ERRORS)  # fmt: skip
    async def memory(story_id: str = id_p, caller: Principal = Depends(who), expires_s: str | None = expires_q):
        return await svc().memory(story_id, expires_s, caller)

    _document_request_body(app, v1)
    mount_board(app)  # the storyboard page at / (static files, no auth; its data calls carry the token)
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


def _handle_method(name: str):
    async def method(self, *args):
        return await getattr(self.service, name)(*args)

    method.__name__ = name
    method.__doc__ = f"StoryService.{name} for in-cluster callers (actors.client.EngineClient), as the admin."
    return method


class _Ingress:
    """The HTTP ingress. Its app is built once the replica holds the engine handle and the store
    (Serve's late-bound ingress); its handle methods, FACADE_METHODS, serve `EngineClient`."""

    def __init__(self, cfg: StoryMemConfig):
        self.service = connect(cfg.with_secrets())  # the deployment argument holds none: this replica's env does

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service)

    async def submit(self, body: dict, idempotency_key: str | None = None) -> dict:
        return await self.service.submit(body, ADMIN, idempotency_key)


for _name in FACADE_METHODS:
    if _name not in _Ingress.__dict__:
        setattr(_Ingress, _name, _handle_method(_name))

StoryMemIngress = serve.deployment(name="StoryMemIngress")(serve.ingress()(_Ingress))


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
    check_deployment(cfg)
    s = cfg.service
    return StoryMemIngress.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    ).bind(cfg.without_secrets())  # Serve keeps it in Ray's GCS


# An app without an engine: its OpenAPI document (`python -c "import serve_app, json;
# print(json.dumps(serve_app.app.openapi()))"`); story routes answer 503.
app = create_app()
