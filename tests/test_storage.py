from __future__ import annotations

import pickle
import re
import time
import urllib.error
import urllib.request

import pytest

from storymem.storage import (
    ArtifactStore,
    LocalStore,
    S3Store,
    StorageAccessDenied,
    StorageUnavailable,
    StoryLayout,
    make_story_id,
    open_store,
    validate_key,
)

# Every S3 test shares the session's SeaweedFS server (tests/conftest.py).
slow = pytest.mark.slow


@pytest.fixture(params=["local", pytest.param("s3", marks=slow)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def test_protocol(store):
    assert isinstance(store, ArtifactStore)


def test_put_get_exists(store):
    assert not store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"\x00\x01payload")
    assert store.exists("a/b.bin")
    assert store.get_bytes("a/b.bin") == b"\x00\x01payload"
    store.put_bytes("a/b.bin", b"second", content_type="text/plain")  # overwrite
    assert store.get_bytes("a/b.bin") == b"second"
    store.put_bytes("a/empty", b"")
    assert store.get_bytes("a/empty") == b"" and store.exists("a/empty")


def test_missing_key(store):
    with pytest.raises(KeyError):
        store.get_bytes("nope/missing.json")
    with pytest.raises(KeyError):
        store.get_file("nope/missing.json", "/tmp/never-written")
    assert not store.exists("nope/missing.json")


def test_list_and_delete_prefix(store):
    keys = ["s/x/2.bin", "s/x/1.bin", "s/xy/1.bin", "s/y/deep/er.bin", "t/1.bin"]
    for i, k in enumerate(keys):
        store.put_bytes(k, bytes([i]))
    assert store.list("s/x/") == ["s/x/1.bin", "s/x/2.bin"]
    # A prefix is a string prefix, as in S3: "s/x" also matches "s/xy/...".
    assert store.list("s/x") == ["s/x/1.bin", "s/x/2.bin", "s/xy/1.bin"]
    assert store.list("s/") == sorted(k for k in keys if k.startswith("s/"))
    assert store.list("") == sorted(keys)
    assert store.list("zzz/") == []
    store.delete_prefix("s/x/")
    assert store.list("") == ["s/xy/1.bin", "s/y/deep/er.bin", "t/1.bin"]
    store.delete_prefix("s/")
    assert store.list("") == ["t/1.bin"]
    store.delete_prefix("nothing/here/")  # no-op
    with pytest.raises(ValueError, match="prefix"):
        store.delete_prefix("")
    assert store.get_bytes("t/1.bin") == bytes([4])


def test_url_fetches_bytes(store):
    payload = bytes(range(256)) * 40
    store.put_bytes("u/video.mp4", payload, content_type="video/mp4")
    url = store.url("u/video.mp4", expires_s=600)
    assert isinstance(url, str)
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == payload


def test_files(store, tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(b"file-bytes" * 1000)
    store.put_file("f/in.bin", src)
    assert store.get_bytes("f/in.bin") == src.read_bytes()
    dest = tmp_path / "out" / "copy.bin"
    store.get_file("f/in.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.bin"]
    with pytest.raises(FileNotFoundError):
        store.put_file("f/x", tmp_path / "absent.bin")


@pytest.mark.parametrize("key", ["../x", "/abs", "a\\b", "a/../b", "a//b", "", "./a", "a/", "a\nb"])
def test_bad_keys_rejected(store, key):
    with pytest.raises(ValueError, match="key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="key"):
        store.get_bytes(key)
    with pytest.raises(ValueError, match="key"):
        store.exists(key)


def test_validate_key_accepts_layout_keys():
    layout = StoryLayout(make_story_id())
    for key in (layout.script, layout.shot(3), layout.keyframe(2, 1), layout.memory_state(0), layout.final):
        assert validate_key(key) == key


def test_local_store_stays_inside_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("a/b", b"1")
    assert (tmp_path / "root" / "a" / "b").read_bytes() == b"1"
    assert store.url("a/b") == (tmp_path / "root" / "a" / "b").resolve().as_uri()
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")
    assert not (tmp_path / "escape").exists()
    store.delete_prefix("a/")
    assert list((tmp_path / "root").iterdir()) == []  # emptied folders are pruned
    # Temporary files of an interrupted write are not keys.
    (tmp_path / "root" / "k").mkdir()
    (tmp_path / "root" / "k" / ".~tmp.x.1234").write_bytes(b"partial")
    assert store.list("") == []


def test_open_store(tmp_path, monkeypatch):
    local = open_store(str(tmp_path / "d"))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "d").resolve()
    assert open_store(tmp_path / "d") == local
    assert open_store(f"file://{tmp_path / 'd'}") == local
    assert open_store(local) is local
    monkeypatch.setenv("STORYMEM_S3_ENDPOINT", "127.0.0.1:1")
    s3 = open_store("s3://my-bucket")
    assert isinstance(s3, S3Store) and s3.bucket == "my-bucket" and s3.cfg.endpoint == "127.0.0.1:1"
    for bad in ("s3://", "s3://b/sub", "http://x/y"):
        with pytest.raises(ValueError, match="store"):
            open_store(bad)


def test_story_layout_keys():
    layout = StoryLayout("abc_1-2")
    assert layout.prefix == "stories/abc_1-2/"
    assert layout.script == "stories/abc_1-2/script.json"
    assert layout.settings == "stories/abc_1-2/settings.json"
    assert layout.manifest == "stories/abc_1-2/manifest.json"
    assert layout.shot(7) == "stories/abc_1-2/shots/007.mp4"
    assert layout.keyframe(12, 2) == "stories/abc_1-2/keyframes/012_2.jpg"
    assert layout.memory(1) == "stories/abc_1-2/memory/001.json"
    assert layout.memory_state(1) == "stories/abc_1-2/memory/001.npz"
    assert layout.final == "stories/abc_1-2/final.mp4"
    with pytest.raises(ValueError, match="k"):
        layout.shot(-1)
    flat = StoryLayout("abc", prefix="")  # a folder that holds one story
    assert (flat.manifest, flat.shot(0), flat.final) == ("manifest.json", "shots/000.mp4", "final.mp4")
    assert StoryLayout("abc", prefix="runs/abc/").memory(2) == "runs/abc/memory/002.json"
    for bad in ("runs", "/abs/", "../up/"):
        with pytest.raises(ValueError, match="prefix"):
            StoryLayout("abc", prefix=bad)


@pytest.mark.parametrize("bad", ["", "-abc", "_x", "a/b", "a.b", "../x", "a b", "x" * 65, "é", None])
def test_story_id_validation(bad):
    with pytest.raises(ValueError, match="story_id"):
        StoryLayout(bad)


def test_make_story_id_sorted_and_valid():
    ids = [make_story_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert ids == sorted(ids)
    for sid in ids:
        assert StoryLayout(sid).story_id == sid
        assert re.fullmatch(r"\d{8}T\d{9}-[0-9a-f]{8}", sid)
    assert ids[0][:8] == time.strftime("%Y%m%d", time.gmtime()) or ids[0][:8] < ids[-1][:8]


# --- S3 only -------------------------------------------------------------------------------------


@slow
def test_s3_repr_and_pickle_hide_nothing_secret(s3_server, s3_store, monkeypatch):
    secret = s3_store.cfg.secret_key.get_secret_value()
    assert secret not in repr(s3_store) and s3_server.access_key not in repr(s3_store)
    assert secret not in repr(s3_server) and secret not in repr(s3_store.cfg)
    pickled = pickle.dumps(s3_store)
    assert secret.encode() not in pickled
    # The copy reads the keys from its own process's environment, as an actor does (set here, not
    # left to whichever earlier test started Ray).
    monkeypatch.setenv("STORYMEM_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("STORYMEM_S3_SECRET_KEY", secret)
    clone = pickle.loads(pickled)
    s3_store.put_bytes("p/k", b"v")
    assert clone.get_bytes("p/k") == b"v"


@slow
def test_s3_bucket_created_once_even_when_racing(s3_server, s3_store):
    twin = S3Store(s3_store.cfg)  # same bucket: the second creation must be tolerated
    s3_store.ensure_bucket()
    twin.put_bytes("r/1", b"1")
    assert s3_store.get_bytes("r/1") == b"1"


@slow
def test_s3_wrong_credentials(s3_server, s3_store):
    s3_store.put_bytes("c/ok", b"1")
    wrong_secret = "definitely-not-the-secret-42"
    bad = S3Store(s3_server.storage_config(s3_store.bucket, secret_key=wrong_secret, retries=0))
    with pytest.raises(StorageAccessDenied) as info:
        bad.get_bytes("c/ok")
    assert wrong_secret not in str(info.value)
    real_secret = s3_store.cfg.secret_key.get_secret_value()
    wrong_key = S3Store(s3_server.storage_config(s3_store.bucket, access_key="nobody-here", retries=0))
    with pytest.raises(StorageAccessDenied) as info:
        wrong_key.put_bytes("c/x", b"1")
    assert real_secret not in str(info.value) and "nobody-here" not in str(info.value)
    assert not s3_store.exists("c/x")


@slow
def test_s3_presigned_url_expires_and_tampering_rejected(s3_store):
    s3_store.put_bytes("u/x", b"abc")
    url = s3_store.url("u/x")
    assert "X-Amz-Expires=3600" in url  # cfg.presign_expiry_s default
    tampered = url.replace("u/x", "u/y")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(tampered, timeout=10)
    assert info.value.code in (403, 404)


@slow
def test_s3_outage_retries_then_recovers(s3_server, s3_store):
    """S3 stopped mid-story: calls retry, give up with StorageUnavailable, and work again after a
    restart with the data still there."""
    s3_store.put_bytes("o/before", b"kept")
    s3_server.stop()
    try:
        start = time.monotonic()
        with pytest.raises(StorageUnavailable) as info:
            s3_store.get_bytes("o/before")
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert "3 attempts" in message  # retries=2 in the fixture's config
        assert s3_store.cfg.secret_key.get_secret_value() not in message
        assert s3_server.access_key not in message
        # Two sleeps: 0.05 then 0.1 s, each with jitter in [0.5, 1].
        assert 0.07 <= elapsed < 5
        with pytest.raises(StorageUnavailable):
            s3_store.put_bytes("o/during", b"x")
    finally:
        s3_server.start()
    assert s3_store.get_bytes("o/before") == b"kept"
    s3_store.put_bytes("o/after", b"new")
    assert s3_store.list("o/") == ["o/after", "o/before"]


@slow
def test_s3_call_survives_short_outage(s3_server, s3_store):
    """A restart shorter than the retry budget is invisible to the caller."""
    import threading

    s3_store.put_bytes("short/a", b"1")
    patient = S3Store(s3_server.storage_config(s3_store.bucket, retries=30, backoff_s=0.1, backoff_max_s=0.3))
    s3_server.stop()
    restarter = threading.Timer(0.5, s3_server.start)
    restarter.start()
    try:
        assert patient.get_bytes("short/a") == b"1"
    finally:
        restarter.join()


@slow
def test_a_killed_server_keeps_every_acknowledged_write(s3_server, s3_store):
    """stop() kills a server whose graceful stop hangs: what S3 acknowledged before must be there
    after the restart (here SIGKILL at once, the worst case), overwrites as their last version."""
    expected = {f"kill/{i}": bytes([i]) * (1000 + 37 * i) for i in range(20)}
    for key, data in expected.items():
        s3_store.put_bytes(key, data)
    expected["kill/3"] = b"overwritten"
    s3_store.put_bytes("kill/3", expected["kill/3"])
    s3_server.stop(timeout_s=0)
    s3_server.start()
    assert {key: s3_store.get_bytes(key) for key in expected} == expected
    assert s3_store.list("kill/") == sorted(expected)


@slow
def test_second_server_side_by_side_and_cli_entry(s3_server, tmp_path):
    """`python -m storymem.s3server` (as `make serve` runs it) beside the session's server."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from storymem.config import StorageConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pid_file, env_file = tmp_path / "s3.pid", tmp_path / "s3.env"
    env = dict(os.environ, STORYMEM_S3_SECRET_KEY="cli-secret-123456")
    proc = subprocess.Popen(
        [sys.executable, "-m", "storymem.s3server", "--dir", str(tmp_path / "data"), "--port", str(port),
         "--pid-file", str(pid_file), "--env-file", str(env_file), "--bucket", "served"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not env_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env_file.exists(), proc.stdout.read() if proc.poll() is not None else "no env file in 30 s"
        assert int(pid_file.read_text()) == proc.pid
        assert env_file.stat().st_mode & 0o077 == 0
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert values["STORYMEM_S3_ENDPOINT"] == f"127.0.0.1:{port}" != s3_server.endpoint
        cfg = StorageConfig(
            endpoint=values["STORYMEM_S3_ENDPOINT"],
            bucket=values["STORYMEM_S3_BUCKET"],
            access_key=values["STORYMEM_S3_ACCESS_KEY"],
            secret_key=values["STORYMEM_S3_SECRET_KEY"],
            retries=0,
        )
        served = S3Store(cfg)
        served.put_bytes("side/by-side", b"second")
        assert served.get_bytes("side/by-side") == b"second"
        # The session's server is unaffected and does not see the other server's bucket.
        session = S3Store(s3_server.storage_config("served", retries=0))
        assert session.list("side/") == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert not pid_file.exists() and not env_file.exists()


def test_server_rejects_busy_port(tmp_path):
    import socket

    from storymem.s3server import LocalS3Server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match="port"):
            LocalS3Server(tmp_path, port=s.getsockname()[1]).start()
