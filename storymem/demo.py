"""`make demo`: a story through the whole distributed engine on this machine, beside the same story
with memory removed.

Starts a local S3 server (SeaweedFS; data under ./.storymem/s3, a free port, random credentials) and
a private local Ray, starts the story engine on the embedded models, submits the story twice (as
written, and with `settings.use_memory = false`: shots 2..N without memory, the ablation
bench/proof.py measures), shows their progress, mirrors each story's objects from the bucket into
out/<id>/ (the layout of a `storymem run` folder), writes a side-by-side video (with memory | memory
removed, shot by shot) and a contact sheet PNG (one row per condition, one column per shot), prints
where they are, then stops both.

    python -m storymem.demo --story examples/toy_story_reference.json [--out out] [--no-compare]
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


def run_stories(engine, store, bodies: dict, out: Path, quiet: bool = False) -> dict:
    """Submit every request body (label -> dict) to the engine, follow them to the end and mirror
    each finished story from `store` into out/<id>/. Returns label -> final status, with "dir" (the
    local run folder) added; raises RuntimeError naming the story that did not finish."""
    import ray

    from storymem.compare import mirror_story
    from storymem.storage import StoryLayout

    submitted = {label: ray.get(engine.submit.remote(body)) for label, body in bodies.items()}
    results = {}
    for label, status in submitted.items():  # the engine runs them together; events wait in its log
        name = bodies[label]["script"].get("story_name") or "story"
        print(f"story {status['id']} ({name}, {label}): {status['shots_total']} shots", flush=True)
        status = _follow(engine, status, quiet)
        if status["state"] != "done":
            raise RuntimeError(f"story {status['id']} ({label}) {status['state']}: {status['error']}")
        status["dir"] = mirror_story(store, StoryLayout(status["id"]), out / status["id"])
        results[label] = status
    return results


def run_demo(story: Path, out: Path, data: Path, quiet: bool = False, compare: bool = True) -> int:
    from storymem.compare import MEMORY_REMOVED, WITH_MEMORY, memory_removed, write_comparison
    from storymem.script import ScriptError, load_request

    try:
        request = _inline_references(load_request(story))
    except ScriptError as exc:
        for field, problem in exc.errors:
            print(f"{field}: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    body = request.model_dump(mode="json", exclude_unset=True)
    bodies = {WITH_MEMORY: body, MEMORY_REMOVED: memory_removed(body)} if compare else {WITH_MEMORY: body}

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
            store = S3Store(cfg.storage)
            t_stories = time.perf_counter()
            try:
                results = run_stories(engine, store, bodies, out, quiet)
            except RuntimeError as exc:
                print(str(exc), file=sys.stderr)
                return 1
            t_made = time.perf_counter()
            main = results[WITH_MEMORY]
            runs = {label: r["dir"] for label, r in results.items()}
            files = write_comparison(runs, main["dir"]) if compare else {}
            per_shot = [x for r in results.values() for x in r["seconds_per_shot"]]
            print(
                f"done in {time.perf_counter() - t0:.0f} s: {len(results)} stories in {t_made - t_stories:.0f} s "
                f"({sum(per_shot) / len(per_shot):.1f} s a shot), comparison in {time.perf_counter() - t_made:.1f} s"
            )
            for label, r in results.items():
                print(f"{label + ':':16s} {Path(r['dir']).resolve()}/  (final.mp4; bucket s3://{cfg.storage.bucket}/{r['video_key']})")
            print(f"presigned URL:   {store.url(main['video_key'])}  (valid while this demo's S3 server runs)")
            for name, path in files.items():
                print(f"{name + ':':16s} {Path(path).resolve()}")
            return 0
        finally:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storymem.demo", description=__doc__.splitlines()[0])
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
