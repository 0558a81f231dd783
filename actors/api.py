"""Handles on the engine. Its contract (methods, states, status, errors) is written once, in
`storymem.service.contract`; this module names the actor and finds it."""

from __future__ import annotations

from storymem.service.contract import (  # noqa: F401  (the contract, for callers of the Ray layer)
    ENGINE_METHODS,
    Conflict,
    NotFound,
    QueueFull,
    StoryState,
    StoryStatus,
)

ENGINE_NAME = "storymem-engine"

# The engine raises the contract's errors; these names stay for callers written against them.
EngineFull = QueueFull
StoryNotFound = NotFound
StoryConflict = Conflict


def get_engine(namespace: str = "storymem"):
    """The running engine's handle (the engine must have been started in this Ray cluster)."""
    import ray

    return ray.get_actor(ENGINE_NAME, namespace=namespace)
