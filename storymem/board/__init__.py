"""The storyboard: a web page that shows a story's shots, videos and memory bank as it evolved.

One front end (static HTML, CSS and vanilla JS under `static/`, no build step, nothing fetched
from outside) serves two uses:

* `write_board(run_dir)` (`storymem board OUT_DIR`) writes `board.html` into a `storymem run`
  folder: the page with its scripts, styles and the story's data inlined, linking the folder's
  videos and keyframes by relative paths, so it opens from disk (file://) without any server.
  With `compare_dir` (the same story run with memory removed) it shows both runs shot by shot.
* `mount(app)` serves the interactive page of the HTTP API at `/` and its files at `/board/...`
  (no token needed for these files; the page sends the API token to the data routes itself).

Both feed the same view object (`story_view` here, `viewFromApi` in app.js) to `StoryBoard.render`
in board.js: `{id, title, state, model, fps, settings, script, shots, final, compare}` where each
shot is `{index, prompt, cut, mode, video, frames, keyframes: [{frame, url, aesthetic,
similarity_prev}], memory_used: [{shot, frame, source, slot, url}]}`.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from urllib.parse import quote

STATIC = Path(__file__).resolve().parent / "static"
EXAMPLES = Path(__file__).resolve().parent / "examples"
BOARD_FILE = "board.html"
_INLINE_REFERENCE_BYTES = 2 * 1024 * 1024  # larger references are shown as a placeholder tile


class BoardError(ValueError):
    """The folder is not a `storymem run` folder (or cannot be read); the message names the path."""


# ---------------------------------------------------------------------------------------------- script


def script_outline(script: dict | None, inline_references: bool = True) -> dict | None:
    """What the page shows of a stored script (script.json, the flat form): name, overview, shots
    ({prompt, cut, scene}) and reference images as data: URIs (None where too large or a path)."""
    if not isinstance(script, dict):
        return None
    refs = []
    for ref in script.get("reference_images") or []:
        data = ref.get("data") if isinstance(ref, dict) else None
        if not inline_references or not data or len(data) > _INLINE_REFERENCE_BYTES * 4 // 3:
            refs.append(None)
        elif data.startswith("data:"):
            refs.append(data)
        else:
            refs.append(f"data:{_image_type(data)};base64,{data}")
    return {
        "story_name": script.get("story_name"),
        "story_overview": script.get("story_overview"),
        "shots": [
            {"prompt": s.get("prompt", ""), "cut": bool(s.get("cut", True)), "scene": s.get("scene")}
            for s in script.get("shots") or []
        ],
        "reference_images": refs,
    }


def stored_story(store, story_id: str) -> dict:
    """`{"script", "settings"}` of a story in a service store (stories/<id>/): the script as
    `script_outline` gives it and the resolved settings, each None until the story has started."""
    from storymem.storage import StoryLayout

    layout, out = StoryLayout(story_id), {}
    for name, key in (("script", layout.script), ("settings", layout.settings)):
        try:
            out[name] = json.loads(store.get_bytes(key))
        except KeyError:
            out[name] = None
    out["script"] = script_outline(out["script"])
    return out


def _image_type(b64: str) -> str:
    head = base64.b64decode(b64[:16] + "=" * (-len(b64[:16]) % 4), validate=False)
    return "image/png" if head.startswith(b"\x89PNG") else "image/jpeg"


# ---------------------------------------------------------------------------------------------- a run folder


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BoardError(f"{path}: no {what}; is this a `storymem run` output folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BoardError(f"{path}: cannot read the {what} ({exc})") from None


def story_view(run_dir: str | os.PathLike, link_base: str = "") -> dict:
    """The view object of a `storymem run` folder. Links are `link_base` + the file's key (a
    relative path inside the folder); only files the manifest names are linked."""
    from storymem.story import Manifest

    root = Path(run_dir)
    raw = _read_json(root / "manifest.json", "manifest.json")
    try:
        manifest = Manifest.model_validate(raw)
    except ValueError as exc:
        raise BoardError(f"{root / 'manifest.json'}: not a StoryMem manifest ({exc})") from None
    script = None
    if (root / "script.json").exists():
        script = _read_json(root / "script.json", "script.json")

    def link(key: str | None) -> str | None:
        # A relative URL: folder names may hold spaces, '#' or '%'.
        return None if key is None else quote(link_base + key, safe="/")

    by_frame = {}
    shots = []
    for r in manifest.shots:
        keyframes = []
        for kf in r.keyframes:
            item = {**kf, "url": link(kf.get("key")) if (root / kf.get("key", "")).is_file() else None}
            by_frame[(r.index, kf.get("frame"))] = item["url"]
            keyframes.append(item)
        used = [{**m, "url": by_frame.get((m.get("shot"), m.get("frame")))} for m in r.memory_used]
        shots.append(
            {
                "index": r.index,
                "prompt": r.prompt,
                "cut": r.cut,
                "mode": r.mode,
                "seed": r.seed,
                "frames": r.frames,
                "video": link(r.video),
                "keyframes": keyframes,
                "memory_used": used,
                "wall_s": r.wall_s,
            }
        )
    settings = manifest.settings
    return {
        "id": manifest.story_id,
        "title": manifest.story_name or manifest.story_id,
        "state": manifest.state,
        "model": manifest.model,
        "error": manifest.error,
        "shots_total": manifest.shots_total,
        "fps": settings.get("fps", 16),
        "settings": settings,
        "script": script_outline(script),
        "shots": shots,
        "final": link(manifest.final) if manifest.final and (root / manifest.final).is_file() else None,
        "created": manifest.created,
    }


def _compare_view(compare_dir: Path, out_dir: Path, label: str) -> dict:
    base = os.path.relpath(compare_dir, out_dir).replace(os.sep, "/") + "/"
    other = story_view(compare_dir, link_base=base)
    return {
        "label": label,
        "title": other["title"],
        "shots": [{"index": s["index"], "video": s["video"], "keyframes": s["keyframes"]} for s in other["shots"]],
        "final": other["final"],
        "settings": other["settings"],
    }


def _inline(text: str) -> str:
    # Inside <script>, only "</" can end the element early.
    return text.replace("</", "<\\/")


def render_page(view: dict, title: str | None = None) -> str:
    """A self-contained HTML document showing `view` (styles and scripts inlined)."""
    css = (STATIC / "board.css").read_text(encoding="utf-8")
    js = (STATIC / "board.js").read_text(encoding="utf-8")
    # "<" as \u003c: no prompt can end the data element or open a comment in it.
    data = json.dumps(view, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    name = html.escape(title or view.get("title") or "StoryMem storyboard")
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{name} · StoryMem storyboard</title>\n<style>\n{css}\n</style></head>\n"
        "<body class=\"sb-static\"><div id=\"board\"></div>\n"
        f"<script>\n{_inline(js)}\n</script>\n"
        f"<script id=\"story-data\" type=\"application/json\">{data}</script>\n"
        "<script>StoryBoard.render(document.getElementById('board'), "
        "JSON.parse(document.getElementById('story-data').textContent));</script>\n"
        "</body></html>\n"
    )


def write_board(
    run_dir: str | os.PathLike, compare_dir: str | os.PathLike | None = None, compare_label: str = "without memory"
) -> Path:
    """Write `board.html` into `run_dir` (a `storymem run` folder) and return its path.

    compare_dir: the same story run with memory removed; its shots and final video appear beside
    this run's, shot by shot, under `compare_label`. Links are relative, so the folders may move
    together.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise BoardError(f"{root}: not a folder")
    view = story_view(root)
    if compare_dir is not None:
        other = Path(compare_dir)
        if not other.is_dir():
            raise BoardError(f"{other}: not a folder")
        view["compare"] = _compare_view(other, root, compare_label)
    out = root / BOARD_FILE
    tmp = root / f".{BOARD_FILE}.tmp"
    tmp.write_text(render_page(view), encoding="utf-8")
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------------- the service


def example_index() -> list[dict]:
    """The example scripts shipped with the page: [{name, file, shots}]."""
    out = []
    for path in sorted(EXAMPLES.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        shots = len(data.get("shots") or []) or sum(len(s.get("video_prompts", [])) for s in data.get("scenes", []))
        out.append({"name": data.get("story_name") or path.stem, "file": path.name, "shots": shots})
    return out


def mount(app) -> None:
    """Serve the storyboard on a FastAPI app: the page at `/`, its files at `/board/...`, the
    examples at `/board/examples/...` (with `/board/examples/index.json`). No token is needed for
    these static files; every data route keeps its own bearer check."""
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.staticfiles import StaticFiles

    index = STATIC / "index.html"

    @app.get("/", include_in_schema=False)
    async def _page():
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/board/examples/index.json", include_in_schema=False)
    async def _examples():
        return JSONResponse(example_index())

    app.mount("/board/examples", StaticFiles(directory=EXAMPLES), name="board-examples")
    app.mount("/board", StaticFiles(directory=STATIC), name="board")
