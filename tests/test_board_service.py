"""The storyboard page of the running service (`make serve`'s stack: Ray, SeaweedFS, the engine and
the Serve app, started by `python -m cluster.local start`), driven in headless Chromium: sign in,
submit a story from the form, watch it live, play its videos, inspect its memory, see field errors,
cancel and resume. One stack for the module; screenshots go to the artifacts folder."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.browser_util import load_images, play_videos
from tests.test_service import Stack, stack  # noqa: F401  (the module-scoped stack fixture)

pytestmark = pytest.mark.slow

THREE = {
    "story_name": "Board live",
    "story_overview": "Three shots of the toy character.",
    "shots": [
        {"prompt": "on a purple background, the character stands still in the upper right"},
        {"prompt": "the character moves down on the left on a purple background", "cut": False},
        {"prompt": "on a purple background, the character jumps in the lower right"},
    ],
}
TINY = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 3}
SLOW = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 20}

# Records every text the progress line shows (the story page is built after the page loads).
WATCH_PROGRESS = """
window.__progress = [];
new MutationObserver(() => {
  const n = document.getElementById("progress-text");
  const seen = window.__progress;
  if (n && seen[seen.length - 1] !== n.textContent) seen.push(n.textContent);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


@pytest.fixture(scope="module")
def site(browser, stack):  # noqa: F811
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.add_init_script(WATCH_PROGRESS)
    yield context
    context.close()


def _api(stack: Stack, method: str, path: str, **kw):
    r = httpx.request(method, stack.url + path, headers={"Authorization": f"Bearer {stack.token}"}, timeout=30, **kw)
    r.raise_for_status()
    return r.json()


def _sign_in(page, stack: Stack):
    page.goto(stack.url + "/")
    page.fill("#token", stack.token)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#stories")


def _submit(page, script: dict, settings: dict, references: list[tuple[str, bytes]] = ()):
    page.click("nav.top [data-nav=new]")
    page.wait_for_selector("#settings-width")  # the settings form is built from /openapi.json
    if references:
        _attach_references(page, list(references))
    page.fill("#script", json.dumps(script, indent=1))
    for name, value in settings.items():
        page.fill(f"#settings-{name}", str(value))
    page.click("#submit")


def _png(width=48, height=32) -> bytes:
    image = np.zeros((height, width, 3), np.uint8)
    image[8:24, 16:32] = (230, 180, 40)  # a yellow square: the "character" of a customised story
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _attach_references(page, files: list[tuple[str, bytes]]):
    page.set_input_files("#refs", files=[{"name": n, "mimeType": "image/png", "buffer": b} for n, b in files])
    page.wait_for_function(f"document.querySelectorAll('.refs-preview img').length === {len(files)}")


def _story_id(page) -> str:
    page.wait_for_url("**/#/story/*")
    return page.url.rsplit("/", 1)[-1]


def test_sign_in_submit_watch_play_and_inspect(site, stack, artifacts):  # noqa: F811
    page = site.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # A wrong token is refused next to the field and not kept.
    page.goto(stack.url + "/")
    page.fill("#token", "not-the-token-at-all")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#token-errors li")
    assert "invalid token" in page.inner_text("#token-errors")
    assert page.evaluate("sessionStorage.getItem('storymem.token')") is None
    _sign_in(page, stack)
    assert page.evaluate("sessionStorage.getItem('storymem.token')") == stack.token
    assert page.evaluate("localStorage.length") == 0  # kept for the tab only

    # The settings form shows the schema's defaults.
    page.click("nav.top [data-nav=new]")
    page.wait_for_selector("#settings-width")
    assert page.get_attribute("#settings-num_inference_steps", "placeholder") == "default 40"
    assert page.locator("#example option").count() >= 3

    _submit(page, THREE, TINY)
    story = _story_id(page)
    page.wait_for_function("document.getElementById('progress-text')?.dataset.phase === 'done'", timeout=240_000)
    # The phase attribute and the line's text change in separate updates: wait until the observer saw the text.
    page.wait_for_function("window.__progress.includes('done: 3 of 3 shots')", timeout=30_000)
    seen = page.evaluate("window.__progress")
    assert any("shot 1 of 3" in t for t in seen) and any("shot 3 of 3" in t for t in seen), seen
    steps = [t for t in seen if "step " in t]
    assert len({t for t in steps}) >= 2, seen  # the denoising step moved while we watched
    assert seen[-1] == "done: 3 of 3 shots"

    page.wait_for_function("document.querySelectorAll('.sb-shot.sb-done').length === 3 && "
                           "document.querySelector('.sb-final video') !== null")  # fmt: skip
    shots = play_videos(page, ".sb-shot video")
    assert len(shots) == 3
    assert all(v["readyState"] >= 2 and v["played"] is True and v["duration"] > 0.3 for v in shots), shots
    (final,) = play_videos(page, ".sb-final video")
    assert final["played"] is True and final["duration"] > max(v["duration"] for v in shots)

    memory = _api(stack, "GET", f"/v1/stories/{story}/memory")
    assert memory["script"]["story_overview"] == THREE["story_overview"]
    added = page.locator(".sb-shot .sb-keyframe")
    want = [f"{m['index']}:{k['frame']}" for m in memory["shots"] for k in m["keyframes"]]
    assert [added.nth(i).get_attribute("data-origin") for i in range(added.count())] == want and want
    used = [f"{u['shot']}:{u['frame']}" for m in memory["shots"] for u in m["memory_used"]]
    got = page.locator(".sb-shot .sb-memory")
    assert [got.nth(i).get_attribute("data-origin") for i in range(got.count())] == used
    images = load_images(page, ".sb-shot .sb-thumb img")
    assert len(images) == len(want) + len(used) and all(i["width"] == TINY["width"] for i in images), images
    prompts = page.locator(".sb-shot .sb-prompt").all_inner_texts()
    assert prompts == [s["prompt"] for s in THREE["shots"]]

    # Where a keyframe came from.
    page.locator(".sb-shot .sb-keyframe").first.click()
    shot, frame = want[0].split(":")
    assert page.inner_text(".sb-inspector h3") == f"Shot {int(shot) + 1}, frame {frame}"
    page.screenshot(path=str(artifacts / "service-story.png"), full_page=True)

    # The list shows it, filtered by state.
    page.click("nav.top [data-nav=list]")
    row = page.locator(f'#stories tr[data-id="{story}"]')
    row.wait_for()
    assert row.locator(".state").inner_text() == "done" and row.locator(".shots").inner_text() == "3 / 3"
    page.select_option("#filter-state", "running")
    page.wait_for_function(f"!document.querySelector('#stories tr[data-id=\"{story}\"]')")
    page.screenshot(path=str(artifacts / "service-list.png"))
    assert not errors, errors
    page.close()


def test_bad_script_and_settings_show_field_errors(site, stack):  # noqa: F811
    page = site.new_page()
    _sign_in(page, stack)
    before = _api(stack, "GET", "/v1/stories?limit=1")["total"]
    # A script comes from an example shipped with the page, or from a file.
    page.click("nav.top [data-nav=new]")
    page.wait_for_selector("#example option[value='st-bench-cat.json']", state="attached")
    page.select_option("#example", "st-bench-cat.json")
    page.wait_for_function("document.getElementById('script').value.includes('scenes')")
    assert len(json.loads(page.input_value("#script"))["scenes"]) >= 1
    page.set_input_files("#script-file", files=[{"name": "mine.json", "mimeType": "application/json",
                                                 "buffer": json.dumps(THREE).encode()}])  # fmt: skip
    page.wait_for_function("document.getElementById('script').value.includes('Board live')")
    bad = {"shots": [{"prompt": "first", "cut": False}, {"prompt": "second"}]}
    _submit(page, bad, {"width": 50})
    page.wait_for_selector("#script-errors li")
    script_errors = page.locator("#script-errors li")
    fields = [script_errors.nth(i).get_attribute("data-field") for i in range(script_errors.count())]
    assert fields == ["script.shots.0.cut"], fields
    assert "the first shot must be a cut" in script_errors.first.inner_text()
    assert "multiple of 16" in page.inner_text("#settings\\.width-errors")
    assert "invalid" in page.get_attribute("#settings-width", "class")
    assert "invalid" in page.get_attribute("#script", "class")
    assert page.url.endswith("#/new") and _api(stack, "GET", "/v1/stories?limit=1")["total"] == before
    # An uploaded reference image that is not an image: the error sits by the upload field.
    page.fill("#script", json.dumps(THREE))
    page.fill("#settings-width", "")
    _attach_references(page, [("hero.png", b"this is not a PNG")])
    page.click("#submit")
    page.wait_for_selector("#reference_images-errors li")
    field = page.get_attribute("#reference_images-errors li", "data-field")
    assert field.startswith("script.reference_images.0"), field
    assert page.locator("#script-errors li").count() == 0
    assert _api(stack, "GET", "/v1/stories?limit=1")["total"] == before
    # Not JSON at all: said before anything is sent.
    page.fill("#script", "{not json")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#script-errors li')?.textContent.includes('not valid JSON')")
    page.close()


def test_cancel_then_resume_from_the_story_page(site, stack, artifacts):  # noqa: F811
    page = site.new_page()
    _sign_in(page, stack)
    # A customised story: the reference image is uploaded in the form and seeds the memory.
    _submit(page, {"story_name": "Board cancel", "shots": [{"prompt": f"the character, take {i}"} for i in range(4)]},
            SLOW, references=[("hero.png", _png())])  # fmt: skip
    story = _story_id(page)
    page.wait_for_function("document.getElementById('progress-text')?.dataset.phase === 'denoise'", timeout=120_000)
    assert page.is_enabled("#cancel") and page.is_disabled("#resume")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('progress-text')?.dataset.phase === 'cancelled'", timeout=60_000)
    page.wait_for_function("!document.getElementById('resume').disabled")
    status = _api(stack, "GET", f"/v1/stories/{story}")
    assert status["state"] == "cancelled" and status["shots_done"] < 4
    assert page.locator(".sb-shot.sb-done").count() == status["shots_done"]
    page.click("#resume")
    page.wait_for_function("document.getElementById('progress-text')?.dataset.phase === 'done'", timeout=240_000)
    page.wait_for_function("document.querySelectorAll('.sb-shot.sb-done video').length === 4 && "
                           "document.querySelector('.sb-final video') !== null")  # fmt: skip
    videos = play_videos(page, ".sb-shot video, .sb-final video")
    assert len(videos) == 5 and all(v["played"] is True for v in videos), videos
    assert _api(stack, "GET", f"/v1/stories/{story}")["state"] == "done"
    (ref,) = load_images(page, ".sb-script .sb-refs img")
    assert (ref["width"], ref["height"]) == (48, 32)
    first = page.locator('#sb-shot-0 .sb-memory[data-origin="-1:0"] img')
    assert first.count() == 1 and first.evaluate("i => i.naturalWidth") == 48  # shot 1 (MR2V) saw it
    assert page.locator("#sb-shot-0 .sb-tag").first.inner_text() == "mr2v"
    page.screenshot(path=str(artifacts / "service-resumed.png"), full_page=True)
    page.close()


def test_story_list_pages_and_filters(site, stack):  # noqa: F811
    page = site.new_page()
    _sign_in(page, stack)
    listed = _api(stack, "GET", "/v1/stories?limit=2")
    assert listed["total"] >= 2  # the stories of the tests above
    page.goto(stack.url + "/#/?limit=1")
    page.wait_for_selector("#stories tbody tr[data-id]")
    first = page.get_attribute("#stories tbody tr[data-id]", "data-id")
    assert first == listed["items"][0]["id"] and page.is_disabled("#prev") and page.is_enabled("#next")
    assert page.inner_text(".toolbar .hint") == f"1–1 of {listed['total']}"
    page.click("#next")
    page.wait_for_function(f"document.querySelector('#stories tbody tr[data-id]')?.dataset.id === '{listed['items'][1]['id']}'")
    assert page.is_enabled("#prev")
    # The name filter narrows the page in place.
    page.goto(stack.url + "/#/")
    page.wait_for_selector("#stories tbody tr[data-id]")
    page.fill("#filter-text", "board live")
    page.wait_for_function("[...document.querySelectorAll('#stories tbody tr[data-id]')].every(r => r.textContent.includes('Board live'))")
    assert page.locator("#stories tbody tr[data-id]").count() >= 1
    page.close()
