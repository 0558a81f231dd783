"""Request normalisation and validation, done once at the edge.

`normalise` turns a parsed JSON body into the `StoryRequest` the engine stores and runs: the script
validated, settings resolved against the model's defaults, the operator's limits applied
(`ServiceLimits`), model-capability checks run, and reference images decoded once and reduced to the
shot size. Reference images are bounded by decoded pixels read from their headers, before any pixel
is decoded. It is CPU work: the service calls it off the event loop (`asyncio.to_thread`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from ..config import ServiceLimits
from ..script import ImageRef, ScriptError, StoryRequest, check_transition_supported, load_request
from ..speed import SpeedConfig, check_settings
from .contract import InvalidRequest

# A model-capability check: raises ScriptError naming the field (e.g. settings.transition when the
# loaded model has no LoRA for it). Gets the resolved request and the engine's profile.
Check = Callable[[StoryRequest, dict], None]


def transition_check(request: StoryRequest, profile: dict) -> None:
    """The story's transition needs a loaded M2V LoRA set that serves it (the profile's `transitions`)."""
    supported = profile.get("transitions")
    if supported is not None:
        check_transition_supported(request.settings, supported)


def speed_check(speed: SpeedConfig | None) -> Check:
    """The deployment's speed mode refuses settings it cannot honour (e.g. guidance with a CFG-distilled mode)."""

    def check(request: StoryRequest, profile: dict) -> None:
        check_settings(request.settings, speed)

    return check


# The checks every StoryService runs (the profile carries what the loaded model supports); the
# service adds speed_check(cfg.speed) for its deployment's mode.
MODEL_CHECKS: list[Check] = [transition_check]


def wrap(data: Any) -> tuple[dict, bool]:
    """The body in the wrapped form `{"script", "settings"?}` (unset settings stay unset), and
    whether the client wrote the bare form (error fields are then relative to the script)."""
    if not isinstance(data, dict):
        raise InvalidRequest(422, [("<json>", f"the body must be a JSON object, got {type(data).__name__}")])
    if "script" in data:
        return dict(data), False
    body = {"script": {k: v for k, v in data.items() if k != "settings"}}
    if "settings" in data:
        body["settings"] = data["settings"]
    return body, True


def request_digest(data: Any) -> str:
    """A digest of the body as the client sent it (key order aside), for Idempotency-Key checks."""
    body, _ = wrap(data)
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def normalise(
    data: Any,
    limits: ServiceLimits | None = None,
    profile: dict | None = None,
    checks: Sequence[Check] = (),
) -> StoryRequest:
    """The validated, resolved request; InvalidRequest (422, fields named) otherwise."""
    limits = limits or ServiceLimits()
    profile = profile or {}
    body, bare = wrap(data)
    prefix = "" if bare else "script."
    try:
        request = load_request(body, allow_paths=False)
    except ScriptError as exc:
        errors = exc.errors
        if bare:
            errors = [(f.removeprefix("script.") if f != "script" else "<root>", p) for f, p in errors]
        raise InvalidRequest(422, errors) from None
    _check_references(request, limits, prefix)
    try:
        settings = request.settings.resolve(profile.get("defaults") or {})
    except ScriptError as exc:
        raise InvalidRequest(422, exc.errors) from None
    if request.script.reference_images:
        # A customised story takes the first reference's aspect ratio (unless it set a size): fitted
        # here, so that the stored settings, the cost check and the shot size agree.
        w, h = request.script.reference_images[0].size()  # header only
        settings = settings.fit_reference(h, w)
    request = request.model_copy(update={"settings": settings})
    _check_cost(request, limits, prefix)
    errors = []
    for check in checks:
        try:
            check(request, profile)
        except ScriptError as exc:
            errors.extend(exc.errors)
    if errors:
        raise InvalidRequest(422, errors)
    return _reduce_references(request, prefix)


def _check_references(request: StoryRequest, limits: ServiceLimits, prefix: str) -> None:
    errors, total = [], 0
    for i, ref in enumerate(request.script.reference_images):
        w, h = ref.size()  # header only
        total += w * h
        if w * h > limits.max_reference_pixels:
            errors.append((f"{prefix}reference_images.{i}.data",
                           f"{w}x{h} = {w * h} pixels exceeds service.limits.max_reference_pixels ({limits.max_reference_pixels})"))  # fmt: skip
    if not errors and total > limits.max_reference_pixels_total:
        errors.append((f"{prefix}reference_images",
                       f"{total} pixels in all exceeds service.limits.max_reference_pixels_total ({limits.max_reference_pixels_total})"))  # fmt: skip
    if errors:
        raise InvalidRequest(422, errors)


def _check_cost(request: StoryRequest, limits: ServiceLimits, prefix: str) -> None:
    s, shots = request.settings, request.script.num_shots
    pixels = s.width * s.height
    errors = []
    if shots > limits.max_shots:
        errors.append((f"{prefix}shots", f"{shots} shots; this service allows at most {limits.max_shots}"))
    if pixels > limits.max_frame_pixels:
        errors.append(("settings.width", f"{s.width}x{s.height} = {pixels} pixels a frame; at most {limits.max_frame_pixels}"))
    if s.num_frames > limits.max_frames:
        errors.append(("settings.num_frames", f"{s.num_frames} frames a shot; at most {limits.max_frames}"))
    if s.num_inference_steps > limits.max_steps:
        errors.append(("settings.num_inference_steps", f"{s.num_inference_steps} steps; at most {limits.max_steps}"))
    cost = pixels * s.num_frames * s.num_inference_steps * shots
    if not errors and cost > limits.max_cost:
        errors.append(("settings", f"cost {cost} (pixels x frames x steps x shots) exceeds service.limits.max_cost "
                                   f"({limits.max_cost}); use fewer shots, frames, steps or pixels"))  # fmt: skip
    if errors:
        raise InvalidRequest(422, errors)


def _reduce_references(request: StoryRequest, prefix: str) -> StoryRequest:
    """Decode each reference image once and shrink it to cover the shot size (the pipeline resizes
    memory images to the shot size anyway): what is stored and later decoded is small."""
    refs = request.script.reference_images
    if not refs:
        return request
    W, H = request.settings.width, request.settings.height
    out, errors = [], []
    for i, ref in enumerate(refs):
        try:
            rgb = ref.load()
        except ValueError as exc:
            errors.append((f"{prefix}reference_images.{i}.data", str(exc).removeprefix("data: ")))
            continue
        img = Image.fromarray(rgb)
        scale = max(W / img.width, H / img.height)
        if scale < 1.0:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(ImageRef(data=base64.b64encode(buf.getvalue()).decode("ascii")))
    if errors:
        raise InvalidRequest(422, errors)
    script = request.script.model_copy(update={"reference_images": out})
    return request.model_copy(update={"script": script})


__all__ = ["Check", "MODEL_CHECKS", "normalise", "request_digest", "speed_check", "transition_check", "wrap"]
