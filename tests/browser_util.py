"""Checks that browser tests run inside a page: media that loads and plays, images that decode."""

from __future__ import annotations

PLAY_VIDEOS = """async (selector) => {
  const out = [];
  for (const v of Array.from(document.querySelectorAll(selector))) {
    if (v.readyState < 2 && !v.error) {
      await new Promise((done) => {
        v.addEventListener("canplay", done, { once: true });
        v.addEventListener("error", done, { once: true });
        setTimeout(done, 15000);
      });
    }
    let played = false;
    try {
      v.muted = true;
      const t0 = v.currentTime;
      await v.play();
      await new Promise((r) => setTimeout(r, 300));
      played = v.currentTime > t0 || v.ended;
      v.pause();
    } catch (e) {
      played = "play() failed: " + e;
    }
    out.push({ src: v.currentSrc, readyState: v.readyState, duration: v.duration, played: played,
               error: v.error ? v.error.code : null });
  }
  return out;
}"""

LOAD_IMAGES = """async (selector) => {
  const imgs = Array.from(document.querySelectorAll(selector));
  await Promise.all(imgs.map((i) => i.complete ? null : new Promise((done) => {
    i.addEventListener("load", done, { once: true });
    i.addEventListener("error", done, { once: true });
    setTimeout(done, 15000);
  })));
  return imgs.map((i) => ({ src: i.currentSrc || i.src, width: i.naturalWidth, height: i.naturalHeight }));
}"""


def play_videos(page, selector: str) -> list[dict]:
    """Each matching <video>: waits until it can play, plays it briefly; readyState, duration, played."""
    return page.evaluate(PLAY_VIDEOS, selector)


def load_images(page, selector: str) -> list[dict]:
    """Each matching <img> once loaded (or failed): naturalWidth/Height (0 when it did not decode)."""
    return page.evaluate(LOAD_IMAGES, selector)
