"""The Ray layer: thin actor shells over `storymem` (see actors/README.md and actors/api.py)."""

from __future__ import annotations

from .api import ENGINE_NAME, EngineFull, StoryConflict, StoryNotFound, StoryState, StoryStatus, get_engine


def init_local_ray(temp_dir: str, num_cpus: int | None = None, object_store_mb: int = 500, storage=None):
    """A private, quiet local Ray for one process (demo, tests, benches): its own temp dir, no
    dashboard, bound to 127.0.0.1, never attaching to another cluster on the machine.

    Token auth is disabled unless the environment says otherwise: with it, ray.init writes
    ~/.ray/auth_token and later Ray CLI calls on the machine demand that token.
    temp_dir should be short: Ray's unix socket paths are limited to 107 bytes.
    storage (a StorageConfig): its keys are exported first, so that the workers, which inherit this
    process's environment, open the store without the keys riding in actor arguments.
    """
    import logging
    import os

    if storage is not None:
        storage.export_credentials()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    return ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        _node_ip_address="127.0.0.1",
        object_store_memory=object_store_mb * 1024**2,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )


def start_engine(cfg=None, detached: bool | None = None, wait: bool = True, timeout: float = 300.0):
    """The StoryEngine handle in namespace `cfg.engine.namespace`: the running one, else a new one.

    Ray must be initialised. detached None takes `cfg.engine.detached`. wait: block until a
    generator has loaded the model (submissions made earlier simply wait for it too).
    """
    import ray

    from storymem.config import StoryMemConfig

    from .engine import StoryEngine

    cfg = cfg or StoryMemConfig()
    if not isinstance(cfg, StoryMemConfig):
        raise ValueError(f"cfg: expected a StoryMemConfig, got {type(cfg).__name__}")
    ns = cfg.engine.namespace
    try:
        handle = ray.get_actor(ENGINE_NAME, namespace=ns)
    except ValueError:
        detached = cfg.engine.detached if detached is None else detached
        handle = StoryEngine.options(
            name=ENGINE_NAME,
            namespace=ns,
            lifetime="detached" if detached else None,
            get_if_exists=True,
            max_restarts=-1,  # a restarted engine rebuilds its story list from storage
            max_concurrency=1000,  # long-polls wait inside the actor
            num_cpus=0,
        ).remote(cfg.without_secrets())  # Ray keeps actor arguments in its GCS: the actors read secrets from env
    if wait:
        ray.get(handle.wait_ready.remote(timeout))
    return handle


__all__ = [
    "ENGINE_NAME",
    "EngineFull",
    "StoryConflict",
    "StoryNotFound",
    "StoryState",
    "StoryStatus",
    "get_engine",
    "init_local_ray",
    "start_engine",
]
