"""Artifact storage: one key/value interface over a local folder or an S3-compatible bucket.

Keys are relative posix paths (`stories/<id>/shots/000.mp4`). `StoryLayout` names every object of a
story. A story's manifest is its commit point: an object such as a shot exists for readers only
once the manifest lists it, so writers put the object first and the manifest last.
"""

from __future__ import annotations

import builtins
import hashlib
import http.client
import io
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from .config import StorageConfig

T = TypeVar("T")

_TMP_MARK = ".~tmp."  # LocalStore's in-flight files; never a key segment
_MAX_KEY_LEN = 1024  # S3's limit, in UTF-8 bytes

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A storage call failed for a reason retrying will not fix."""


class StorageUnavailable(StorageError):
    """The store did not answer (connection refused, timeouts, 5xx, throttling) after every retry."""


class StorageAccessDenied(StorageError):
    """The store rejected the credentials or the permission for this call."""


class PreconditionFailed(StorageError):
    """A conditional write found the object changed (If-Match) or present (If-None-Match: *):
    another writer got there first."""


def content_etag(data: bytes) -> str:
    """The ETag S3 servers give a single-part object: the quoted MD5 of its bytes."""
    return '"' + hashlib.md5(data).hexdigest() + '"'


def validate_key(key: str, field: str = "key") -> str:
    """A key is a non-empty relative posix path without '.', '..', empty segments or backslashes."""
    if not isinstance(key, str):
        raise ValueError(f"{field}: expected a string, got {type(key).__name__}")
    if not key:
        raise ValueError(f"{field}: must not be empty")
    if "\\" in key:
        raise ValueError(f"{field}: {key!r} contains a backslash; use '/' as separator")
    if key.startswith("/"):
        raise ValueError(f"{field}: {key!r} is absolute; keys are relative paths")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"{field}: {key!r} contains control characters")
    if len(key.encode()) > _MAX_KEY_LEN:
        raise ValueError(f"{field}: longer than {_MAX_KEY_LEN} bytes")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"{field}: {key!r} has an empty, '.' or '..' path segment")
        if part.startswith(_TMP_MARK):
            raise ValueError(f"{field}: {key!r} has a segment starting with the reserved {_TMP_MARK!r}")
    return key


def validate_prefix(prefix: str, field: str = "prefix") -> str:
    """A prefix is '' or a key, optionally ending with '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix, field)
    return prefix


@runtime_checkable
class ArtifactStore(Protocol):
    """Where stories live. Every method may raise `StorageUnavailable` (remote stores, after retries)."""

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; KeyError when missing."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> builtins.list[str]:
        """Sorted keys that start with `prefix` (a string prefix, as in S3, not a folder)."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key that starts with `prefix` (which must not be empty)."""
        ...

    def url(self, key: str, expires_s: int | None = None) -> str | None:
        """A URL that fetches the object: presigned for S3, file:// for a folder."""
        ...

    def put_file(self, key: str, path: str | os.PathLike, content_type: str = "application/octet-stream") -> None: ...

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download to `path` atomically; KeyError when missing."""
        ...


def _check_data(data) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data: expected bytes, got {type(data).__name__}")
    return bytes(data)


def _check_delete_prefix(prefix: str) -> str:
    validate_prefix(prefix)
    if not prefix:
        raise ValueError("prefix: an empty prefix would delete the whole store")
    return prefix


def _check_expiry(expires_s: int | None, default: int) -> int:
    value = default if expires_s is None else expires_s
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 7 * 24 * 3600:
        raise ValueError(f"expires_s: {expires_s!r} is not a number of seconds in [1, 604800]")
    return value


def _overlaps(folder: str, prefix: str) -> bool:
    return folder.startswith(prefix) or prefix.startswith(folder)


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{_TMP_MARK}{path.name}.{secrets.token_hex(6)}")


class LocalStore:
    """Keys are files under `root`; writes land atomically (temporary file, then os.replace)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, LocalStore) and other.root == self.root

    __hash__ = None  # type: ignore[assignment]

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _replace(self, tmp: Path, target: Path, key: str) -> None:
        try:
            os.replace(tmp, target)
        except IsADirectoryError:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"key: {key!r} is a prefix of other keys in this folder store") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _tmp_for(self, key: str, target: Path) -> Path:
        try:
            return _atomic_target(target)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"key: {key!r} lies under an existing key in this folder store") from None

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        data = _check_data(data)
        target = self._path(key)
        tmp = self._tmp_for(key, target)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._replace(tmp, target, key)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stream(self, key: str, chunk: int = 1 << 20):
        """The object's bytes in chunks (KeyError now when missing), for downloads that must not
        hold a whole video in memory."""
        try:
            f = open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

        def chunks():
            with f:
                while block := f.read(chunk):
                    yield block

        return chunks()

    def list(self, prefix: str) -> builtins.list[str]:
        validate_prefix(prefix)
        # Walk only the folder that holds every candidate: the prefix up to its last '/'.
        head = prefix.rpartition("/")[0]
        base = self.root.joinpath(*head.split("/")) if head else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            # Descend only into folders that can hold a match: under the prefix, or on the way to it.
            dirnames[:] = [d for d in dirnames if _overlaps(rel + d + "/", prefix)]
            keys.extend(rel + n for n in filenames if not n.startswith(_TMP_MARK) and (rel + n).startswith(prefix))
        return sorted(keys)

    _cas_lock = threading.Lock()

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag; KeyError when missing."""
        data = self.get_bytes(key)
        return data, content_etag(data)

    def put_if(self, key: str, data: bytes, content_type: str = "application/octet-stream", match: str | None = None) -> str:
        """Write only if the object's ETag is `match` (None: only if it does not exist); the new
        ETag. PreconditionFailed otherwise. Atomic within this process."""
        data = _check_data(data)
        with self._cas_lock:
            try:
                current = content_etag(self.get_bytes(key))
            except KeyError:
                current = None
            if current != match:
                raise PreconditionFailed(f"{key}: changed by another writer")
            self.put_bytes(key, data, content_type)
        return content_etag(data)

    def list_children(self, prefix: str) -> builtins.list[str]:
        """Names of the folders directly under `prefix` (a folder ending with '/'): one level only."""
        validate_prefix(prefix)
        base = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(_TMP_MARK))

    def delete_prefix(self, prefix: str) -> None:
        _check_delete_prefix(prefix)
        dirs = set()
        for key in self.list(prefix):
            path = self._path(key)
            path.unlink(missing_ok=True)
            dirs.add(path.parent)
        # Prune folders left empty, deepest first, never the root itself.
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            while d != self.root and self.root in d.parents:
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent

    def url(self, key: str, expires_s: int | None = None) -> str | None:
        _check_expiry(expires_s, 3600)
        return self._path(key).as_uri()

    def put_file(self, key: str, path: str | os.PathLike, content_type: str = "application/octet-stream") -> None:
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"path: {src} is not a file")
        target = self._path(key)
        tmp = self._tmp_for(key, target)
        try:
            shutil.copyfile(src, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._replace(tmp, target, key)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        src = self._path(key)
        if not src.is_file():
            raise KeyError(key)
        dest = Path(path)
        tmp = _atomic_target(dest)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# S3 error codes that mean "try again later" rather than "this request is wrong".
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
    "TooManyRequests", "RequestLimitExceeded", "OperationAborted", "XMinioServerNotInitialized",
    "XMinioReadQuorum", "XMinioWriteQuorum",
}  # fmt: skip
_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationHeaderMalformed",
    "InvalidToken", "ExpiredToken", "AllAccessDisabled", "InvalidSecurity",
}  # fmt: skip


class _Missing(Exception):
    """Raised inside a retried call when the object (or its bucket) does not exist."""


class S3Store:
    """An S3 bucket through the minio SDK (MinIO in production, SeaweedFS in tests).

    Every call is retried on connection errors, timeouts, 5xx and throttling: `cfg.retries` more
    attempts after the first, sleeping `cfg.backoff_s` doubling up to `cfg.backoff_max_s` (with
    jitter, so that many clients do not retry in step). Then `StorageUnavailable`. The bucket is
    created on first use.
    """

    def __init__(self, cfg: StorageConfig):
        import certifi
        import urllib3
        from minio import Minio

        if not isinstance(cfg, StorageConfig):
            raise ValueError(f"cfg: expected a StorageConfig, got {type(cfg).__name__}")
        cfg = cfg.with_credentials()  # an actor's argument holds no keys: they come from its environment
        self.cfg = cfg
        self.bucket = cfg.bucket
        # Retries belong to this class, so urllib3 must not retry underneath (its default does 5).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s),
            retries=False,
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self._client = Minio(
            cfg.endpoint,
            access_key=cfg.access_key.get_secret_value() or None,
            secret_key=cfg.secret_key.get_secret_value() or None,
            secure=cfg.secure,
            region=cfg.region,
            http_client=http,
        )
        self._http = http
        self._bucket_ready = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        scheme = "https" if self.cfg.secure else "http"
        return f"S3Store({scheme}://{self.cfg.endpoint}/{self.bucket})"

    def __reduce__(self):
        # The HTTP pool does not pickle; Ray actors rebuild the client from the config.
        return (S3Store, (self.cfg.without_credentials(),))

    # -- retries ---------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        for secret in (self.cfg.secret_key.get_secret_value(), self.cfg.access_key.get_secret_value()):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _classify(self, e: Exception) -> tuple[str, str]:
        """('transient' | 'missing' | 'auth' | 'fatal', reason) for an exception from the SDK."""
        import urllib3
        from minio.error import InvalidResponseError, S3Error, ServerError

        if isinstance(e, S3Error):
            status = getattr(e.response, "status", 0) or 0
            reason = f"{e.code}: {e.message} (HTTP {status})"
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                return "missing", reason
            if e.code in _AUTH_CODES:
                return "auth", reason
            if e.code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return "transient", reason
            return "fatal", reason
        if isinstance(e, (ServerError, InvalidResponseError)):
            status = getattr(e, "status_code", None) or getattr(e, "_code", 0) or 0
            reason = f"{type(e).__name__}: HTTP {status}"
            if status >= 500 or status == 429:
                return "transient", reason
            if status in (401, 403):
                return "auth", reason
            return "fatal", reason
        if isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, http.client.HTTPException)):
            return "transient", f"{type(e).__name__}: {e}"
        return "unknown", ""

    def _call(self, what: str, fn: Callable[[], T], *, ensure: bool = True) -> T:
        if ensure and not self._bucket_ready:
            self.ensure_bucket()
        attempts = self.cfg.retries + 1
        delay = self.cfg.backoff_s
        reason = ""
        for attempt in range(attempts):
            try:
                return fn()
            except Exception as e:
                kind, reason = self._classify(e)
                if kind == "unknown":
                    raise
                reason = self._redact(reason)
                if kind == "missing":
                    raise _Missing(reason) from None
                if kind == "auth":
                    raise StorageAccessDenied(f"S3 {what} at {self.cfg.endpoint} was denied: {reason}") from None
                if kind == "fatal":
                    raise StorageError(f"S3 {what} at {self.cfg.endpoint} failed: {reason}") from None
            if attempt + 1 < attempts:
                pause = min(delay, self.cfg.backoff_max_s) * random.uniform(0.5, 1.0)
                log.warning(
                    "S3 %s at %s failed (%s); retry %d/%d in %.1f s",
                    what, self.cfg.endpoint, reason, attempt + 1, attempts - 1, pause,
                )
                time.sleep(pause)
                delay *= 2
        raise StorageUnavailable(
            f"S3 {what} at {self.cfg.endpoint} failed after {attempts} attempts; last error: {reason}"
        )

    def ensure_bucket(self) -> None:
        """Create the bucket when missing; another client creating it at the same time is fine."""
        from minio.error import S3Error

        def create() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=self.cfg.region)
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        with self._lock:
            if not self._bucket_ready:
                try:
                    self._call(f"bucket check {self.bucket!r}", create, ensure=False)
                except _Missing as e:
                    raise StorageError(f"S3 bucket check {self.bucket!r} failed: {e}") from None
                self._bucket_ready = True

    # -- the store -------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        validate_key(key)
        data = _check_data(data)

        def put() -> None:
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

        self._mutating(f"put {key!r}", put)

    def _mutating(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return self._call(what, fn)
        except _Missing:
            # The bucket vanished under us (deleted by an operator): make it again, once.
            self._bucket_ready = False
            try:
                return self._call(what, fn)
            except _Missing as e:
                raise StorageError(f"S3 {what} failed: {e}") from None

    def get_bytes(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag; KeyError when missing."""
        validate_key(key)

        def get() -> tuple[bytes, str]:
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read(), response.headers.get("ETag", "")
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call(f"get {key!r}", get)
        except _Missing:
            raise KeyError(key) from None

    def put_if(self, key: str, data: bytes, content_type: str = "application/octet-stream", match: str | None = None) -> str:
        """A conditional PUT: only if the object's ETag is `match` (If-Match), or with match None
        only if it does not exist (If-None-Match: *). Returns the new ETag; PreconditionFailed when
        another writer changed the object. The minio SDK sends no such header, so the PUT goes to a
        presigned URL with the header added (S3, MinIO and SeaweedFS honour both)."""
        from datetime import timedelta

        validate_key(key)
        data = _check_data(data)
        ours = content_etag(data)
        headers = {"Content-Type": content_type, **({"If-Match": match} if match else {"If-None-Match": "*"})}
        tried = False

        def put() -> str:
            nonlocal tried
            url = self._client.presigned_put_object(self.bucket, key, expires=timedelta(minutes=15))
            first, tried = not tried, True
            response = self._http.request("PUT", url, body=data, headers=headers)
            if response.status == 412:
                if not first:  # a retry after a lost answer: was the lost write ours?
                    try:
                        if self.get_versioned(key)[1] == ours:
                            return ours
                    except KeyError:
                        pass
                raise PreconditionFailed(f"S3 put {key!r}: changed by another writer (HTTP 412)")
            if response.status == 404:
                raise _Missing(f"NoSuchBucket (HTTP 404)")
            if response.status >= 500 or response.status == 429:
                raise ConnectionError(f"HTTP {response.status}")
            if response.status in (401, 403):
                raise StorageAccessDenied(f"S3 put {key!r} at {self.cfg.endpoint} was denied (HTTP {response.status})")
            if response.status >= 300:
                raise StorageError(f"S3 put {key!r} at {self.cfg.endpoint} failed: HTTP {response.status}")
            return response.headers.get("ETag", ours)

        return self._mutating(f"conditional put {key!r}", put)

    def stream(self, key: str, chunk: int = 1 << 20):
        """The object's bytes in chunks (KeyError now when missing; the request is retried until the
        first byte), for downloads that must not hold a whole video in memory."""
        validate_key(key)
        try:
            response = self._call(f"get {key!r}", lambda: self._client.get_object(self.bucket, key))
        except _Missing:
            raise KeyError(key) from None

        def chunks():
            try:
                yield from response.stream(chunk)
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def exists(self, key: str) -> bool:
        validate_key(key)
        try:
            self._call(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, key))
        except _Missing:
            return False
        return True

    def list(self, prefix: str) -> builtins.list[str]:
        validate_prefix(prefix)

        def names() -> builtins.list[str]:
            objects = self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return [o.object_name for o in objects if not o.is_dir]

        try:
            return sorted(self._call(f"list {prefix!r}", names))
        except _Missing:
            return []

    def list_children(self, prefix: str) -> builtins.list[str]:
        """Names of the folders directly under `prefix` (ending with '/'): a delimiter listing, so
        a bucket of many stories costs one entry per story, not one per object."""
        validate_prefix(prefix)

        def names() -> builtins.list[str]:
            objects = self._client.list_objects(self.bucket, prefix=prefix or None, recursive=False)
            return [o.object_name[len(prefix) :].rstrip("/") for o in objects if o.is_dir]

        try:
            return sorted(self._call(f"list {prefix!r}", names))
        except _Missing:
            return []

    def delete_prefix(self, prefix: str) -> None:
        from minio.deleteobjects import DeleteObject

        _check_delete_prefix(prefix)

        def delete() -> None:
            objects = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            keys = [o.object_name for o in objects if not o.is_dir]
            if not keys:
                return
            errors = builtins.list(self._client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
            failed = [e for e in errors if e.code != "NoSuchKey"]
            if failed:
                raise StorageError(
                    f"S3 delete {prefix!r}: {len(failed)} objects not deleted, first {failed[0].name!r}: "
                    f"{failed[0].code}"
                )

        try:
            self._call(f"delete {prefix!r}", delete)
        except _Missing:
            return

    def url(self, key: str, expires_s: int | None = None) -> str | None:
        validate_key(key)
        seconds = _check_expiry(expires_s, self.cfg.presign_expiry_s)

        def presign() -> str:
            return self._client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=seconds))

        return self._call(f"presign {key!r}", presign)

    def put_file(self, key: str, path: str | os.PathLike, content_type: str = "application/octet-stream") -> None:
        validate_key(key)
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"path: {src} is not a file")
        self._mutating(
            f"put {key!r}", lambda: self._client.fput_object(self.bucket, key, str(src), content_type=content_type)
        )

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        validate_key(key)
        dest = Path(path)

        def fetch() -> None:
            response = self._client.get_object(self.bucket, key)
            tmp = _atomic_target(dest)
            try:
                with open(tmp, "wb") as f:
                    for chunk in response.stream(1 << 20):
                        f.write(chunk)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
                response.close()
                response.release_conn()

        try:
            self._call(f"get {key!r}", fetch)
        except _Missing:
            raise KeyError(key) from None


# \Z, not $: `$` also matches before a trailing newline, which would let "id\n" through.
STORY_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")

_id_lock = threading.Lock()
_last_id_ms = 0


def make_story_id() -> str:
    """A new story id, `YYYYmmddTHHMMSSfff-<8 hex>` in UTC: ids sort by creation time."""
    global _last_id_ms
    with _id_lock:
        # Strictly increasing within a process even when the clock stalls or steps back.
        now_ms = max(int(time.time() * 1000), _last_id_ms + 1)
        _last_id_ms = now_ms
    stamp = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc)
    return f"{stamp:%Y%m%dT%H%M%S}{now_ms % 1000:03d}-{secrets.token_hex(4)}"


def _index(value: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field}: {value!r} is not a non-negative integer")
    return value


class StoryLayout:
    """Object keys of one story under `stories/<story_id>/`."""

    def __init__(self, story_id: str, prefix: str | None = None):
        """prefix: where the story's objects live; default `stories/<story_id>/`. A folder made
        for one story by the CLI uses prefix "" so its files sit at the top of the folder."""
        if not isinstance(story_id, str) or not STORY_ID_RE.match(story_id):
            raise ValueError(
                f"story_id: {story_id!r} must match {STORY_ID_RE.pattern} (letters, digits, '_' and '-', "
                "at most 64 characters)"
            )
        if prefix is not None:
            if not isinstance(prefix, str) or (prefix and not prefix.endswith("/")):
                raise ValueError(f"prefix: {prefix!r} must be '' or a folder ending with '/'")
            validate_prefix(prefix)
        self.story_id = story_id
        self._prefix = f"stories/{story_id}/" if prefix is None else prefix

    def __repr__(self) -> str:
        return f"StoryLayout({self.story_id!r}, prefix={self._prefix!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StoryLayout) and (other.story_id, other.prefix) == (self.story_id, self.prefix)

    def __hash__(self) -> int:
        return hash(("StoryLayout", self.story_id, self._prefix))

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def script(self) -> str:
        return self.prefix + "script.json"

    @property
    def settings(self) -> str:
        return self.prefix + "settings.json"

    @property
    def manifest(self) -> str:
        """The commit point: a shot exists for readers once the manifest lists it."""
        return self.prefix + "manifest.json"

    @property
    def final(self) -> str:
        return self.prefix + "final.mp4"

    def shot(self, k: int) -> str:
        return f"{self.prefix}shots/{_index(k, 'k'):03d}.mp4"

    def keyframe(self, k: int, j: int) -> str:
        return f"{self.prefix}keyframes/{_index(k, 'k'):03d}_{_index(j, 'j')}.jpg"

    def memory(self, k: int) -> str:
        """Human-readable description of the memory bank after shot k (JSON, no pixels)."""
        return f"{self.prefix}memory/{_index(k, 'k'):03d}.json"

    def memory_state(self, k: int) -> str:
        """The lossless memory bank after shot k (npz), for resuming a story."""
        return f"{self.prefix}memory/{_index(k, 'k'):03d}.npz"


def open_store(target: str | os.PathLike | StorageConfig | ArtifactStore) -> ArtifactStore:
    """A store from a StorageConfig, an existing store, `s3://bucket` (endpoint and credentials
    from the STORYMEM_S3_* environment), `file:///path`, or a plain folder path."""
    if isinstance(target, StorageConfig):
        return S3Store(target)
    if isinstance(target, ArtifactStore):
        return target
    if isinstance(target, os.PathLike):
        return LocalStore(target)
    if not isinstance(target, str) or not target:
        raise ValueError(f"store: expected a path, 's3://bucket' or a StorageConfig, got {target!r}")
    if target.startswith("s3://"):
        bucket = target[len("s3://") :].rstrip("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"store: {target!r} must be 's3://<bucket>' without a path")
        return S3Store(StorageConfig.from_env(bucket=bucket))
    if target.startswith("file://"):
        return LocalStore(target[len("file://") :])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target):
        raise ValueError(f"store: unsupported scheme in {target!r}; use a folder path or 's3://bucket'")
    return LocalStore(target)


__all__ = [
    "ArtifactStore",
    "LocalStore",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "StorageAccessDenied",
    "StoryLayout",
    "STORY_ID_RE",
    "make_story_id",
    "open_store",
    "validate_key",
    "validate_prefix",
]
