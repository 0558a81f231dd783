"""Small pieces the actors share: frame handles and unwrapping remote errors."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError

# An actor that died or cannot be reached (ActorDiedError, ActorUnavailableError are subclasses).
ACTOR_LOST = (RayActorError,)


@dataclass(frozen=True)
class FramesRef:
    """A shot's frames in Ray's object store: the handle the runner passes to scorers and memory."""

    ref: ray.ObjectRef
    count: int


def cause(error: BaseException) -> BaseException:
    """The exception raised inside a remote method, without Ray's RayTaskError wrapper."""
    while isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
        error = error.cause
    return error


def get(ref, timeout: float | None = None):
    """ray.get that re-raises a remote method's own exception (StorageUnavailable, ValueError...)
    rather than the RayTaskError around it; actor loss stays a RayActorError."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayTaskError as e:
        inner = cause(e)
        if inner is e:
            raise
        raise inner from None
