"""`make demo`: one story through the whole distributed engine on this machine.

Starts a local S3 server (SeaweedFS; data under ./.storymem/s3, a free port, random credentials) and
a private local Ray, starts the story engine on the embedded models, submits the story, shows its
progress, downloads the final video from the bucket and prints where it is; then stops both.

    python -m storymem.demo --story ../shared/st-bench/cat.json [--out out]
"""

from __future__ import annotations

import argparse
import base64
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def _inline_references(request):
    """Reference images given as files become base64 data: the engine, like the service, reads no paths."""
    from storymem.script import ImageRef

    refs = [
        ImageRef(data=base64.b64encode(Path(r.path).read_bytes()).decode()) if r.path is not None else r
        for r in request.script.reference_images
    ]
    return request.model_copy(update={"script": request.script.model_copy(update={"reference_images": refs})})


def _follow(engine, status: dict, quiet: bool) -> dict:
    """Feed the story's events to progress bars until it ends; returns the final status."""
    import ray

    from storymem.local import ProgressBars
    from storymem.progress import Phase, ProgressEvent

    bars = None if quiet else ProgressBars(status["shots_total"], status["steps_total"] or 1)
    after = 0
    try:
        while True:
            events = ray.get(engine.events.remote(status["id"], after, 10.0))
            for raw in events:
                event = ProgressEvent.model_validate(raw)
                after = event.seq
                if bars is not None:
                    bars(event)
                if event.phase.terminal:
                    return ray.get(engine.status.remote(status["id"]))
                if quiet and event.phase == Phase.COMMIT:
                    print(f"shot {event.shot + 1}/{event.shots_total} made", flush=True)
                elif quiet and event.phase == Phase.STITCH:
                    print("stitching the final video", flush=True)
    finally:
        if bars is not None:
            bars.close()


def run_demo(story: Path, out: Path, data: Path, quiet: bool = False) -> int:
    from storymem.script import ScriptError, load_request

    try:
        request = _inline_references(load_request(story))
    except ScriptError as exc:
        for field, problem in exc.errors:
            print(f"{field}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import ray

    from actors import init_local_ray, start_engine
    from storymem.config import EngineConfig, StoryMemConfig
    from storymem.s3server import LocalS3Server
    from storymem.storage import S3Store

    t0 = time.perf_counter()
    server = LocalS3Server(data / "s3", access_key=f"demo-{secrets.token_hex(4)}")
    ray_dir = tempfile.mkdtemp(prefix="storymem-ray-")  # short: Ray's socket paths are length-limited
    with server:
        print(f"S3 (SeaweedFS) at http://{server.endpoint}, data in {server.data_dir}", flush=True)
        init_local_ray(ray_dir)
        try:
            cfg = StoryMemConfig(
                storage=server.storage_config("storymem"), engine=EngineConfig(namespace="storymem-demo")
            )
            print("starting the story engine (loading the embedded models)...", flush=True)
            engine = start_engine(cfg)
            status = ray.get(engine.submit.remote(request.model_dump(mode="json", exclude_unset=True)))
            name = request.script.story_name or "story"
            print(f"story {status['id']} ({name}): {status['shots_total']} shots", flush=True)
            status = _follow(engine, status, quiet)
            if status["state"] != "done":
                print(f"story {status['state']}: {status['error']}", file=sys.stderr)
                return 1
            store = S3Store(cfg.storage)
            key = status["video_key"]
            local = out / status["id"] / "final.mp4"
            local.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(key, local)
            per_shot = status["seconds_per_shot"]
            print(f"done in {time.perf_counter() - t0:.0f} s ({sum(per_shot) / len(per_shot):.1f} s a shot)")
            print(f"bucket key:    s3://{cfg.storage.bucket}/{key}")
            print(f"presigned URL: {store.url(key)}  (valid while this demo's S3 server runs)")
            print(f"local file:    {local.resolve()}")
            return 0
        finally:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storymem.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--story", type=Path, required=True, help="story script (ST-Bench or flat form)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where final videos are saved (out/<id>/)")
    parser.add_argument("--data", type=Path, default=Path(".storymem"), help="the local S3 server's data lives here")
    parser.add_argument("--quiet", action="store_true", help="one line per shot instead of progress bars")
    args = parser.parse_args(argv)
    return run_demo(args.story, args.out, args.data, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
