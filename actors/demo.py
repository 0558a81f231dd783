"""`make demo`: a story through the whole distributed engine on this machine, beside the same story
with memory removed.

Starts a local S3 server (SeaweedFS; data under ./.storymem/s3, a free port, random credentials) and
a private local Ray, starts the story engine on the embedded models, submits the story twice (as
written, and with `settings.use_memory = false`: shots 2..N without memory, the ablation
bench/proof.py measures), shows their progress, mirrors each story's objects from the bucket into
out/<id>/ (the layout of a `storymem run` folder), writes a side-by-side video (with memory | memory
removed, shot by shot), a contact sheet PNG (one row per condition, one column per shot) and the
storyboard page, prints where they are, then stops both.

    python -m actors.demo --story examples/toy_story_reference.json [--out out] [--no-compare]

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


def run_stories(client, store, bodies: dict, out: Path, quiet: bool = False) -> tuple[dict, dict]:
    """Submit every request body (label -> dict) through the engine facade, follow each to the end
    and mirror it from `store` into out/<id>/ (a `storymem run` folder). Returns label -> final
    StoryStatus and label -> run folder; raises RuntimeError naming the story that did not finish."""
    from storymem.compare import mirror_story
    from storymem.storage import StoryLayout

    ids = {label: client.submit(body) for label, body in bodies.items()}  # the engine runs them together
    statuses, dirs = {}, {}
    for label, story_id in ids.items():
        first = client.status(story_id)
        print(f"story {story_id} ({first.story_name or 'story'}, {label}): {first.shots_total} shots", flush=True)
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
            raise RuntimeError(f"story {story_id} ({label}) {status.state.value}: {status.error}")
        statuses[label] = status
        dirs[label] = mirror_story(store, StoryLayout(story_id), out / story_id)
    return statuses, dirs


def run_demo(story: Path, out: Path, data: Path, quiet: bool = False, compare: bool = True) -> int:
    from storymem.board import write_board
    from storymem.client import build_request
    from storymem.compare import MEMORY_REMOVED, WITH_MEMORY, memory_removed, write_comparison
    from storymem.script import ScriptError, load_request
    from storymem.service.contract import StoryMemError

    try:
        load_request(story)  # reads and checks referenced image files too
        body = build_request(story)  # reference files as base64: the engine reads no paths
    except ScriptError as exc:
        for field, problem in exc.errors:
            print(f"{field}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    bodies = {WITH_MEMORY: body, MEMORY_REMOVED: memory_removed(body)} if compare else {WITH_MEMORY: body}

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
        init_local_ray(ray_dir, storage=server.storage_config())
        try:
            cfg = StoryMemConfig(
                storage=server.storage_config("storymem"), engine=EngineConfig(namespace="storymem-demo")
            )
            print("starting the story engine (loading the embedded models)...", flush=True)
            client = EngineClient(start_engine(cfg), cfg=cfg)
            store = S3Store(cfg.storage)
            t_stories = time.perf_counter()
            try:
                statuses, runs = run_stories(client, store, bodies, out, quiet)
            except StoryMemError as exc:
                for field, problem in exc.errors:
                    print(f"{field}: {problem}", file=sys.stderr)
                return EXIT_BAD_INPUT
            except RuntimeError as exc:
                print(str(exc), file=sys.stderr)
                return 1
            t_made = time.perf_counter()
            main_status, main_dir = statuses[WITH_MEMORY], runs[WITH_MEMORY]
            files = write_comparison(runs, main_dir) if compare else {"storyboard": write_board(main_dir)}
            per_shot = [x for st in statuses.values() for x in st.seconds_per_shot]
            print(
                f"done in {time.perf_counter() - t0:.0f} s: {len(statuses)} stories in {t_made - t_stories:.0f} s "
                f"({sum(per_shot) / len(per_shot):.1f} s a shot), comparison in {time.perf_counter() - t_made:.1f} s"
            )
            for label, st in statuses.items():
                print(f"{label + ':':16s} {Path(runs[label]).resolve()}/  (final.mp4; bucket s3://{cfg.storage.bucket}/{st.video_key})")
            print(f"presigned URL:   {store.url(main_status.video_key)}  (valid while this demo's S3 server runs)")
            for name, path in files.items():
                print(f"{name + ':':16s} {Path(path).resolve()}")
            return 0
        finally:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--story", type=Path, required=True, help="story script (ST-Bench or flat form)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="each story is mirrored to out/<id>/ (a `storymem run` folder)")
    parser.add_argument("--data", type=Path, default=Path(".storymem"), help="the local S3 server's data lives here")
    parser.add_argument("--quiet", action="store_true", help="one line per shot instead of progress bars")
    parser.add_argument(
        "--no-compare", dest="compare", action="store_false", help="only the story as written (no memory-removed run beside it)"
    )
    args = parser.parse_args(argv)
    return run_demo(args.story, args.out, args.data, args.quiet, args.compare)


if __name__ == "__main__":
    sys.exit(main())
