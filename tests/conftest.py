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
def ray_local():
    """A private local Ray for the session: 4 logical CPUs, 300 MB object store, quiet, own temp dir."""
    import shutil
    import tempfile

    import ray

    from actors import init_local_ray

    # A short path: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray-")
    init_local_ray(temp, num_cpus=4, object_store_mb=300)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
