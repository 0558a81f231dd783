"""The HTTP service end to end: `python -m cluster.local start` (a real Ray head, the SeaweedFS S3
server, the engine and the Serve app) in a temporary folder, then HTTP, SSE, the Python clients
and the batch job against it. The unmarked tests at the top need no cluster."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

import serve_app
from storymem.client import (
    Conflict,
    InvalidRequest,
    QueueFull,
    StoryMemClient,
    StoryMemError,
    Unauthorized,
    _parse_sse,
    build_request,
    error_for_status,
)
from storymem.config import ServiceConfig, StorageConfig
from storymem.script import ScriptError, load_script
from storymem.stitch import probe_video
from storymem.story import script_digest

REPO = Path(__file__).resolve().parents[1]
TINY = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 3, "transition": "mi2v"}
LONG = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 20}
MAX_BODY = 256 * 1024
MAX_QUEUED = 4
slow = pytest.mark.slow


def _png(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 200, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _bomb(side: int) -> str:
    """A PNG whose header says side x side with almost no data: only a header check stops it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * (side * 3 + 1) * 4)) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


# ---------------------------------------------------------------------------------------- no cluster


def test_security_refuses_to_start_without_a_token(monkeypatch):
    monkeypatch.delenv("STORYMEM_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="api_token"):
        serve_app.check_security(ServiceConfig())
    with pytest.raises(ValueError, match="api_token"):
        serve_app.build_app({})
    with pytest.raises(ValueError, match="at least 16"):
        serve_app.check_security(ServiceConfig(api_token="short"))
    assert serve_app.check_security(ServiceConfig(allow_no_auth=True)) is None
    assert serve_app.check_security(ServiceConfig(api_token="t" * 16)) == b"t" * 16
    with pytest.raises(ValueError, match="unknown option"):
        serve_app.build_app({"allow_no_auth": "true", "replica": "2"})


def test_build_app_takes_replicas_and_token_from_config(monkeypatch, tmp_path):
    monkeypatch.setenv("STORYMEM_API_TOKEN", "z" * 24)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"service": {"ingress_replicas": 3, "max_ongoing_requests": 77}}))
    app = serve_app.build_app({"config": str(cfg)})
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3
    assert deployment.max_ongoing_requests == 77
    (bound_cfg,) = deployment.init_args
    # The deployment argument (Serve keeps it in Ray's GCS) holds no token; a replica reads its env.
    assert bound_cfg.service.api_token is None and bound_cfg.service.secrets_from_env
    assert ("z" * 24).encode() not in pickle.dumps(bound_cfg)
    assert bound_cfg.with_secrets().service.api_token.get_secret_value() == "z" * 24
    assert serve_app.build_app({"replicas": "2"})._bound_deployment.num_replicas == 2


def test_openapi_documents_every_route_and_the_request_model():
    schema = serve_app.app.openapi()
    paths = schema["paths"]
    for path, method in [
        ("/v1/stories", "post"), ("/v1/stories", "get"), ("/v1/stories/{id}", "get"),
        ("/v1/stories/{id}", "delete"), ("/v1/stories/{id}/events", "get"), ("/v1/stories/{id}/video", "get"),
        ("/v1/stories/{id}/shots/{k}", "get"), ("/v1/stories/{id}/memory", "get"), ("/healthz", "get"),
    ]:  # fmt: skip
        assert method in paths[path], (path, method)
    body = paths["/v1/stories"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/StoryRequest"}
    assert {"StoryRequest", "StoryScript", "GenerationSettings", "Shot"} <= set(schema["components"]["schemas"])


def test_unbound_app_answers_in_the_error_schema():
    from fastapi.testclient import TestClient

    with TestClient(serve_app.app) as c:
        r = c.get("/v1/stories")
        assert r.status_code == 503 and r.json()["detail"][0]["field"] == "<server>"
        r = c.get("/nowhere")
        assert r.status_code == 404 and r.json() == {"detail": [{"field": "<path>", "problem": "Not Found"}]}
        r = c.put("/v1/stories")
        assert r.status_code == 405 and r.json()["detail"][0]["field"] == "<method>"
        r = c.post("/v1/stories", content=b"x" * (9 * 1024 * 1024), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"][0]["field"] == "<body>"


def test_sse_parser_joins_data_lines_and_skips_comments():
    lines = ["retry: 2000", "", ": keep-alive", "", "id: 7", "event: progress", "data: {\"a\":", "data: 1}", "",
             "event: status", "data: {}", ""]  # fmt: skip
    assert list(_parse_sse(iter(lines))) == [("progress", 7, '{"a":\n1}'), ("status", None, "{}")]


def test_build_request_inlines_reference_files_and_merges_settings(tmp_path):
    (tmp_path / "ref.png").write_bytes(base64.b64decode(_png()))
    script = {"shots": [{"prompt": "a"}], "reference_images": [{"path": "ref.png"}], "settings": {"seed": 4}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(script))
    body = build_request(path, {"num_inference_steps": 3})
    assert body["settings"] == {"seed": 4, "num_inference_steps": 3}
    assert body["script"]["reference_images"] == [{"data": _png()}]
    assert "settings" not in body["script"]
    with pytest.raises(ScriptError) as err:
        build_request({"shots": [{"prompt": "a"}], "reference_images": [{"path": str(tmp_path / "missing.png")}]})
    assert err.value.errors[0][0] == "script.reference_images.0.path"


def test_errors_are_typed_and_cross_process_boundaries():
    err = error_for_status(429, [("<queue>", "full")], retry_after_s=3.0)
    assert isinstance(err, QueueFull) and err.retry_after_s == 3.0
    assert isinstance(error_for_status(422, [("shots", "bad")]), InvalidRequest)
    assert isinstance(error_for_status(401, []), Unauthorized)
    back = pickle.loads(pickle.dumps(InvalidRequest(413, [("<body>", "too big")])))
    assert type(back) is InvalidRequest and back.status == 413 and back.errors == [("<body>", "too big")]


def test_batch_collect_validates_scripts_and_digests(tmp_path):
    from storymem import batch
    from storymem.config import StoryMemConfig

    (tmp_path / "good.json").write_text(json.dumps({"story_name": "G", "shots": [{"prompt": "a"}]}))
    (tmp_path / "bad.json").write_text(json.dumps({"shots": [{"prompt": "a", "cut": False}]}))
    (tmp_path / "notes.txt").write_text("not a script")
    rows = {r.story_name: r for r in batch.collect(str(tmp_path), StoryMemConfig(), settings=TINY)}
    assert set(rows) == {"G", "bad"}
    assert rows["bad"].state == "invalid" and "shots.0.cut" in rows["bad"].error
    assert rows["G"].script_digest == script_digest(load_script(tmp_path / "good.json"))
    out = tmp_path / "t.parquet"
    batch.write_batch_table(list(rows.values()), str(out), StoryMemConfig())
    back = {r.story_name: r for r in batch.read_batch_table(str(out), StoryMemConfig())}
    assert back["G"].script_digest == rows["G"].script_digest and back["bad"].state == "invalid"


# ---------------------------------------------------------------------------------------- the stack


class Stack:
    def __init__(self, root: Path, url: str, token: str):
        self.root, self.url, self.token = root, url, token
        self.creds = _read_env(root / "credentials.env")
        self.ray_env = _read_env(root / "ray.env")

    def store(self):
        from storymem.storage import S3Store

        c = self.creds
        return S3Store(StorageConfig(endpoint=c["STORYMEM_S3_ENDPOINT"], bucket=c["STORYMEM_S3_BUCKET"],
                                     access_key=c["STORYMEM_S3_ACCESS_KEY"], secret_key=c["STORYMEM_S3_SECRET_KEY"],
                                     retries=1, backoff_s=0.05))  # fmt: skip

    def env(self) -> dict:
        return {**os.environ, **self.creds, **self.ray_env, "STORYMEM_API_TOKEN": self.token}


def _read_env(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key.strip()] = value.strip()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    cfg = root / "storymem.yaml"
    cfg.write_text(yaml.safe_dump({
        "engine": {"cpus_per_generator": 0.5, "cpus_per_scorer": 0.5, "max_queued_stories": MAX_QUEUED},
        "service": {"max_body_bytes": MAX_BODY, "sse_keepalive_s": 2.0},
        # These 48x32, 3-step shots are too rough for the embedded scorer's cut (a clearly visible toy
        # character); the stack tests the keyframe and memory API, the filter has its own tests.
        "memory": {"quality_threshold": None},
    }))  # fmt: skip
    token = secrets.token_urlsafe(24)
    port = _free_port()
    state = root / "state"
    env = {**os.environ, "STORYMEM_API_TOKEN": token}
    args = [sys.executable, "-m", "cluster.local"]
    try:
        start = subprocess.run(
            [*args, "start", "--dir", str(state), "--port", str(port), "--s3-port", str(_free_port()),
             "--config", str(cfg), "--num-cpus", "2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if start.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in (state / "logs").glob("*.log"))
            pytest.fail(f"cluster.local start failed:\n{start.stdout}\n{start.stderr}{logs}")
        assert token not in start.stdout  # a token given by the environment is not printed
        yield Stack(state, f"http://127.0.0.1:{port}", token)
    finally:
        stop = subprocess.run([*args, "stop", "--dir", str(state)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert stop.returncode == 0, stop.stderr
        assert not (state / "state.json").exists()


@pytest.fixture(scope="module")
def client(stack):
    with StoryMemClient(stack.url, token=stack.token, timeout=30) as c:
        yield c


THREE_SHOTS = {
    "story_name": "Three shots",
    "shots": [
        {"prompt": "A red fox walks into a snowy clearing."},
        {"prompt": "The fox sniffs the snow and digs.", "cut": False},
        {"prompt": "Close-up of the fox's face at dusk."},
    ],
}


@pytest.fixture(scope="module")
def done_story(client):
    """A 3-shot story submitted over HTTP and followed over SSE to its end: (id, events)."""
    story = client.submit(THREE_SHOTS, TINY)
    events = list(client.events(story))
    return story, events


# ---------------------------------------------------------------------------------------- flows


@slow
def test_three_shot_story_end_to_end(stack, client, done_story, tmp_path):
    story, events = done_story
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)) and seqs[0] == 1
    phases = [e.phase.value for e in events]
    assert phases[0] == "queued" and phases[-1] == "done" and phases.index("stitch") < len(phases) - 1
    assert [e.shot for e in events if e.phase.value == "commit"] == [0, 1, 2]
    steps = [e.step for e in events if e.phase.value == "denoise" and e.shot == 1]
    assert steps == sorted(steps) and steps[-1] < TINY["num_inference_steps"]

    status = client.status(story)
    assert status.state.value == "done" and status.shots_done == status.shots_total == 3
    assert len(status.seconds_per_shot) == 3 and all(s > 0 for s in status.seconds_per_shot)
    assert status.video_key and status.story_name == "Three shots"

    video = client.fetch_video(story, tmp_path / "story.mp4")
    info = probe_video(video)
    # Shot 1 continues shot 0 (MI2V): its first frame repeats shot 0's last and is dropped.
    assert (info["width"], info["height"], info["frames"]) == (48, 32, 9 + 8 + 9)

    link = client.video_url(story, expires_s=120)
    assert link["expires_s"] == 120 and link["expires_at"] > time.time() + 100
    assert httpx.get(link["url"], timeout=30).content == video.read_bytes()  # presigned: no API token
    shot = httpx.get(f"{stack.url}/v1/stories/{story}/shots/1", headers={"Authorization": f"Bearer {stack.token}",
                     "Accept": "video/mp4"}, timeout=30)  # fmt: skip
    assert shot.headers["content-type"] == "video/mp4" and probe_video(shot.content)["frames"] == 9

    memory = client.memory(story)
    assert [m["index"] for m in memory] == [0, 1, 2] and memory[0]["memory_used"] == []
    jpeg = httpx.get(memory[0]["keyframes"][0]["url"], timeout=30).content
    assert jpeg[:2] == b"\xff\xd8"
    linked = [m for m in memory[1]["memory_used"] if m.get("url")]
    assert linked and {m["shot"] for m in linked} == {0}

    # Resuming the stream from an event id sends only what follows it.
    mid = events[len(events) // 2].seq
    with httpx.stream("GET", f"{stack.url}/v1/stories/{story}/events", timeout=30,
                      headers={"Authorization": f"Bearer {stack.token}", "Last-Event-ID": str(mid)}) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        again = [json.loads(d) for kind, _, d in _parse_sse(r.iter_lines()) if kind == "progress"]
    assert [e["seq"] for e in again] == [s for s in seqs if s > mid]


@slow
def test_cancel_a_running_story_then_resume_it(client, tmp_path):
    story = client.submit({"shots": [{"prompt": f"shot {i}"} for i in range(6)]}, LONG)
    for event in client.events(story):
        if event.phase.value == "denoise":
            break
    client.cancel(story)
    status = client.wait(story, progress=False, timeout=60)
    assert status.state.value == "cancelled" and status.shots_done < 6
    with pytest.raises(Conflict) as err:
        client.fetch_video(story, tmp_path / "never.mp4")
    assert err.value.errors[0][0] == "id" and not (tmp_path / "never.mp4").exists()
    with pytest.raises(Conflict):
        client.video_url(story, shot=status.shots_done)  # not committed

    client.resume(story)
    final = client.wait(story, progress=False, timeout=120)
    assert final.state.value == "done" and final.shots_done == 6
    # Read from the start, the stream goes through the cancel into the resumed run to its end.
    events = list(client.events(story))
    phases = [e.phase.value for e in events]
    assert "cancelled" in phases and phases[-1] == "done"
    assert events[-1].run == events[phases.index("cancelled")].run + 1


@slow
def test_full_queue_answers_429_with_retry_after(stack, client):
    stories = [client.submit({"shots": [{"prompt": f"q{i} {k}"} for k in range(8)]}, LONG) for i in range(MAX_QUEUED)]
    try:
        body = build_request({"shots": [{"prompt": "one more"}]}, TINY)
        r = httpx.post(f"{stack.url}/v1/stories", json=body, headers={"Authorization": f"Bearer {stack.token}"})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["detail"][0]["field"] == "<queue>"
    finally:
        for story in stories:
            client.cancel(story)
    assert {client.wait(s, progress=False, timeout=60).state.value for s in stories} == {"cancelled"}


@slow
def test_idempotent_submission_and_readiness(stack, client):
    headers = {"Authorization": f"Bearer {stack.token}", "Idempotency-Key": secrets.token_hex(8)}
    body = build_request({"shots": [{"prompt": "an idempotent owl"}]}, TINY)
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        first = http.post("/v1/stories", json=body, headers=headers)
        again = http.post("/v1/stories", json=body, headers=headers)
        assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
        other = http.post("/v1/stories", json={**body, "settings": {**TINY, "seed": 9}}, headers=headers)
        assert other.status_code == 409 and other.json()["detail"][0]["field"] == "Idempotency-Key"
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["engine"]["ready"] is True
        assert "stories" not in http.get("/healthz").json()["engine"]  # nothing counted without a token
    assert client.wait(first.json()["id"], progress=False, timeout=120).state.value == "done"


# ---------------------------------------------------------------------------------------- bad input


def _bad_requests(story: str) -> list[tuple[str, str, str, dict, int, str]]:
    """(name, method, path, httpx kwargs, status, field named) for malformed requests."""
    post = "/v1/stories"

    def body(payload):
        return {"json": payload}

    def shots(*items, **extra):
        return body({"shots": list(items), **extra})

    ok = {"prompt": "fine"}
    scene = {"scene_num": 1, "video_prompts": ["a", "b"], "first_frame_prompt": ["a", "b"], "cut": [True, False]}
    chunks = (b"{" + b" " * 1024 for _ in range(MAX_BODY // 1024 + 8))
    return [
        ("bad json", "POST", post, {"content": b'{"shots": [', "headers": {"Content-Type": "application/json"}}, 400, "<json>"),
        ("empty body", "POST", post, {"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "<json>"),
        ("deep nesting", "POST", post, {"content": b"[" * 200000, "headers": {"Content-Type": "application/json"}}, 400, "<json>"),
        ("not an object", "POST", post, body([1, 2]), 422, "<json>"),
        ("wrong content type", "POST", post, {"content": b"shots=1", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
        ("missing shots", "POST", post, body({"story_name": "x"}), 422, "shots"),
        ("shots not a list", "POST", post, body({"shots": "abc"}), 422, "shots"),
        ("no shots", "POST", post, shots(), 422, "shots"),
        ("prompt wrong type", "POST", post, shots({"prompt": 5}), 422, "shots.0.prompt"),
        ("missing prompt", "POST", post, shots({"cut": True}), 422, "shots.0.prompt"),
        ("blank prompt", "POST", post, shots({"prompt": "   "}), 422, "shots.0.prompt"),
        ("huge prompt", "POST", post, shots({"prompt": "x" * 5000}), 422, "shots.0.prompt"),
        ("first shot not a cut", "POST", post, shots({"prompt": "a", "cut": False}), 422, "shots.0.cut"),
        ("cut typo", "POST", post, shots(ok, {"prompt": "b", "cut": "flase"}), 422, "shots.1.cut"),
        ("too many shots", "POST", post, shots(*[ok] * 101), 422, "shots"),
        ("unknown shot field", "POST", post, shots({"prompt": "a", "colour": "red"}), 422, "shots.0.colour"),
        ("unequal scene lists", "POST", post, body({"scenes": [{**scene, "cut": [True]}]}), 422, "scenes.0"),
        ("st-bench first not cut", "POST", post, body({"scenes": [{**scene, "cut": [False, True]}]}), 422, "scenes.0.cut.0"),
        ("both forms", "POST", post, body({"scenes": [scene], "shots": [ok]}), 422, "scenes"),
        ("long story name", "POST", post, shots(ok, story_name="n" * 201), 422, "story_name"),
        ("settings not an object", "POST", post, shots(ok, settings=[1]), 422, "settings"),
        ("width wrong type", "POST", post, shots(ok, settings={"width": "big"}), 422, "settings.width"),
        ("frames not 4n+1", "POST", post, shots(ok, settings={"num_frames": 10}), 422, "settings.num_frames"),
        ("unknown setting", "POST", post, shots(ok, settings={"colour": 1}), 422, "settings.colour"),
        ("sink larger than bank", "POST", post, shots(ok, settings={"max_memory_size": 2, "fix": 3}), 422, "settings.fix"),
        ("unknown wrapped key", "POST", post, body({"script": {"shots": [ok]}, "extra": 1}), 422, "extra"),
        ("reference not an image", "POST", post, shots(ok, reference_images=[{"data": base64.b64encode(b"hello").decode()}]), 422, "reference_images.0.data"),
        ("reference bad base64", "POST", post, shots(ok, reference_images=[{"data": "%%%"}]), 422, "reference_images.0.data"),
        ("reference path", "POST", post, shots(ok, reference_images=[{"path": "/etc/passwd"}]), 422, "reference_images.0.path"),
        ("wrapped reference path", "POST", post, body({"script": {"shots": [ok], "reference_images": [{"path": "x.png"}]}}), 422, "script.reference_images.0.path"),
        ("reference data and path", "POST", post, shots(ok, reference_images=[{"data": _png(), "path": "x.png"}]), 422, "reference_images.0"),
        ("oversize body", "POST", post, shots({"prompt": "x" * 100}, story_overview="o" * MAX_BODY), 413, "<body>"),
        ("oversize chunked body", "POST", post, {"content": chunks, "headers": {"Content-Type": "application/json"}}, 413, "<body>"),
        ("unknown id", "GET", "/v1/stories/20990101T000000000-deadbeef", {}, 404, "id"),
        ("malformed id", "GET", "/v1/stories/bad.id", {}, 422, "id"),
        ("traversal id", "GET", "/v1/stories/..%2F..%2Fetc", {}, 404, "<path>"),
        ("traversal id video", "GET", "/v1/stories/..%2Fx/video", {}, 404, "<path>"),
        ("id too long", "GET", "/v1/stories/" + "a" * 65, {}, 422, "id"),
        ("cancel unknown id", "DELETE", "/v1/stories/20990101T000000000-deadbeef", {}, 404, "id"),
        ("events unknown id", "GET", "/v1/stories/nope/events", {}, 404, "id"),
        ("bad Last-Event-ID", "GET", f"/v1/stories/{story}/events", {"headers": {"Last-Event-ID": "x"}}, 422, "Last-Event-ID"),
        ("memory malformed id", "GET", "/v1/stories/a$b/memory", {}, 422, "id"),
        ("limit zero", "GET", "/v1/stories?limit=0", {}, 422, "limit"),
        ("limit too big", "GET", "/v1/stories?limit=101", {}, 422, "limit"),
        ("limit not a number", "GET", "/v1/stories?limit=ten", {}, 422, "limit"),
        ("negative offset", "GET", "/v1/stories?offset=-1", {}, 422, "offset"),
        ("unknown state", "GET", "/v1/stories?state=sleeping", {}, 422, "state"),
        ("shot index not a number", "GET", f"/v1/stories/{story}/shots/one", {}, 422, "k"),
        ("negative shot index", "GET", f"/v1/stories/{story}/shots/-1", {}, 422, "k"),
        ("shot index out of range", "GET", f"/v1/stories/{story}/shots/3", {}, 404, "k"),
        ("link expiry too short", "GET", f"/v1/stories/{story}/video?expires_s=5", {}, 422, "expires_s"),
        ("video of unknown id", "GET", "/v1/stories/20990101T000000000-deadbeef/video", {}, 404, "id"),
        ("cancel a finished story", "DELETE", f"/v1/stories/{story}", {}, 409, "id"),
        ("resume a finished story", "POST", f"/v1/stories/{story}/resume", {}, 409, "id"),
        ("method not allowed", "PUT", "/v1/stories", {}, 405, "<method>"),
        ("ten 8192x8192 reference images", "POST", post, shots(ok, reference_images=[{"data": _bomb(8192)}] * 10), 422, "reference_images.0.data"),
        ("non-ASCII Last-Event-ID", "GET", f"/v1/stories/{story}/events", {"headers": {"Last-Event-ID": b"\xb2"}}, 422, "Last-Event-ID"),
        ("id with a trailing newline", "GET", f"/v1/stories/{story}%0A", {}, 422, "id"),
        ("non-ASCII shot index", "GET", f"/v1/stories/{story}/shots/%D9%A1", {}, 422, "k"),
        ("cost over the limit", "POST", post, shots(*[ok] * 40, settings={"width": 832, "height": 480, "num_frames": 81, "num_inference_steps": 50}), 422, "settings"),
    ]  # fmt: skip


@slow
def test_bad_requests_get_4xx_naming_the_field_and_store_nothing(stack, client, done_story):
    story, _ = done_story
    store = stack.store()
    before_keys = store.list("")
    before_total = client.list().total
    corpus = _bad_requests(story)
    assert len(corpus) >= 25
    headers = {"Authorization": f"Bearer {stack.token}"}
    failures = []
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for name, method, path, kw, status, field in corpus:
            kw = dict(kw)
            r = http.request(method, path, headers={**headers, **kw.pop("headers", {})}, **kw)
            detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else None
            fields = [d["field"] for d in detail or []]
            if r.status_code != status or not any(f == field or f.startswith(field + ".") for f in fields):
                failures.append(f"{name}: {r.status_code} {r.text[:300]}")
            if any(not d.get("problem") for d in detail or []):
                failures.append(f"{name}: a problem is empty: {detail}")
            if stack.token in r.text:
                failures.append(f"{name}: the response echoes the token")
    assert not failures, "\n".join(failures)
    assert store.list("") == before_keys  # nothing stored for any rejected request
    assert client.list().total == before_total
    assert client.health()["status"] == "ok"  # and the service keeps serving
    assert client.status(story).state.value == "done"


@slow
def test_story_routes_need_the_token_and_never_echo_it(stack, done_story):
    story, _ = done_story
    wrong = "wrong-" + secrets.token_urlsafe(16)
    routes = [("POST", "/v1/stories"), ("GET", "/v1/stories"), ("GET", f"/v1/stories/{story}"),
              ("DELETE", f"/v1/stories/{story}"), ("GET", f"/v1/stories/{story}/events"),
              ("GET", f"/v1/stories/{story}/video"), ("GET", f"/v1/stories/{story}/shots/0"),
              ("GET", f"/v1/stories/{story}/memory"), ("POST", f"/v1/stories/{story}/resume")]  # fmt: skip
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        for method, path in routes:
            for headers, problem in [
                ({}, "missing bearer token"),
                ({"Authorization": f"Bearer {wrong}"}, "invalid token"),
                ({"Authorization": f"Basic {stack.token}"}, "expected 'Bearer <token>'"),
                ({"Authorization": f"Bearer {stack.token[:-1]}"}, "invalid token"),
            ]:
                kw = {"json": {"shots": [{"prompt": "a"}]}} if method == "POST" else {}
                r = http.request(method, path, headers=headers, **kw)
                assert r.status_code == 401, (method, path, r.text)
                assert r.json() == {"detail": [{"field": "Authorization", "problem": problem}]}
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert wrong not in r.text and stack.token not in r.text
        assert http.get("/healthz").status_code == 200  # no token needed
    with pytest.raises(Unauthorized):
        StoryMemClient(stack.url, token=wrong).status(story)
    assert StoryMemClient(stack.url, token=stack.token).status(story).state.value == "done"


# ---------------------------------------------------------------------------------------- in-cluster


@slow
def test_batch_job_writes_the_table_and_a_second_run_skips(stack, client, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for i, name in enumerate(["owl", "ship", "garden"]):
        shots = [{"prompt": f"{name} shot {k}", "cut": k != 1} for k in range(2 + i % 2)]
        (scripts / f"{name}.json").write_text(json.dumps({"story_name": name.title(), "shots": shots}))
    out = tmp_path / "results.parquet"
    cmd = [sys.executable, "-m", "actors.batch", str(scripts), "--out", str(out), "--settings", json.dumps(TINY),
           "--quiet", "--poll-s", "0.5"]  # fmt: skip
    first = subprocess.run(cmd, env=stack.env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr

    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    assert {r["story_name"] for r in table} == {"Owl", "Ship", "Garden"}
    store = stack.store()
    for r in table:
        assert r["state"] == "done" and r["error"] is None and r["seconds_per_shot"] > 0
        assert r["shots"] == r["shots_done"] == len(json.loads(Path(r["script"]).read_text())["shots"])
        assert r["script_digest"] == script_digest(load_script(r["script"]))
        assert store.exists(r["video_key"]) and r["video_key"].startswith(f"stories/{r['story_id']}/")
        assert client.status(r["story_id"]).state.value == "done"
    total = client.list().total

    second = subprocess.run(cmd, env=stack.env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stderr.count("skip ") == 3
    again = pq.read_table(out).to_pylist()
    assert sorted((r["script"], r["story_id"]) for r in again) == sorted((r["script"], r["story_id"]) for r in table)
    assert client.list().total == total  # nothing was submitted again


@slow
def test_batch_reads_an_s3_prefix_and_writes_its_table_to_the_bucket(stack):
    from storymem import batch
    from storymem.config import StoryMemConfig

    store = stack.store()
    bucket = store.bucket
    for name in ("moon", "tide"):
        store.put_bytes(f"inputs/{name}.json", json.dumps({"shots": [{"prompt": f"the {name}"}]}).encode())
    store.put_bytes("inputs/readme.txt", b"not a script")
    store.put_bytes("inputs/broken.json", b'{"shots": [')
    cfg = StoryMemConfig(storage=store.cfg)
    rows = batch.collect(f"s3://{bucket}/inputs/", cfg, settings=TINY)
    names = ["broken", "moon", "tide"]
    assert sorted(r.script for r in rows) == [f"s3://{bucket}/inputs/{n}.json" for n in names]
    state = {r.script.rsplit("/", 1)[1]: r.state for r in rows}
    assert state == {"broken.json": "invalid", "moon.json": "pending", "tide.json": "pending"}
    out = f"s3://{bucket}/results/t.parquet"
    batch.write_batch_table(rows, out, cfg)
    assert store.exists("results/t.parquet")
    back = batch.read_batch_table(out, cfg)
    assert [(r.script, r.script_digest) for r in back] == [(r.script, r.script_digest) for r in rows]
    store.delete_prefix("inputs/")
    store.delete_prefix("results/")


@slow
def test_engine_client_through_the_serve_handle_and_the_engine_actor(stack, tmp_path):
    code = f"""
import json, logging, ray
from ray import serve
from actors.client import EngineClient
from storymem.client import InvalidRequest, NotFound
ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
out = {{}}
via_serve = EngineClient(serve.get_app_handle("storymem"))
story = via_serve.submit({{"shots": [{{"prompt": "a lighthouse"}}]}}, {TINY!r})
out["state"] = via_serve.wait(story, progress=False, timeout=120).state.value
out["bytes"] = via_serve.fetch_video(story, {str(tmp_path / "a.mp4")!r}).stat().st_size
try:
    via_serve.submit({{"shots": [{{"prompt": "a", "cut": False}}]}})
except InvalidRequest as e:
    out["invalid"] = e.errors
direct = EngineClient.connect()
out["direct"] = [direct.via_serve, direct.status(story).state.value]
out["direct_bytes"] = direct.fetch_video(story, {str(tmp_path / "b.mp4")!r}).stat().st_size
try:
    direct.status("20990101T000000000-deadbeef")
except NotFound:
    out["not_found"] = True
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", code], env=stack.env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["state"] == "done" and out["bytes"] == out["direct_bytes"] > 0
    assert out["invalid"][0][0] == "script.shots.0.cut"
    assert out["direct"] == [False, "done"] and out["not_found"]
    assert probe_video(tmp_path / "a.mp4")["frames"] == TINY["num_frames"]


def test_client_reports_connection_errors_as_typed():
    with pytest.raises(StoryMemError) as err:
        StoryMemClient(f"http://127.0.0.1:{_free_port()}", token="t" * 16, timeout=2).status("abc")
    assert err.value.status == 503
