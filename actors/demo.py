"""`make demo`: one story through the whole distributed engine on this machine.

Starts a local S3 server (SeaweedFS; data under ./.storymem/s3, a free port, random credentials) and
a private local Ray, starts the story engine on the embedded models, submits the story, shows its
progress, downloads the final video from the bucket and prints where it is; then stops both.

    python -m actors.demo --story ../shared/st-bench/cat.json [--out out]

It goes through the same facade as the HTTP API (`actors.client.EngineClient` over the engine
actor), so the demo validates, follows and downloads exactly as a service client does.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def run_demo(story: Path, out: Path, data: Path, quiet: bool = False) -> int:
    from storymem.client import build_request
    from storymem.script import ScriptError, load_request
    from storymem.service.contract import StoryMemError

    try:
        load_request(story)  # reads and checks referenced image files too
        body = build_request(story)  # reference files as base64: the engine reads no paths
    except ScriptError as exc:
        for field, problem in exc.errors:
            print(f"{field}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT

    import ray

    from actors import init_local_ray, start_engine
    from actors.client import EngineClient
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
            client = EngineClient(start_engine(cfg), cfg=cfg)
            try:
                story_id = client.submit(body)
            except StoryMemError as exc:
                for field, problem in exc.errors:
                    print(f"{field}: {problem}", file=sys.stderr)
                return EXIT_BAD_INPUT
            first = client.status(story_id)
            print(f"story {story_id} ({first.story_name or 'story'}): {first.shots_total} shots", flush=True)
            if quiet:
                for event in client.events(story_id):
                    if event.phase.value == "commit":
                        print(f"shot {event.shot + 1}/{event.shots_total} made", flush=True)
                    elif event.phase.value == "stitch":
                        print("stitching the final video", flush=True)
                status = client.status(story_id)
            else:
                status = client.wait(story_id)
            if status.state.value != "done":
                print(f"story {status.state.value}: {status.error}", file=sys.stderr)
                return 1
            local = client.fetch_video(story_id, out / story_id / "final.mp4")
            key = status.video_key
            per_shot = status.seconds_per_shot
            print(f"done in {time.perf_counter() - t0:.0f} s ({sum(per_shot) / len(per_shot):.1f} s a shot)")
            print(f"bucket key:    s3://{cfg.storage.bucket}/{key}")
            print(f"presigned URL: {S3Store(cfg.storage).url(key)}  (valid while this demo's S3 server runs)")
            print(f"local file:    {local.resolve()}")
            return 0
        finally:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--story", type=Path, required=True, help="story script (ST-Bench or flat form)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where final videos are saved (out/<id>/)")
    parser.add_argument("--data", type=Path, default=Path(".storymem"), help="the local S3 server's data lives here")
    parser.add_argument("--quiet", action="store_true", help="one line per shot instead of progress bars")
    args = parser.parse_args(argv)
    return run_demo(args.story, args.out, args.data, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
