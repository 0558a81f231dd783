"""Shared pytest fixtures. Each section serves one concern; add new ones as their own section."""

from __future__ import annotations

import uuid

import pytest

# --- S3 (SeaweedFS) ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One local S3 server for the whole session, on free ports, data in a session tmp dir."""
    from storymem.s3server import LocalS3Server

    server = LocalS3Server(tmp_path_factory.mktemp("s3data"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_server):
    """An S3Store on a fresh bucket with fast retries (tests that stop the server stay short)."""
    from storymem.storage import S3Store

    if not s3_server.running:  # a fault test left it stopped
        s3_server.start()
    cfg = s3_server.storage_config(
        f"t-{uuid.uuid4().hex[:16]}", retries=2, backoff_s=0.05, backoff_max_s=0.2, connect_timeout_s=2.0
    )
    return S3Store(cfg)


# --- Ray (a local cluster for the engine tests) -------------------------------------------------


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A private local Ray for the session: 4 logical CPUs, 300 MB object store, quiet, own temp dir;
    its workers get the session S3 server's keys from the environment (not in actor arguments)."""
    import shutil
    import tempfile

    import ray

    from actors import init_local_ray

    # A short path: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray-")
    init_local_ray(temp, num_cpus=4, object_store_mb=300, storage=s3_server.storage_config())
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# --- Browser (headless Chromium from Debian, driven by Playwright) -------------------------------

CHROMIUM = "/usr/bin/chromium"
# Root needs --no-sandbox; the rest keep Chromium from dialling Google's hosts on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (`make test` installs Debian's chromium). Not per
    session: Playwright's sync API keeps an event loop running in the main thread while it is open,
    and later modules' asyncio.run() would refuse to start."""
    import os

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def artifacts():
    """Where browser tests save screenshots: $STORYMEM_TEST_ARTIFACTS or out/test-artifacts."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("STORYMEM_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "out" / "test-artifacts"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser test artifacts: {root}")
    return root
