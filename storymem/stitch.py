"""Video files: H.264 MP4 encode/decode and stitching shots into one story video.

Shots are `(F, H, W, 3)` uint8 RGB arrays. A shot that continues the previous one (`cut == false`)
starts with frames that duplicate the previous shot's conditioning frames (MI2V: 1, MM2V: 5), so
stitching drops them. Encoding streams frame by frame so that a minute-long story never has to be
held as one array.

Stitching stored shots remuxes when it can (`stitch_videos`): the H.264 packets are copied into the
final MP4 without decoding or encoding (no second generation loss, a fraction of the time). That
needs every shot to share its codec parameters (codec, size, pixel format, time base, frame rate and
the SPS/PPS in the extradata) and every cut to start on an IDR frame that nothing after it
references across. Shots are encoded for this: `keyframes=[drop]` forces an IDR frame (x264
forced-idr, closed GOP) where the stitched part of a continuing shot begins. Anything else (shots
stored before, other encoders) is re-encoded, and the result says which path was taken and why.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

VideoSource = str | os.PathLike | bytes | bytearray | memoryview

# Frames a continuing shot repeats from its predecessor (method.md, "The loop", step 4).
_OVERLAP = {"none": 0, "mi2v": 1, "mm2v": 5}
# x264's macroblock tree makes the output depend on stale memory for some frame sizes (measured:
# 32x32, 40x40, 80x64 gave different bytes run to run); without it the same frames always give the
# same file, which resuming a story relies on.
_X264_PARAMS = "mbtree=0"


def _check_keyframes(keyframes: Iterable[int] | None) -> frozenset[int]:
    out = frozenset(int(k) for k in (keyframes or ()))
    if any(k < 0 for k in out):
        raise ValueError(f"keyframes: frame indices must be >= 0, got {sorted(out)}")
    return out


@lru_cache(maxsize=1)
def pyav_has_libx264() -> bool:
    """Whether PyAV's bundled FFmpeg can encode with libx264."""
    try:
        import av

        av.codec.Codec("libx264", "w")
    except Exception:
        return False
    return True


def _check_fps(fps: float) -> Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise ValueError(f"fps: expected a number, got {type(fps).__name__}")
    if not 0 < fps <= 240:
        raise ValueError(f"fps: {fps} is outside (0, 240]")
    return Fraction(fps).limit_denominator(1001)


def _check_crf(crf: int) -> int:
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf: {crf!r} is not an integer in [0, 51]")
    return crf


def _as_frames(frames: Any, field: str = "frames") -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{field}: expected shape (F, H, W, 3) or (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"{field}: dtype {arr.dtype}, expected uint8")
    return arr


def _check_even(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            raise ValueError(f"{name}: {value} must be positive")
        if value % 2:
            raise ValueError(f"{name}: {value} is odd; H.264 with yuv420p needs an even width and height")


class _PyAVEncoder:
    def __init__(self, path: str, width: int, height: int, fps: Fraction, crf: int, keyframes: frozenset[int]):
        import av

        self._container = av.open(path, "w", format="mp4", options={"movflags": "+faststart"})
        stream = self._container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = 1 / fps
        # forced-idr: a frame sent as type I becomes an IDR (x264 closes the GOP before it), not a
        # recovery-point I frame that later frames could reference across.
        stream.options = {"crf": str(crf), "x264-params": _X264_PARAMS, "forced-idr": "1"}
        self._stream = stream
        self._keyframes = keyframes
        self._pts = 0

    def write(self, frame: np.ndarray) -> None:
        import av
        from av.video.frame import PictureType

        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if self._pts in self._keyframes:
            vf.pict_type = PictureType.I
        vf.pts = self._pts
        self._pts += 1
        self._container.mux(self._stream.encode(vf))

    def close(self, ok: bool) -> None:
        try:
            if ok:
                self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()


class _FFmpegPipeEncoder:
    """imageio-ffmpeg's static binary, fed raw RGB on stdin (used when PyAV lacks libx264)."""

    def __init__(self, path: str, width: int, height: int, fps: Fraction, crf: int, keyframes: frozenset[int]):
        import imageio_ffmpeg

        force = ["-force_key_frames", "expr:" + "+".join(f"eq(n,{k})" for k in sorted(keyframes))] if keyframes else []
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
            "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-x264-params", _X264_PARAMS,
            "-forced-idr", "1", *force, "-movflags", "+faststart", "-f", "mp4", path,
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frame: np.ndarray) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            self.close(ok=False)
            raise

    def close(self, ok: bool) -> None:
        assert self._proc.stdin is not None
        if not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        if not ok:
            self._proc.kill()
        err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
        rc = self._proc.wait()
        if ok and rc != 0:
            raise RuntimeError(f"ffmpeg failed with exit code {rc}: {err.strip()[-2000:]}")


class VideoWriter:
    """Streaming H.264/yuv420p MP4 writer; the file appears atomically on a successful close.

    The frame size is fixed by the first frames written. `backend` "auto" uses PyAV when its FFmpeg
    has libx264, else the imageio-ffmpeg binary. `keyframes`: frame indices encoded as IDR frames
    (frame 0 always is one), where a stitched story may later start a cut.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 16,
        crf: int = 18,
        backend: Literal["auto", "pyav", "ffmpeg"] = "auto",
        keyframes: Iterable[int] | None = None,
    ):
        if backend not in ("auto", "pyav", "ffmpeg"):
            raise ValueError(f"backend: {backend!r} is not one of 'auto', 'pyav', 'ffmpeg'")
        if backend == "auto":
            backend = "pyav" if pyav_has_libx264() else "ffmpeg"
        self.path = Path(path)
        self.fps = _check_fps(fps)
        self.crf = _check_crf(crf)
        self.backend = backend
        self.keyframes = _check_keyframes(keyframes)
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (height, width)
        self._encoder: _PyAVEncoder | _FFmpegPipeEncoder | None = None
        self._tmp: str | None = None
        self._closed = False

    def _open(self, height: int, width: int) -> None:
        _check_even(width, height)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as the target so that os.replace is a rename, never a copy.
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp.mp4", dir=self.path.parent)
        os.close(fd)
        cls = _PyAVEncoder if self.backend == "pyav" else _FFmpegPipeEncoder
        self._encoder = cls(self._tmp, width, height, self.fps, self.crf, self.keyframes)
        self.size = (height, width)

    def write(self, frames: np.ndarray | Iterable[np.ndarray]) -> None:
        """Append frames: an `(F, H, W, 3)` / `(H, W, 3)` array or an iterable of `(H, W, 3)` frames."""
        if self._closed:
            raise RuntimeError("VideoWriter is closed")
        batches = [frames] if isinstance(frames, np.ndarray) else frames
        for batch in batches:
            arr = _as_frames(batch)
            if self._encoder is None:
                try:
                    self._open(arr.shape[1], arr.shape[2])
                except BaseException:
                    self._discard()
                    raise
            if arr.shape[1:3] != self.size:
                raise ValueError(
                    f"frames: size {arr.shape[1]}x{arr.shape[2]} differs from the video's "
                    f"{self.size[0]}x{self.size[1]} (height x width)"
                )
            for frame in arr:
                self._encoder.write(frame)
                self.frames_written += 1

    def close(self) -> None:
        """Finish the stream and move the file into place."""
        if self._closed:
            return
        if self._encoder is None:
            self._closed = True
            raise ValueError("frames: no frames were written")
        try:
            self._encoder.close(ok=True)
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop the partial file; the target path is left untouched."""
        if self._encoder is not None and not self._closed:
            try:
                self._encoder.close(ok=False)
            except Exception:
                pass
        self._discard()

    def _discard(self) -> None:
        self._closed = True
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(
    frames: np.ndarray, path: str | os.PathLike, fps: float = 16, crf: int = 18, keyframes: Iterable[int] | None = None
) -> Path:
    """Write `(F, H, W, 3)` uint8 RGB frames as an H.264 (yuv420p) MP4, atomically; `keyframes`
    are frame indices encoded as IDR frames."""
    arr = _as_frames(frames)
    if len(arr) == 0:
        raise ValueError("frames: no frames to write")
    _check_even(arr.shape[2], arr.shape[1])
    with VideoWriter(path, fps=fps, crf=crf, keyframes=keyframes) as writer:
        writer.write(arr)
    return Path(path)


def encode_video(frames: np.ndarray, fps: float = 16, crf: int = 18, keyframes: Iterable[int] | None = None) -> bytes:
    """The MP4 bytes `write_video` would write (via a temporary file: faststart needs a seekable file)."""
    with tempfile.TemporaryDirectory(prefix="storymem-enc-") as tmp:
        path = Path(tmp) / "video.mp4"
        write_video(frames, path, fps=fps, crf=crf, keyframes=keyframes)
        return path.read_bytes()


def _open_input(source: VideoSource):
    import av

    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(source)), "r")
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"video: {os.fspath(source)!r} does not exist")
        return av.open(os.fspath(source), "r")
    raise ValueError(f"video: expected a path or bytes, got {type(source).__name__}")


def iter_video(source: VideoSource) -> Iterator[np.ndarray]:
    """Decode frames one by one as `(H, W, 3)` uint8 RGB."""
    with _open_input(source) as container:
        if not container.streams.video:
            raise ValueError("video: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def read_video(source: VideoSource) -> np.ndarray:
    """Decode all frames of an MP4 (path or bytes) into `(F, H, W, 3)` uint8 RGB."""
    frames = list(iter_video(source))
    if not frames:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.stack(frames)


def probe_video(source: VideoSource) -> dict:
    """`{frames, fps, width, height, codec}` of the first video stream."""
    with _open_input(source) as container:
        if not container.streams.video:
            raise ValueError("video: the file has no video stream")
        stream = container.streams.video[0]
        frames = stream.frames
        if not frames:  # containers without a frame count: count packets instead of decoding
            frames = sum(1 for p in container.demux(stream) if p.size)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        return {
            "frames": int(frames),
            "fps": float(rate) if rate else 0.0,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "codec": stream.codec_context.name,
        }


def overlap_frames(cut: bool, transition: Any) -> int:
    """Leading frames of a shot that repeat the previous shot: 0 on a cut, else 0/1/5 for none/mi2v/mm2v."""
    if not isinstance(cut, (bool, np.bool_)):
        raise ValueError(f"cut: expected a bool, got {type(cut).__name__}")
    value = getattr(transition, "value", transition)
    if not isinstance(value, str) or value.lower() not in _OVERLAP:
        raise ValueError(f"transition: {transition!r} is not one of {sorted(_OVERLAP)}")
    return 0 if cut else _OVERLAP[value.lower()]


def _check_drops(num_shots: int, drops: Sequence[int]) -> list[int]:
    drops = list(drops)
    if len(drops) != num_shots:
        raise ValueError(f"drops: {len(drops)} values for {num_shots} shots")
    for k, d in enumerate(drops):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"drops[{k}]: {d!r} is not a non-negative integer")
    if drops and drops[0] != 0:
        raise ValueError(f"drops[0]: the first shot has no predecessor to overlap, got {drops[0]}")
    return [int(d) for d in drops]


def _checked_shots(shots: Sequence[np.ndarray], drops: Sequence[int]) -> tuple[list[np.ndarray], list[int]]:
    if len(shots) == 0:
        raise ValueError("shots: no shots to stitch")
    drops = _check_drops(len(shots), drops)
    arrays = [_as_frames(s, f"shots[{k}]") for k, s in enumerate(shots)]
    size = arrays[0].shape[1:3]
    for k, (arr, d) in enumerate(zip(arrays, drops)):
        if arr.shape[1:3] != size:
            raise ValueError(f"shots[{k}]: size {arr.shape[1:3]} differs from shots[0] {size}")
        if d >= len(arr):
            raise ValueError(f"drops[{k}]: dropping {d} of the shot's {len(arr)} frames leaves none")
    return arrays, drops


def stitch(shots: Sequence[np.ndarray], drops: Sequence[int]) -> np.ndarray:
    """Concatenate shots, dropping `drops[k]` leading frames of shot k (`drops[0]` must be 0)."""
    arrays, drops = _checked_shots(shots, drops)
    return np.concatenate([arr[d:] for arr, d in zip(arrays, drops)], axis=0)


def stitch_to_file(
    shots: Sequence[np.ndarray], drops: Sequence[int], path: str | os.PathLike, fps: float = 16, crf: int = 18
) -> int:
    """Stitch into an MP4, feeding the encoder shot by shot. Returns the number of frames written."""
    arrays, drops = _checked_shots(shots, drops)
    _check_even(arrays[0].shape[2], arrays[0].shape[1])
    with VideoWriter(path, fps=fps, crf=crf) as writer:
        for arr, d in zip(arrays, drops):
            writer.write(arr[d:])
    return writer.frames_written


def stitch_files(
    sources: Sequence[VideoSource], drops: Sequence[int], out_path: str | os.PathLike, fps: float = 16, crf: int = 18
) -> int:
    """Stitch stored shot MP4s (paths or bytes), decoding one frame at a time into a single encode.

    Returns the number of frames written.
    """
    if len(sources) == 0:
        raise ValueError("sources: no shots to stitch")
    drops = _check_drops(len(sources), drops)
    with VideoWriter(out_path, fps=fps, crf=crf) as writer:
        for k, (source, d) in enumerate(zip(sources, drops)):
            kept = 0
            for i, frame in enumerate(iter_video(source)):
                if i >= d:
                    if writer.size is not None and frame.shape[:2] != writer.size:
                        h, w = frame.shape[:2]
                        raise ValueError(f"sources[{k}]: size {h}x{w} differs from the first shot's {writer.size}")
                    writer.write(frame)
                    kept += 1
            if kept == 0:
                raise ValueError(f"drops[{k}]: dropping {d} frames leaves none of the shot")
    return writer.frames_written


# ------------------------------------------------------------------------------------ remux


class RemuxUnsupported(Exception):
    """The shots cannot be joined by copying packets; the message says why (kept in the manifest)."""


@dataclass(frozen=True)
class StitchReport:
    """How a final video was made: `method` "remux" (packets copied) or "reencode" (decoded and
    encoded again), `reason` why remuxing was not possible (None after a remux), `seconds` taken."""

    frames: int
    method: Literal["remux", "reencode"]
    reason: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"method": self.method, "reason": self.reason, "seconds": round(self.seconds, 4)}


_H264_IDR = 5


def _stream_params(stream) -> dict:
    cc = stream.codec_context
    return {
        "codec": cc.name,
        "size": (cc.width, cc.height),
        "pix_fmt": getattr(cc.format, "name", None) if cc.format is not None else None,
        "time base": stream.time_base,
        "frame rate": stream.average_rate,
        "extradata (SPS/PPS)": bytes(cc.extradata or b""),
    }


def _nal_types(data: bytes, length_size: int) -> set[int]:
    """NAL unit types of one length-prefixed (avcC) H.264 access unit."""
    types, i = set(), 0
    while i + length_size <= len(data):
        n = int.from_bytes(data[i : i + length_size], "big")
        i += length_size
        if n <= 0 or i + n > len(data):
            break
        types.add(data[i] & 0x1F)
        i += n
    return types


def _frame_duration(stream) -> int:
    rate, tb = stream.average_rate, stream.time_base
    if not rate or not tb:
        raise RemuxUnsupported("the stream has no constant frame rate")
    dur = 1 / (Fraction(rate) * Fraction(tb))
    if dur.denominator != 1:
        raise RemuxUnsupported(f"a frame lasts {dur} time-base units, not a whole number")
    return int(dur)


def _cut_index(packets: list, drop: int, length_size: int, k: int) -> int:
    """Index (decode order) of the packet where shot k's kept part starts, checked to be a clean cut:
    an IDR access unit, every packet before it shows an earlier frame, every one after a later."""
    order = sorted(p.pts for p in packets)
    if drop >= len(order):
        raise ValueError(f"drops[{k}]: dropping {drop} frames leaves none of the shot")
    cut_pts = order[drop]
    j = next(i for i, p in enumerate(packets) if p.pts == cut_pts)
    p = packets[j]
    if not p.is_keyframe or _H264_IDR not in _nal_types(bytes(p), length_size):
        raise RemuxUnsupported(f"shot {k}: frame {drop}, where the stitched part begins, is not an IDR keyframe")
    if any(q.pts >= cut_pts for q in packets[:j]) or any(q.pts < cut_pts for q in packets[j:]):
        raise RemuxUnsupported(f"shot {k}: frames on both sides of frame {drop} are coded across it")
    return j


def remux_videos(
    sources: Sequence[VideoSource], drops: Sequence[int], out_path: str | os.PathLike, fps: float = 16
) -> int:
    """Join stored H.264 shots into one MP4 by copying packets (no decode, no encode), dropping
    `drops[k]` leading frames of shot k. Raises RemuxUnsupported (nothing written) when the shots
    differ in codec parameters or a cut does not start on an IDR frame. Returns the frame count."""
    import av

    if len(sources) == 0:
        raise ValueError("sources: no shots to stitch")
    drops = _check_drops(len(sources), drops)
    want_fps = _check_fps(fps)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp.mp4", dir=out_path.parent)
    os.close(fd)
    ok = False
    try:
        with av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as out:
            first = ostream = None
            frames, last_dts, dur, length_size = 0, None, 0, 4
            for k, (source, d) in enumerate(zip(sources, drops)):
                with _open_input(source) as container:
                    if not container.streams.video:
                        raise ValueError(f"sources[{k}]: the file has no video stream")
                    stream = container.streams.video[0]
                    params = _stream_params(stream)
                    if first is None:
                        first = params
                        if params["codec"] != "h264":
                            raise RemuxUnsupported(f"shot 0: codec {params['codec']}, only H.264 is remuxed")
                        if params["frame rate"] != want_fps:
                            raise RemuxUnsupported(f"shot 0: {params['frame rate']} fps, the story asks {want_fps}")
                        extradata = params["extradata (SPS/PPS)"]
                        if len(extradata) < 7 or extradata[0] != 1:
                            raise RemuxUnsupported("shot 0: no avcC extradata (SPS/PPS out of band)")
                        length_size = (extradata[4] & 3) + 1
                        dur = _frame_duration(stream)
                        ostream = out.add_stream_from_template(stream)
                    else:
                        differ = [name for name in first if params[name] != first[name]]
                        if differ:
                            raise RemuxUnsupported(f"shot {k}: {', '.join(differ)} differ from shot 0")
                    packets = [p for p in container.demux(stream) if p.size and p.pts is not None and p.dts is not None]
                    if not packets:
                        raise ValueError(f"sources[{k}]: the shot has no frames")
                    pts = sorted(p.pts for p in packets)
                    if any(b - a != dur for a, b in zip(pts, pts[1:])):
                        raise RemuxUnsupported(f"shot {k}: frames are not evenly spaced")
                    j = _cut_index(packets, d, length_size, k)
                    shift = frames * dur - pts[d]  # shot k's kept part starts right after the frames so far
                    for p in packets[j:]:
                        p.pts += shift
                        p.dts += shift
                        if last_dts is not None and p.dts <= last_dts:
                            raise RemuxUnsupported(f"shot {k}: decode timestamps would not increase at the cut")
                        last_dts = p.dts
                        p.stream = ostream
                        out.mux(p)
                    frames += len(packets) - j
        os.replace(tmp, out_path)
        ok = True
        return frames
    finally:
        if not ok:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def stitch_videos(
    sources: Sequence[VideoSource],
    drops: Sequence[int],
    out_path: str | os.PathLike,
    fps: float = 16,
    crf: int = 18,
    method: Literal["auto", "remux", "reencode"] = "auto",
) -> StitchReport:
    """Stitch stored shots: remux when the shots allow it, else re-encode (`stitch_files`).
    method "remux" raises RemuxUnsupported instead of falling back; "reencode" never remuxes."""
    if method not in ("auto", "remux", "reencode"):
        raise ValueError(f"method: {method!r} is not 'auto', 'remux' or 'reencode'")
    t0 = time.perf_counter()
    reason = "re-encoding was asked for"
    if method != "reencode":
        try:
            n = remux_videos(sources, drops, out_path, fps=fps)
            return StitchReport(n, "remux", None, time.perf_counter() - t0)
        except RemuxUnsupported as exc:
            if method == "remux":
                raise
            reason = str(exc)
    n = stitch_files(sources, drops, out_path, fps=fps, crf=crf)
    return StitchReport(n, "reencode", reason, time.perf_counter() - t0)
