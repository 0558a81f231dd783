"""The service core without Ray: the facade and the job book over a real folder store and an
in-process driver, and the HTTP routes (serve_app.create_app) over them. These are the rules the
service promises (4xx/409/429, tenants, quotas, durable acceptance, rebuild, idempotency, strict
parsing, bounded input), checked in milliseconds."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import serve_app
from storymem.config import EngineConfig, ServiceConfig, ServiceLimits, StoryMemConfig
from storymem.progress import EventCursor, ProgressEvent
from storymem.service.book import JobBook
from storymem.service.contract import Conflict, InvalidRequest, NotFound, QueueFull, StoryState
from storymem.service.facade import Principal, StoryService, parse_count, parse_id
from storymem.service.intake import normalise
from storymem.storage import LocalStore, StorageUnavailable, StoryLayout
from storymem.story import Manifest, ShotRecord, read_manifest

ADMIN_TOKEN = "admin-" + "a" * 24
KEYS = {"alice": "alice-" + "k" * 20, "bob": "bob-" + "k" * 20}
PROFILE = {"name": "fake", "defaults": {"width": 64, "height": 48, "num_frames": 9, "num_inference_steps": 4}}
STORY = {"story_name": "Core", "shots": [{"prompt": "a fox"}, {"prompt": "the fox runs", "cut": False}]}


class FakeDriver:
    """Runs a story in-process: each shot waits for `gate` (when set), then commits a record and
    an object to storage as a director would. Cancel stops it between shots."""

    def __init__(self, store, shot_s: float = 0.0):
        self.store = store
        self.shot_s = shot_s
        self.book: JobBook | None = None
        self.gate: asyncio.Event | None = None
        self.cancelled: set[str] = set()
        self.ran: list[str] = []
        self.made: dict[str, list[int]] = {}

    async def profile(self) -> dict:
        return PROFILE

    async def health(self) -> dict:
        return {"generators": 1, "generators_total": 1}

    async def cancel(self, story_id: str) -> None:
        self.cancelled.add(story_id)
        if self.gate is not None:
            self.gate.set()  # the shot in flight ends; the story stops before the next

    async def run(self, job) -> dict:
        book, layout = self.book, StoryLayout(job.story_id)
        attempt = book.new_attempt(job.story_id)
        self.ran.append(job.story_id)
        self.cancelled.discard(job.story_id)
        manifest = await asyncio.to_thread(read_manifest, self.store, layout)
        manifest.state = StoryState.RUNNING
        self._save(layout, manifest)  # as StoryRunner.run does when it starts
        total = job.request.script.num_shots
        for k in range(manifest.shots_done, total):
            if job.story_id in self.cancelled:
                manifest.state, manifest.error = StoryState.CANCELLED, "cancelled by request"
                self._save(layout, manifest)
                return {"state": "cancelled", "error": "cancelled by request", "shots_done": manifest.shots_done}
            book.publish(job.story_id, _event(job.story_id, "denoise", k, total), attempt)
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.shot_s)
            self.store.put_bytes(layout.shot(k), b"shot %d" % k)
            manifest.shots.append(ShotRecord(index=k, prompt="p", cut=True, mode="t2v", seed=k, frames=9, drop=0,
                                             video=layout.shot(k), keyframes=[], memory_used=[],
                                             memory_after=layout.memory(k), memory_state=layout.memory_state(k)))  # fmt: skip
            self._save(layout, manifest)
            self.made.setdefault(job.story_id, []).append(k)
            book.shot_committed(job.story_id, k, 0.01)
        self.store.put_bytes(layout.final, b"final video " * 1000)
        manifest.final, manifest.state = layout.final, StoryState.DONE
        self._save(layout, manifest)
        return {"state": "done", "shots_done": total, "final": layout.final}

    def _save(self, layout, manifest: Manifest) -> None:
        self.store.put_bytes(layout.manifest, manifest.model_dump_json().encode())


def _event(story, phase, shot, total):
    return ProgressEvent(story=story, shot=shot, shots_total=total, step=1, steps_total=4, phase=phase).model_dump(mode="json")


def _service(tmp_path, driver=None, engine=None, limits=None, api_keys=KEYS, store=None):
    store = store or LocalStore(tmp_path / "bucket")
    driver = driver or FakeDriver(store)
    engine_cfg = engine or EngineConfig(max_queued_stories=6, max_running_stories=2)
    service_cfg = ServiceConfig(api_token=ADMIN_TOKEN, api_keys=api_keys, limits=limits or ServiceLimits(),
                                status_cache_s=0)  # fmt: skip
    cfg = StoryMemConfig(engine=engine_cfg, service=service_cfg)
    book = JobBook(store, engine_cfg, service_cfg.limits, driver)
    driver.book = book
    return StoryService(book, store, cfg), book, driver, store


def _auth(who="admin"):
    return {"Authorization": f"Bearer {ADMIN_TOKEN if who == 'admin' else KEYS[who]}"}


def _wait(http, story, state="done", who="admin", timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http.get(f"/v1/stories/{story}", headers=_auth(who)).json()
        if status["state"] == state:
            return status
        time.sleep(0.02)
    raise AssertionError(f"{story} not {state}: {status}")


def _png(w=8, h=8) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 180, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _png_header_only(w: int, h: int) -> str:
    """A PNG whose header says w x h but whose pixels are a few bytes: decoding it would fail or
    explode; a check from the header refuses it without decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


# ---------------------------------------------------------------------------------------- HTTP


def test_accepted_story_is_in_storage_before_the_answer_and_runs(tmp_path):
    service, book, driver, store = _service(tmp_path)
    with TestClient(serve_app.create_app(service)) as http:
        r = http.post("/v1/stories", json={**STORY, "settings": {"seed": 3}}, headers=_auth())
        assert r.status_code == 202, r.text
        story = r.json()["id"]
        # The answer came after the script, settings and a manifest were written (the engine may
        # have started the story since: queued or running, never absent).
        manifest = read_manifest(store, StoryLayout(story))
        assert manifest is not None and manifest.shots_total == 2
        assert manifest.settings["seed"] == 3 and manifest.settings["width"] == 64  # resolved at intake
        assert store.exists(StoryLayout(story).script) and store.exists(StoryLayout(story).settings)
        status = _wait(http, story)
        assert status["shots_done"] == 2 and status["video_key"] == StoryLayout(story).final
        video = http.get(f"/v1/stories/{story}/video?download=1", headers=_auth())
        assert video.status_code == 200 and video.content == b"final video " * 1000  # streamed
        assert http.get(f"/v1/stories/{story}/shots/1", headers={**_auth(), "Accept": "video/mp4"}).content == b"shot 1"
        assert read_manifest(store, StoryLayout(story)).state == StoryState.DONE


def test_rejected_requests_store_nothing_and_name_the_field(tmp_path):
    limits = ServiceLimits(max_shots=3, max_steps=10, max_cost=64 * 48 * 9 * 4 * 2)
    service, book, driver, store = _service(tmp_path, limits=limits)
    cases = [
        ({"shots": [{"prompt": "a"}] * 4}, "shots", "at most 3"),
        ({**STORY, "settings": {"num_inference_steps": 11}}, "settings.num_inference_steps", "at most 10"),
        ({**STORY, "settings": {"num_frames": 13}}, "settings", "max_cost"),  # each alone fits, the product not
        ({"script": {"shots": [{"prompt": "a"}] * 4}}, "script.shots", "at most 3"),
        ({**STORY, "reference_images": [{"data": _png_header_only(8192, 8192)}]}, "reference_images.0.data", "max_reference_pixels"),
        ({**STORY, "reference_images": [{"data": _png(3000, 3000)}] * 2}, "reference_images", "max_reference_pixels_total"),
        ({**STORY, "reference_images": [{"data": _png_header_only(64, 64)}]}, "reference_images.0.data", "corrupt"),
    ]  # fmt: skip
    with TestClient(serve_app.create_app(service)) as http:
        for body, field, words in cases:
            r = http.post("/v1/stories", json=body, headers=_auth())
            assert r.status_code == 422, (field, r.text)
            (item,) = r.json()["detail"]
            assert item["field"] == field and words in item["problem"], item
        assert store.list("") == [] and book.jobs == {}


def test_reference_images_are_reduced_to_the_shot_size_at_intake():
    request = normalise({**STORY, "reference_images": [{"data": _png(640, 480)}]}, profile=PROFILE)
    (ref,) = request.script.reference_images
    assert ref.size() == (64, 48)  # covers the 64x48 shot, no larger
    assert ref.load().shape == (48, 64, 3)


def test_strict_parsing_of_ids_and_headers(tmp_path):
    for bad in ("1\n", "²", "١٢", "-1", "1.5", "", " ", "9" * 19):
        with pytest.raises(InvalidRequest):
            parse_count(bad, "Last-Event-ID")
    assert parse_count("42", "after") == 42
    for bad in ("abc\n", "a/b", "a" * 65, "", "é"):
        with pytest.raises(InvalidRequest):
            parse_id(bad)
    service, *_ = _service(tmp_path)
    with TestClient(serve_app.create_app(service)) as http:
        story = http.post("/v1/stories", json=STORY, headers=_auth()).json()["id"]
        for header in (b"\xb2", "\u0661".encode(), "1 2", "x", "-3"):  # '²' as latin-1, '١' as UTF-8
            r = http.get(f"/v1/stories/{story}/events", headers={**_auth(), "Last-Event-ID": header})
            assert r.status_code == 422 and r.json()["detail"][0]["field"] == "Last-Event-ID", (header, r.text)
        for path, field in [(f"/v1/stories/{story}%0A", "id"), (f"/v1/stories/{story}/shots/%C2%B2", "k"),
                            ("/v1/stories?limit=%D9%A1", "limit"), (f"/v1/stories/{story}/video?expires_s=1e3", "expires_s")]:  # fmt: skip
            r = http.get(path, headers=_auth())
            assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, (path, r.text)
        for key in ("has space", "x" * 201, b"\xe9"):
            r = http.post("/v1/stories", json=STORY, headers={**_auth(), "Idempotency-Key": key})
            assert r.status_code == 422 and r.json()["detail"][0]["field"] == "Idempotency-Key"


def test_idempotency_key_same_body_same_story_other_body_409(tmp_path):
    service, book, driver, store = _service(tmp_path)
    with TestClient(serve_app.create_app(service)) as http:
        h = {**_auth("alice"), "Idempotency-Key": "job-7"}
        first = http.post("/v1/stories", json=STORY, headers=h)
        again = http.post("/v1/stories", json=json.loads(json.dumps(STORY)), headers=h)
        assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
        other = http.post("/v1/stories", json={**STORY, "story_name": "Other"}, headers=h)
        assert other.status_code == 409 and other.json()["detail"][0]["field"] == "Idempotency-Key"
        # Keys belong to a tenant: bob's job-7 is his own story.
        bob = http.post("/v1/stories", json=STORY, headers={**_auth("bob"), "Idempotency-Key": "job-7"})
        assert bob.status_code == 202 and bob.json()["id"] != first.json()["id"]
        assert len(book.jobs) == 2
        _wait(http, first.json()["id"], who="alice")
    # The key survives an engine restart: a new book over the same storage knows it.
    service2, book2, *_ = _service(tmp_path, store=store)
    with TestClient(serve_app.create_app(service2)) as http:
        again = http.post("/v1/stories", json=STORY, headers=h)
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        assert http.post("/v1/stories", json={**STORY, "story_name": "x"}, headers=h).status_code == 409


def test_tenants_see_and_touch_only_their_own_stories(tmp_path):
    service, book, driver, store = _service(tmp_path)
    with TestClient(serve_app.create_app(service)) as http:
        a = http.post("/v1/stories", json=STORY, headers=_auth("alice")).json()["id"]
        b = http.post("/v1/stories", json=STORY, headers=_auth("bob")).json()["id"]
        _wait(http, a, who="alice"), _wait(http, b, who="bob")
        assert [s["id"] for s in http.get("/v1/stories", headers=_auth("alice")).json()["items"]] == [a]
        assert {s["id"] for s in http.get("/v1/stories", headers=_auth()).json()["items"]} == {a, b}  # admin
        for method, path in [("GET", f"/v1/stories/{b}"), ("GET", f"/v1/stories/{b}/events"),
                             ("DELETE", f"/v1/stories/{b}"), ("POST", f"/v1/stories/{b}/resume"),
                             ("GET", f"/v1/stories/{b}/video"), ("GET", f"/v1/stories/{b}/memory")]:  # fmt: skip
            r = http.request(method, path, headers=_auth("alice"))
            assert r.status_code == 404 and r.json()["detail"][0]["field"] == "id", (method, path, r.text)
        assert http.get(f"/v1/stories/{a}", headers=_auth("alice")).json()["owner"] == "alice"
        assert http.get(f"/v1/stories/{a}", headers={"Authorization": "Bearer " + "n" * 30}).status_code == 401
        # Liveness and readiness answer without a token and count no stories.
        health = http.get("/healthz").json()
        assert "stories" not in health["engine"] and "queued" not in health["engine"]


def test_queue_full_and_tenant_quota_answer_429_with_retry_after(tmp_path):
    store = LocalStore(tmp_path / "bucket")
    driver = FakeDriver(store)
    limits = ServiceLimits(max_queued_per_tenant=2)
    service, book, driver, store = _service(tmp_path, driver=driver, limits=limits, store=store,
                                            engine=EngineConfig(max_queued_stories=3, max_running_stories=1))  # fmt: skip
    with TestClient(serve_app.create_app(service)) as http:
        http.portal.call(lambda: setattr(driver, "gate", asyncio.Event()))
        ids = [http.post("/v1/stories", json=STORY, headers=_auth("alice")).json()["id"] for _ in range(2)]
        r = http.post("/v1/stories", json=STORY, headers=_auth("alice"))
        assert r.status_code == 429 and r.json()["detail"][0]["field"] == "<quota>" and int(r.headers["Retry-After"]) >= 1
        ids.append(http.post("/v1/stories", json=STORY, headers=_auth("bob")).json()["id"])
        r = http.post("/v1/stories", json=STORY, headers=_auth("bob"))
        assert r.status_code == 429 and r.json()["detail"][0]["field"] == "<queue>"
        assert len(store.list_children("stories/")) == 3  # the refused ones wrote nothing
        http.portal.call(lambda: driver.gate.set())
        for story, who in zip(ids, ["alice", "alice", "bob"]):
            _wait(http, story, who=who)


def test_tenants_take_turns(tmp_path):
    store = LocalStore(tmp_path / "bucket")
    service, book, driver, store = _service(tmp_path, store=store,
                                            engine=EngineConfig(max_queued_stories=10, max_running_stories=1))  # fmt: skip
    with TestClient(serve_app.create_app(service)) as http:
        http.portal.call(lambda: setattr(driver, "gate", asyncio.Event()))
        alice = [http.post("/v1/stories", json=STORY, headers=_auth("alice")).json()["id"] for _ in range(3)]
        bob = [http.post("/v1/stories", json=STORY, headers=_auth("bob")).json()["id"] for _ in range(2)]
        http.portal.call(lambda: driver.gate.set())
        _wait(http, alice[-1], who="alice")
        assert driver.ran == [alice[0], bob[0], alice[1], bob[1], alice[2]]


def test_cancel_then_resume_events_continue_into_the_new_run(tmp_path):
    service, book, driver, store = _service(tmp_path)
    with TestClient(serve_app.create_app(service)) as http:
        http.portal.call(lambda: setattr(driver, "gate", asyncio.Event()))
        story = http.post("/v1/stories", json=STORY, headers=_auth()).json()["id"]
        _wait(http, story, "running")
        assert http.delete(f"/v1/stories/{story}", headers=_auth()).json()["state"] == "cancelled"
        assert read_manifest(store, StoryLayout(story)).state == StoryState.CANCELLED
        assert _wait(http, story, "cancelled")["shots_done"] == 1
        assert http.post(f"/v1/stories/{story}/resume", headers=_auth()).status_code == 202
        _wait(http, story)
        with http.stream("GET", f"/v1/stories/{story}/events", headers=_auth()) as r:
            events = [json.loads(d) for kind, _, d in serve_app_sse(r.iter_lines()) if kind == "progress"]
        phases = [e["phase"] for e in events]
        assert "cancelled" in phases and phases[-1] == "done", phases  # read from the start: through to the end
        assert events[-1]["run"] == 2 and events[0]["run"] == 0


def serve_app_sse(lines):
    from storymem.client import _parse_sse

    return _parse_sse(lines)


def test_event_cursor_ends_only_on_a_last_terminal_event():
    def ev(seq, phase):
        return {"story": "s", "shots_total": 1, "phase": phase, "seq": seq}

    c = EventCursor()
    assert [e["seq"] for e in c.feed([ev(1, "queued"), ev(2, "cancelled"), ev(3, "queued")])] == [1, 2, 3]
    assert not c.ended
    c.feed([ev(3, "queued"), ev(4, "done")])
    assert c.ended and c.last == 4


# ---------------------------------------------------------------------------------------- rebuild


def test_restart_brings_queued_back_queued_and_resumes_running(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "bucket")
        service, book, driver, _ = _service(tmp_path, store=store, engine=EngineConfig(max_running_stories=1))
        driver.gate = asyncio.Event()
        running = (await service.submit(STORY))["id"]
        queued = (await service.submit({**STORY, "story_name": "second"}))["id"]
        await asyncio.sleep(0.05)
        assert (await service.status(running))["state"] == "running"
        assert (await service.status(queued))["state"] == "queued"
        # The engine goes away: its tasks die with it; storage keeps what was accepted.
        for task in list(book._tasks):
            task.cancel()
        await asyncio.sleep(0)

        service2, book2, driver2, _ = _service(tmp_path, store=store, engine=EngineConfig(max_running_stories=1))
        release = asyncio.Event()
        lister = store.list_children

        def slow_list(prefix):  # a slow bucket: reads must not answer 404 meanwhile
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
            return lister(prefix)

        loop = asyncio.get_running_loop()
        store.list_children = slow_list
        book2.start()
        assert (await book2.health())["ready"] is False  # readiness waits for the rebuild
        status = await service2.status(queued)  # read through from storage during the rebuild
        assert status["state"] in ("queued", "running")
        release.set()
        await asyncio.wait_for(book2.rebuilt.wait(), 5)
        store.list_children = lister
        for _ in range(200):
            if [(await service2.status(s))["state"] for s in (running, queued)] == ["done", "done"]:
                break
            await asyncio.sleep(0.02)
        assert (await service2.status(running))["state"] == "done"
        assert (await service2.status(queued))["state"] == "done"
        assert driver2.made[queued] == [0, 1] and set(driver2.ran) == {running, queued}
        events = await service2.events(running)
        assert events[0]["phase"] == "queued" and "restarted" in events[0]["message"]
        with pytest.raises(NotFound):
            await service2.status("20990101T000000000-deadbeef")

    asyncio.run(scenario())


class OutageStore(LocalStore):
    """A folder store that can be taken offline: every call then fails as S3 does after its retries."""

    down = False

    def _check(self):
        if self.down:
            raise StorageUnavailable("S3 at test failed after 3 attempts; last error: Connection refused")

    def get_bytes(self, key):
        self._check()
        return super().get_bytes(key)

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        self._check()
        return super().put_bytes(key, data, content_type)


class StorageFailingDriver(FakeDriver):
    """Starts the story as a director does, then loses storage: the failure it reports cannot be
    written, so the manifest still says running (what StoryRunner leaves after StorageUnavailable)."""

    async def run(self, job) -> dict:
        layout = StoryLayout(job.story_id)
        attempt = self.book.new_attempt(job.story_id)
        manifest = await asyncio.to_thread(read_manifest, self.store, layout)
        manifest.state, manifest.attempt = StoryState.RUNNING, f"{attempt}-fence"
        self._save(layout, manifest)
        self.store.down = True
        return {"state": "failed", "error": "StorageUnavailable: S3 put failed after 3 attempts"}


def test_a_failure_storage_could_not_take_is_recorded_once_it_answers(tmp_path):
    """The story is reported failed at once; its manifest says failed as soon as storage answers
    again, so a restarted engine does not run it by itself. A later run's manifest is left alone."""

    async def scenario():
        store = OutageStore(tmp_path / "bucket")
        service, book, _, _ = _service(tmp_path, store=store, driver=StorageFailingDriver(store))
        layout = StoryLayout((await service.submit(STORY))["id"])
        for _ in range(200):
            if (await book.status(layout.story_id))["state"] == "failed":
                break
            await asyncio.sleep(0.01)
        assert (await book.status(layout.story_id))["state"] == "failed"
        await asyncio.sleep(0.2)
        store.down = False
        assert read_manifest(store, layout).state == StoryState.RUNNING  # not recorded while storage was down
        for _ in range(300):
            if read_manifest(store, layout).state == StoryState.FAILED:
                break
            await asyncio.sleep(0.02)
        manifest = read_manifest(store, layout)
        assert manifest.state == StoryState.FAILED and "StorageUnavailable" in manifest.error
        assert not [t for t in book._tasks if not t.done()]  # the recorder stopped once it wrote

        # A rebuilt book (the engine restarted) keeps it failed instead of running it again.
        _, book2, driver2, _ = _service(tmp_path, store=store)
        book2.start()
        await asyncio.wait_for(book2.rebuilt.wait(), 5)
        await asyncio.sleep(0.05)
        assert (await book2.status(layout.story_id))["state"] == "failed" and driver2.ran == []

        # Only what the failed run left is the book's to overwrite: not a later director's manifest.
        manifest.state, manifest.error, manifest.attempt = StoryState.RUNNING, None, "2-later"
        store.put_bytes(layout.manifest, manifest.model_dump_json().encode())
        book._write_failure(layout.story_id, 1, "late")
        assert read_manifest(store, layout).state == StoryState.RUNNING

    asyncio.run(scenario())


def test_book_refuses_unvalidated_requests_and_resume_rules(tmp_path):
    async def scenario():
        service, book, driver, store = _service(tmp_path)
        with pytest.raises(InvalidRequest):
            await book.submit({"shots": [{"prompt": "raw"}]})
        story = (await service.submit(STORY, Principal("alice")))["id"]
        for _ in range(200):
            if (await book.status(story))["state"] == "done":
                break
            await asyncio.sleep(0.01)
        with pytest.raises(Conflict):
            await service.resume(story)
        with pytest.raises(Conflict):
            await service.cancel(story)
        with pytest.raises(NotFound):
            await service.status(story, Principal("bob"))
        driver.gate = asyncio.Event()
        with pytest.raises(QueueFull) as full:
            for _ in range(book.cfg.max_queued_stories + 1):
                await service.submit(STORY)
        assert full.value.status == 429 and full.value.retry_after_s >= 1
        driver.gate.set()

    asyncio.run(scenario())


def test_sample_and_weak_secrets_are_refused():
    from storymem.service.facade import check_security

    with pytest.raises(ValueError, match="sample"):
        check_security(ServiceConfig(api_token="change-me-to-a-long-random-token"))
    with pytest.raises(ValueError, match="api_keys.bob"):
        check_security(ServiceConfig(api_token=ADMIN_TOKEN, api_keys={"bob": "short"}))


def test_model_capability_checks_run_at_intake_with_the_engine_profile(tmp_path):
    from storymem.script import ScriptError

    seen = []

    def transitions_supported(request, profile):
        seen.append(profile["name"])
        if request.settings.transition.value not in profile.get("transitions", ("none", "mi2v")):
            raise ScriptError([("settings.transition", f"{request.settings.transition.value} needs a LoRA this model lacks")])

    service, book, driver, store = _service(tmp_path)
    service.checks = [transitions_supported]
    with TestClient(serve_app.create_app(service)) as http:
        r = http.post("/v1/stories", json={**STORY, "settings": {"transition": "mm2v"}}, headers=_auth())
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "settings.transition"
        assert http.post("/v1/stories", json=STORY, headers=_auth()).status_code == 202
    assert seen == ["fake", "fake"] and len(store.list_children("stories/")) == 1


def test_secrets_stay_out_of_process_arguments_and_come_back_from_the_environment(monkeypatch):
    """Guarantee 9: what Ray stores as actor / deployment arguments holds no key; each process reads its env."""
    import pickle

    from storymem.config import StorageConfig

    for var in ("STORYMEM_S3_ACCESS_KEY", "STORYMEM_S3_SECRET_KEY", "STORYMEM_API_TOKEN", "STORYMEM_API_KEYS", "STORYMEM_API_KEYS_FILE"):
        monkeypatch.delenv(var, raising=False)
    access, secret, tenant_key = "ak-" + "q" * 20, "sk-" + "w" * 30, "tenant-" + "e" * 24
    cfg = StoryMemConfig(
        storage=StorageConfig(access_key=access, secret_key=secret),
        service=ServiceConfig(api_token=ADMIN_TOKEN, api_keys={"bob": tenant_key}),
    )
    public = cfg.without_secrets()
    blob = pickle.dumps(public) + public.model_dump_json().encode()
    for value in (access, secret, ADMIN_TOKEN, tenant_key):
        assert value.encode() not in blob
    assert public.storage.credentials_from_env and public.service.secrets_from_env

    # A process whose environment lacks them is told which field and which variable.
    with pytest.raises(ValueError, match="storage.access_key.*STORYMEM_S3_ACCESS_KEY"):
        public.with_secrets()
    from storymem.storage import S3Store

    with pytest.raises(ValueError, match="STORYMEM_S3_ACCESS_KEY"):
        S3Store(public.storage)

    cfg.storage.export_credentials()  # what init_local_ray does before Ray starts its workers
    monkeypatch.setenv("STORYMEM_API_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("STORYMEM_API_KEYS", json.dumps({"bob": tenant_key}))
    back = public.with_secrets()
    assert back.storage.access_key.get_secret_value() == access and back.storage.secret_key.get_secret_value() == secret
    assert back.service.api_token.get_secret_value() == ADMIN_TOKEN
    assert back.service.api_keys["bob"].get_secret_value() == tenant_key
    # A store rebuilt from a pickle (as Ray ships it to an actor) does not carry the keys either.
    store = S3Store(public.storage)
    assert secret.encode() not in pickle.dumps(store) and store.cfg.secret_key.get_secret_value() == secret
    monkeypatch.delenv("STORYMEM_S3_ACCESS_KEY")
    monkeypatch.delenv("STORYMEM_S3_SECRET_KEY")


def test_memory_reads_a_started_storys_script_and_settings_once(tmp_path):
    class CountingStore(LocalStore):
        reads: dict = {}

        def get_bytes(self, key):
            self.reads[key] = self.reads.get(key, 0) + 1
            return super().get_bytes(key)

    service, _, _, store = _service(tmp_path, store=CountingStore(tmp_path / "bucket"))
    with TestClient(serve_app.create_app(service)) as http:
        story = http.post("/v1/stories", json=STORY, headers=_auth()).json()["id"]
        _wait(http, story)
        pages = [http.get(f"/v1/stories/{story}/memory", headers=_auth()).json() for _ in range(3)]
    assert pages[0]["script"]["story_name"] == "Core" and pages[0]["settings"]["width"] == 64
    assert all(p["script"] == pages[0]["script"] and p["settings"] == pages[0]["settings"] for p in pages)
    layout = StoryLayout(story)
    assert store.reads[layout.script] == 1 and store.reads[layout.settings] == 1, store.reads
