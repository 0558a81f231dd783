"""`StoryService`: the one facade the HTTP routes, the batch job and the in-cluster client call.

It owns what happens at the edge: who is asking (API keys -> tenants, or the admin token), strict
parsing of every header and path parameter, request intake (`intake.normalise`, off the event
loop), presigned links and streamed downloads, and a short status cache for pollers. The engine
behind it is anything with the `EngineAPI` coroutines: the Ray engine through `actors.client
.AsyncEngine`, or a `JobBook` in-process.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ServiceConfig, StoryMemConfig
from ..storage import STORY_ID_RE, StorageError, StoryLayout
from .contract import (
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    StoryMemError,
    StoryState,
    StoryStatus,
    Unauthorized,
)
from .intake import MODEL_CHECKS, Check, normalise, request_digest, speed_check

log = logging.getLogger("storymem.service")

API_VERSION = "v1"
MIN_TOKEN_CHARS = 16
# Tokens and keys of the shipped examples (cluster/*.yaml, docs): a service refuses to run with them.
SAMPLE_SECRETS = frozenset({
    "change-me-to-a-long-random-token", "change-me-to-a-long-random-key", "change-me-to-a-long-random-ray-token",
    "change-me-to-a-long-random-redis-password", "minioadmin",
})  # fmt: skip
_ID_PROBLEM = "not a story id (1 to 64 letters, digits, '_' or '-', starting with a letter or digit)"
_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also takes '²' and '٣'
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (sees its own stories) or the admin (tenant None, sees all)."""

    tenant: str | None = None

    @property
    def admin(self) -> bool:
        return self.tenant is None


ADMIN = Principal()


# ---------------------------------------------------------------------------------------- parsing


def parse_id(story_id: Any) -> str:
    if not isinstance(story_id, str) or not STORY_ID_RE.match(story_id):
        raise InvalidRequest(422, [("id", _ID_PROBLEM)])
    return story_id


def parse_count(value: Any, field: str, low: int = 0, high: int | None = None) -> int:
    """A non-negative integer from a header or query text (ASCII digits only) or an int."""
    if isinstance(value, bool):
        ok = False
    elif isinstance(value, int):
        ok = True
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip(" \t")):
        value, ok = int(value.strip(" \t")), True
    else:
        ok = False
    if not ok or value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequest(422, [(field, f"must be an integer {span}")])
    return value


def parse_idempotency_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidRequest(422, [("Idempotency-Key", "must be 1 to 200 printable ASCII characters without spaces")])
    return value


def check_secret(name: str, value: str) -> bytes:
    if len(value) < MIN_TOKEN_CHARS:
        raise ValueError(f"{name}: must be at least {MIN_TOKEN_CHARS} characters")
    if not value.isprintable() or any(c.isspace() for c in value) or not value.isascii():
        raise ValueError(f"{name}: must be printable ASCII without spaces")
    if value in SAMPLE_SECRETS:
        raise ValueError(f"{name}: is the sample value from the documentation; make a random one")
    return value.encode()


def check_security(cfg: ServiceConfig) -> bytes | None:
    """The admin token as bytes, or None when `allow_no_auth` is set; refuses weak, sample or
    missing tokens and tenant keys."""
    for tenant, key in cfg.api_keys.items():
        check_secret(f"service.api_keys.{tenant}", key.get_secret_value())
    token = cfg.api_token.get_secret_value() if cfg.api_token is not None else ""
    if not token:
        if cfg.allow_no_auth and not cfg.api_keys:
            log.warning("the StoryMem API runs WITHOUT authentication (service.allow_no_auth is set)")
            return None
        raise ValueError(
            "service.api_token: no API token is configured; set STORYMEM_API_TOKEN (or service.api_token), "
            "or set service.allow_no_auth for a machine whose API port nobody else can reach"
        )
    return check_secret("service.api_token", token)


def check_deployment(cfg: StoryMemConfig) -> bytes | None:
    """check_security, and the object store's keys are not the samples of cluster/minio.yaml."""
    storage = cfg.storage.with_credentials()
    for name in ("access_key", "secret_key"):
        value = getattr(storage, name).get_secret_value()
        if value in SAMPLE_SECRETS:
            raise ValueError(f"storage.{name}: is the sample value from cluster/minio.yaml; make a random one")
    return check_security(cfg.service.with_secrets())


class Authenticator:
    """Bearer tokens to principals: the admin token, or a tenant's API key (constant-time compares)."""

    def __init__(self, cfg: ServiceConfig):
        self.admin = check_security(cfg)
        self.keys = [(k.get_secret_value().encode(), tenant) for tenant, k in cfg.api_keys.items()]

    @property
    def required(self) -> bool:
        return self.admin is not None or bool(self.keys)

    def __call__(self, header: str | None) -> Principal:
        if not self.required:
            return ADMIN
        if not header:
            raise Unauthorized(401, [("Authorization", "missing bearer token")])
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized(401, [("Authorization", "expected 'Bearer <token>'")])
        given = value.strip().encode("utf-8", "replace")
        found: Principal | None = None
        if self.admin is not None and hmac.compare_digest(given, self.admin):
            found = ADMIN
        for key, tenant in self.keys:  # every key compared, so timing tells nothing
            if hmac.compare_digest(given, key) and found is None:
                found = Principal(tenant)
        if found is None:
            raise Unauthorized(401, [("Authorization", "invalid token")])
        return found


class _Presigner:
    """Presigned GETs for a public S3 host: signing is local, so nothing dials that host from here."""

    def __init__(self, cfg: StoryMemConfig):
        from minio import Minio

        s = cfg.storage.with_credentials()
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


# ---------------------------------------------------------------------------------------- the facade


STORED_CACHE_SIZE = 256  # stories whose script and settings a replica keeps for /memory


class StoryService:
    """What every front end does, over an engine (EngineAPI coroutines) and the store; raises
    StoryMemError subclasses, each with its HTTP status and the fields at fault."""

    def __init__(self, engine, store, cfg: StoryMemConfig, checks: Sequence[Check] | None = None):
        self.engine = engine
        self.store = store
        self.cfg = cfg
        self.auth = Authenticator(cfg.service)
        self.checks = [*MODEL_CHECKS, speed_check(cfg.speed)] if checks is None else list(checks)
        self._presigner = _Presigner(cfg) if cfg.service.public_s3_endpoint else None
        # A started story's script and settings never change: /memory reads them once (a page polls it).
        self._stored: OrderedDict[str, dict] = OrderedDict()
        self._profile: dict | None = None
        self._status_cache: dict[tuple, tuple[float, dict]] = {}
        self._status_calls: dict[tuple, asyncio.Future] = {}

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.engine, method)(*args)
        except StoryMemError:
            raise
        except Exception:
            log.exception("engine call %s failed", method)
            raise ServiceUnavailable(503, [("<engine>", "the engine failed to answer")]) from None

    async def _storage(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except KeyError:
            raise NotFound(404, [("id", "the object is missing from storage")]) from None
        except StorageError:
            log.exception("storage call failed")
            raise ServiceUnavailable(503, [("<storage>", "the object store did not answer")]) from None

    async def profile(self) -> dict:
        """The loaded model's {name, defaults, ...}: settings resolve against it at intake."""
        if self._profile is None:
            self._profile = await self._call("profile")
        return self._profile

    # -- stories
    async def submit(self, data: Any, who: Principal = ADMIN, idempotency_key: str | None = None) -> dict:
        """Validate a parsed JSON body once and hand it to the engine, which answers once it is
        stored. A rejected request stores nothing."""
        key = parse_idempotency_key(idempotency_key)
        profile = await self.profile()
        limits = self.cfg.service.limits
        # Decoding reference images is CPU work: off the event loop, so other requests go on.
        request = await asyncio.to_thread(normalise, data, limits, profile, self.checks)
        digest = request_digest(data) if key is not None else None
        return await self._call("submit", request, who.tenant, key, digest)

    async def status(self, story_id: str, who: Principal = ADMIN) -> dict:
        return await self._call("status", parse_id(story_id), who.tenant)

    async def polled_status(self, story_id: str, who: Principal = ADMIN) -> dict:
        """status() for pollers: answered from a copy at most service.status_cache_s old, and
        concurrent polls of one story share one engine call (many pollers, one engine actor)."""
        ttl = self.cfg.service.status_cache_s
        if ttl <= 0:
            return await self.status(story_id, who)
        key = (story_id, who.tenant)
        hit = self._status_cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return hit[1]
        call = self._status_calls.get(key)
        if call is None:
            call = asyncio.ensure_future(self.status(story_id, who))
            self._status_calls[key] = call
            call.add_done_callback(lambda f: self._call_done(key, f))
        result = await asyncio.shield(call)  # a poller that hangs up must not cancel the others' call
        now = time.monotonic()
        if len(self._status_cache) >= 4096:
            self._status_cache = {k: v for k, v in self._status_cache.items() if now - v[0] < ttl}
        self._status_cache[key] = (now, result)
        return result

    def _call_done(self, key, call: asyncio.Future) -> None:
        self._status_calls.pop(key, None)
        if not call.cancelled():
            call.exception()  # retrieved here too, so an error nobody awaited any more is not logged

    def _forget(self, story_id: str) -> None:
        for key in [k for k in self._status_cache if k[0] == story_id]:
            self._status_cache.pop(key, None)

    async def cancel(self, story_id: str, who: Principal = ADMIN) -> dict:
        self._forget(story_id)
        return await self._call("cancel", parse_id(story_id), who.tenant)

    async def resume(self, story_id: str, who: Principal = ADMIN) -> dict:
        self._forget(story_id)
        return await self._call("resume", parse_id(story_id), who.tenant)

    async def list(self, offset: Any = 0, limit: Any = 20, state: str | None = None, who: Principal = ADMIN) -> dict:
        errors = []
        top = self.cfg.service.page_size_max
        try:
            offset = parse_count(offset, "offset", 0, 10**9)
        except InvalidRequest as e:
            errors += e.errors
        try:
            limit = parse_count(limit, "limit", 1, top)
        except InvalidRequest as e:
            errors += e.errors
        if state is not None and state not in {s.value for s in StoryState}:
            errors.append(("state", f"must be one of {', '.join(s.value for s in StoryState)}"))
        if errors:
            raise InvalidRequest(422, errors)
        page = await self._call("list", offset, limit, state, who.tenant)
        return {"items": page["items"], "total": page["total"], "offset": offset, "limit": limit}

    async def events(self, story_id: str, after: Any = 0, timeout: float = 0.0, who: Principal = ADMIN) -> list[dict]:
        after = parse_count(after, "after")
        timeout = min(max(float(timeout), 0.0), 60.0)
        return await self._call("events", parse_id(story_id), after, timeout, who.tenant)

    async def health(self) -> dict:
        """Liveness: the API answers and the engine answers (no story counts: no token needed)."""
        try:
            engine = await asyncio.wait_for(self.engine.health(), timeout=10.0)
        except Exception as exc:
            log.warning("engine health check failed: %s", type(exc).__name__)
            raise ServiceUnavailable(503, [("<engine>", "the engine did not answer")]) from None
        return {"status": "ok", "api": API_VERSION, "engine": engine}

    async def ready(self) -> dict:
        """Readiness: 200 only with a loaded generator and a finished rebuild."""
        health = await self.health()
        engine = health["engine"]
        if not engine.get("ready"):
            why = "no generator has loaded the model" if not engine.get("generators") else "the engine is still reading its stories"
            raise ServiceUnavailable(503, [("<engine>", f"not ready: {why}")])
        return health

    # -- artefacts
    def _expiry(self, expires_s: Any) -> int:
        top = self.cfg.storage.presign_expiry_s
        if expires_s is None:
            return top
        return parse_count(expires_s, "expires_s", 60, top)

    def _presign(self, key: str, expires_s: int) -> str:
        if self._presigner is not None:
            return self._presigner.url(key, expires_s)
        return self.store.url(key, expires_s)

    async def video_key(self, story_id: str, shot: Any, who: Principal = ADMIN) -> str:
        if shot is not None:
            shot = parse_count(shot, "k")
        status = StoryStatus.model_validate(await self.status(story_id, who))
        if shot is None:
            if status.state != StoryState.DONE or not status.video_key:
                raise Conflict(409, [("id", f"the story is {status.state.value}; its video exists once it is done")])
            return status.video_key
        if shot >= status.shots_total:
            raise NotFound(404, [("k", f"the story has {status.shots_total} shots (0..{status.shots_total - 1})")])
        if shot >= status.shots_done:
            raise Conflict(409, [("k", f"shot {shot} is not committed yet ({status.shots_done} done)")])
        return StoryLayout(story_id).shot(shot)

    async def video_link(self, story_id: str, shot: Any = None, expires_s: Any = None, who: Principal = ADMIN) -> dict:
        seconds = self._expiry(expires_s)
        key = await self.video_key(story_id, shot, who)
        url = await self._storage(self._presign, key, seconds)
        return {"id": story_id, "shot": shot, "url": url, "expires_s": seconds, "expires_at": time.time() + seconds}

    async def video_stream(self, story_id: str, shot: Any = None, who: Principal = ADMIN):
        """The MP4 as an iterator of chunks (never the whole file in memory)."""
        key = await self.video_key(story_id, shot, who)
        return await self._storage(self.store.stream, key)

    async def video_bytes(self, story_id: str, shot: Any = None, who: Principal = ADMIN) -> bytes:
        key = await self.video_key(story_id, shot, who)
        return await self._storage(self.store.get_bytes, key)

    async def memory(self, story_id: str, expires_s: Any = None, who: Principal = ADMIN) -> dict:
        seconds = self._expiry(expires_s)
        shots = await self._call("memory", parse_id(story_id), who.tenant)

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

        from storymem.board import stored_story

        stored = self._stored.get(story_id)
        if stored is None:
            stored = await self._storage(stored_story, self.store, story_id)
            if stored["script"] is not None and stored["settings"] is not None:
                self._stored[story_id] = stored
                while len(self._stored) > STORED_CACHE_SIZE:
                    self._stored.popitem(last=False)
        else:
            self._stored.move_to_end(story_id)
        return {"id": story_id, "expires_s": seconds, "shots": await self._storage(sign), **stored}


# What an in-cluster caller may invoke on the ingress deployment (trusted: it runs as the admin).
FACADE_METHODS = ("submit", "status", "events", "cancel", "resume", "list", "memory", "health", "ready", "video_bytes")

__all__ = [
    "ADMIN",
    "API_VERSION",
    "Authenticator",
    "FACADE_METHODS",
    "Principal",
    "StoryService",
    "check_deployment",
    "check_security",
    "parse_count",
    "parse_id",
    "parse_idempotency_key",
]
