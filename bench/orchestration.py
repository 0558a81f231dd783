"""Orchestration cost of the Ray engine, measured on a private local Ray and S3 server.

1. One story alone: per shot, wall time (shot start to commit) minus the generator's own time is
   the orchestration overhead (leasing, object transfer, scoring, memory actor calls, encoding and
   writing the shot, the manifest commit), split into its measured parts.
2. N stories submitted at once on G generators: how busy the generators are over the run, both as
   leased (a director holds the generator) and computing (inside the pipeline), and how long shots
   wait for a generator.

    python bench/orchestration.py [--stories 8] [--generators 2] [--shots 5]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ST_BENCH = Path(os.environ.get("STORYMEM_ST_BENCH", Path(__file__).resolve().parents[2] / "shared" / "st-bench"))


def _stories(n: int, shots: int) -> list[dict]:
    files = sorted(p for p in ST_BENCH.glob("*.json"))
    if not files:
        raise SystemExit(f"no ST-Bench stories in {ST_BENCH} (set STORYMEM_ST_BENCH)")
    from storymem.script import load_script

    out = []
    for i in range(n):
        script = load_script(files[i % len(files)]).model_dump(mode="json", exclude_unset=True)
        script["shots"] = script["shots"][:shots]
        out.append({"script": script, "settings": {"seed": i}})
    return out


def _wait(engine, ids: list[str], timeout: float = 1800) -> list[dict]:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        statuses = ray.get([engine.status.remote(i) for i in ids])
        if all(s["state"] in ("done", "failed", "cancelled") for s in statuses):
            bad = [s for s in statuses if s["state"] != "done"]
            if bad:
                raise SystemExit(f"story {bad[0]['id']} {bad[0]['state']}: {bad[0]['error']}")
            return statuses
        time.sleep(0.2)
    raise SystemExit("stories did not finish in time")


def _shot_records(store, ids: list[str]):
    from storymem.storage import StoryLayout
    from storymem.story import read_manifest

    return [r for i in ids for r in read_manifest(store, StoryLayout(i)).shots]


def _busy(engine) -> float:
    import ray

    return sum(g["busy_s"] for g in ray.get(engine.internals.remote())["pool"]["generators"])


def _steady_utilisation(history: list, ids: list[str], statuses: list[dict], generators: int) -> tuple[float, float]:
    """Lease utilisation while every story is in flight: from the last story's first lease to the
    first story's end. Returns (utilisation, window seconds)."""
    mine = [h for h in history if h[1] in set(ids)]
    first_lease = {i: min(h[3] for h in mine if h[1] == i) for i in ids}
    start, end = max(first_lease.values()), min(st["finished"] for st in statuses)
    if end <= start:
        return float("nan"), 0.0
    held = sum(max(0.0, min(h[4], end) - max(h[3], start)) for h in mine)
    return held / (generators * (end - start)), end - start


def _mean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else 0.0


def run(n_stories: int, n_generators: int, n_shots: int) -> dict:
    import ray

    from actors import init_local_ray, start_engine
    from storymem.config import EngineConfig, StoryMemConfig
    from storymem.s3server import LocalS3Server
    from storymem.storage import S3Store

    work = Path(tempfile.mkdtemp(prefix="smbench-"))
    server = LocalS3Server(work / "s3", access_key=f"bench-{secrets.token_hex(4)}")
    results: dict = {}
    with server:
        init_local_ray(work / "ray", num_cpus=n_generators + 2, storage=server.storage_config())  # generators 1 each, one scorer, slack
        try:
            cfg = StoryMemConfig(
                storage=server.storage_config("bench"),
                engine=EngineConfig(
                    num_generators=n_generators,
                    max_running_stories=max(n_stories, 1),
                    max_queued_stories=max(n_stories, 1),
                    namespace="storymem-bench",
                ),
            )
            t0 = time.perf_counter()
            engine = start_engine(cfg)
            while ray.get(engine.health.remote())["generators"] < n_generators:
                time.sleep(0.2)
            results["engine_start_s"] = time.perf_counter() - t0
            store = S3Store(cfg.storage)
            from storymem.service.intake import normalise

            profile = ray.get(engine.profile.remote())  # the engine takes requests validated at the edge
            stories = [normalise(st, profile=profile) for st in _stories(max(n_stories, 1), n_shots)]

            # 1. One story alone (after one warm-up story, so first-call costs are not counted).
            _wait(engine, [ray.get(engine.submit.remote(stories[0]))["id"]])
            t0 = time.perf_counter()
            solo = ray.get(engine.submit.remote(stories[0]))["id"]
            status = _wait(engine, [solo])[0]
            solo_wall = time.perf_counter() - t0
            recs = _shot_records(store, [solo])
            results["solo"] = {
                "shots": len(recs),
                "story_wall_s": solo_wall,
                "wall_per_shot_s": _mean(r.wall_s for r in recs),
                "generator_per_shot_s": _mean(r.generator_s for r in recs),
                "overhead_per_shot_s": _mean(r.wall_s - r.generator_s for r in recs),
                "queue_s": _mean(r.queue_s for r in recs),
                "score_s": _mean(r.timings.get("score", 0.0) for r in recs),
                "write_s": _mean(r.timings.get("write", 0.0) for r in recs),
                "seconds_per_shot_status": status["seconds_per_shot"],
            }
            s = results["solo"]
            s["other_s"] = s["overhead_per_shot_s"] - s["queue_s"] - s["score_s"] - s["write_s"]

            # 2. N stories at once on the pool.
            busy0 = _busy(engine)
            t0, t0_unix = time.perf_counter(), time.time()
            ids = [ray.get(engine.submit.remote(st))["id"] for st in stories[:n_stories]]
            statuses = _wait(engine, ids)
            makespan = time.perf_counter() - t0
            leased = _busy(engine) - busy0
            recs = _shot_records(store, ids)
            computing = sum(r.generator_s for r in recs)
            history = ray.get(engine.internals.remote(history=True))["pool"]["history"]
            steady, window = _steady_utilisation(history, ids, statuses, n_generators)
            leases = [h for h in history if h[1] in set(ids)]
            results["shared"] = {
                "stories": n_stories,
                "generators": n_generators,
                "shots": len(recs),
                "makespan_s": makespan,
                "generator_leased": leased / (n_generators * makespan),
                "generator_computing": computing / (n_generators * makespan),
                "generator_leased_steady": steady,
                "steady_window_s": window,
                # Submission to the first shot on a generator (director start-up), last lease to the end (stitching).
                "first_lease_after_s": min(h[3] for h in leases) - t0_unix,
                "after_last_lease_s": max(st["finished"] for st in statuses) - max(h[4] for h in leases),
                "queue_per_shot_s": _mean(r.queue_s for r in recs),
                "generator_per_shot_s": _mean(r.generator_s for r in recs),
                "overhead_per_shot_s": _mean(r.wall_s - r.generator_s - r.queue_s for r in recs),
                "story_wall_s": _mean(st["finished"] - st["started"] for st in statuses),
            }
        finally:
            ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return results


def _table(r: dict) -> str:
    s, m = r["solo"], r["shared"]
    lines = [
        f"engine start (both generators loaded): {r['engine_start_s']:.1f} s",
        "",
        f"one story alone, {s['shots']} shots (per shot, seconds)",
        f"  {'wall':>7} {'generator':>10} {'overhead':>9} | {'queue':>6} {'score':>6} {'write':>6} {'other':>6}",
        f"  {s['wall_per_shot_s']:7.3f} {s['generator_per_shot_s']:10.3f} {s['overhead_per_shot_s']:9.3f} | "
        f"{s['queue_s']:6.3f} {s['score_s']:6.3f} {s['write_s']:6.3f} {s['other_s']:6.3f}",
        "",
        f"{m['stories']} stories at once on {m['generators']} generators, {m['shots']} shots",
        f"  {'makespan':>9} {'leased':>7} {'computing':>10} {'steady leased':>14} "
        f"{'queue/shot':>11} {'gen/shot':>9} {'overhead/shot':>14}",
        f"  {m['makespan_s']:8.1f}s {m['generator_leased']:7.0%} {m['generator_computing']:10.0%} "
        f"{m['generator_leased_steady']:8.0%} ({m['steady_window_s']:.0f}s) "
        f"{m['queue_per_shot_s']:10.3f}s {m['generator_per_shot_s']:8.3f}s {m['overhead_per_shot_s']:13.3f}s",
        f"  first shot on a generator {m['first_lease_after_s']:.1f} s after submission (directors starting); "
        f"last story done {m['after_last_lease_s']:.1f} s after the last shot left its generator",
        "",
        "overhead = wall time per shot - generator's own time (- queue wait, in the shared run);",
        "leased = generators held by a director; computing = inside the pipeline; both over makespan x generators;",
        "steady = leased while all stories are in flight (last story's first shot to first story's end).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=8)
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--shots", type=int, default=5, help="shots per story (the first N of each ST-Bench story)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    for name in ("stories", "generators", "shots"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be at least 1")
    results = run(args.stories, args.generators, args.shots)
    print(_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
