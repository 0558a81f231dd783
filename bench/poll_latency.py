"""Status-poll latency of the HTTP API while stories run: N concurrent pollers (httpx, asyncio).

    python bench/poll_latency.py                               # starts its own local stack, then stops it
    python bench/poll_latency.py --url http://127.0.0.1:8000   # an existing service (token: STORYMEM_API_TOKEN)

First the same load on an idle engine (one finished story; skip with --no-baseline), then with
stories running: each of `--pollers` tasks GETs /v1/stories/{id} in a loop (sleeping `--interval`
between its requests) for `--duration` seconds. Reports p50/p90/p99/max latency (the running phase
over polls answered while the story was queued or running), throughput, errors and, for a stack it
started, the CPU milliseconds per poll spent by the Serve proxy, the API replica, the engine and
this client. The stories are cancelled at the end. The pollers are closed-loop: once the offered
load (pollers / interval) exceeds what the machine serves, latency is queueing (pollers / rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
STORY_SETTINGS = {"width": 48, "height": 32, "num_frames": 9, "num_inference_steps": 20}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _poller(http: httpx.AsyncClient, ids: list[str], offset: int, until: float, interval: float, out: list):
    i = offset
    while time.monotonic() < until:
        story = ids[i % len(ids)]
        i += 1
        t0 = time.perf_counter()
        try:
            r = await http.get(f"/v1/stories/{story}")
            ms = (time.perf_counter() - t0) * 1000
            out.append((ms, r.status_code, r.json().get("state") if r.status_code == 200 else None))
        except httpx.HTTPError as exc:
            out.append(((time.perf_counter() - t0) * 1000, 0, type(exc).__name__))
        if interval:
            await asyncio.sleep(interval)


def _stack_pids(stack_dir: Path | None) -> dict[str, int]:
    """Pids of the local stack's Serve proxy, API replica and engine (found by the Ray token path
    their environment carries), for CPU-time accounting; empty for a remote service."""
    if stack_dir is None:
        return {}
    marker = str(stack_dir).encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            if marker not in (proc / "environ").read_bytes():
                continue
        except OSError:
            continue
        for name in ("ProxyActor", "ServeReplica", "StoryEngine"):
            if cmd.startswith(f"ray::{name}".encode()):
                found[name] = int(proc.name)
    return found


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(a: np.ndarray) -> dict:
    if not len(a):
        return {"n": 0}
    out = {k: round(float(np.percentile(a, q)), 2) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
    return out | {"max": round(float(a.max()), 2), "n": int(len(a))}


async def measure(
    url: str,
    token: str,
    pollers: int,
    duration: float,
    interval: float,
    stories: int,
    shots: int,
    baseline: bool,
    pids: dict[str, int],
):
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=pollers + 10, max_keepalive_connections=pollers + 10)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as http:
        idle = None
        if baseline:  # the same load on an idle engine: what the API path costs by itself
            body = {"shots": [{"prompt": "baseline"}], "settings": {**STORY_SETTINGS, "num_inference_steps": 2}}
            story = (await http.post("/v1/stories", json=body)).json()["id"]
            while (await http.get(f"/v1/stories/{story}")).json()["state"] not in ("done", "failed"):
                await asyncio.sleep(0.2)
            samples: list = []
            cpu0, me0 = {k: _cpu_s(p) for k, p in pids.items()}, time.process_time()
            t0 = time.monotonic()
            until = t0 + duration
            await asyncio.gather(*(_poller(http, [story], p, until, interval, samples) for p in range(pollers)))
            ok = np.array([ms for ms, code, _ in samples if code == 200])
            idle = _pct(ok) | {"requests_per_s": round(len(samples) / (time.monotonic() - t0), 1)}
            # CPU milliseconds each process spent per answered poll: what the API path costs.
            per = {k: round((_cpu_s(p) - cpu0[k]) * 1000 / max(1, len(samples)), 2) for k, p in pids.items()}
            per["bench_client"] = round((time.process_time() - me0) * 1000 / max(1, len(samples)), 2)
            idle["cpu_ms_per_request"] = per
        ids = []
        for s in range(stories):
            script = {"story_name": f"bench {s}", "shots": [{"prompt": f"bench {s} shot {k}"} for k in range(shots)]}
            body = {"script": script, "settings": STORY_SETTINGS}
            r = await http.post("/v1/stories", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])
        # Wait until one is running, so that the measurement sees the engine busy.
        for _ in range(600):
            states = [(await http.get(f"/v1/stories/{i}")).json()["state"] for i in ids]
            if "running" in states:
                break
            await asyncio.sleep(0.1)
        samples: list = []
        until = time.monotonic() + duration
        t0 = time.monotonic()
        await asyncio.gather(*(_poller(http, ids, p, until, interval, samples) for p in range(pollers)))
        wall = time.monotonic() - t0
        finals = [(await http.get(f"/v1/stories/{i}")).json() for i in ids]
        for i in ids:
            await http.delete(f"/v1/stories/{i}")
    busy = np.array([ms for ms, code, state in samples if code == 200 and state in ("queued", "running")])
    every = np.array([ms for ms, code, _ in samples if code == 200])
    errors = sum(1 for _, code, _ in samples if code != 200)

    return {
        "pollers": pollers,
        "interval_s": interval,
        "duration_s": round(wall, 1),
        "requests": len(samples),
        "requests_per_s": round(len(samples) / wall, 1),
        "errors": errors,
        "while_running_ms": _pct(busy),
        "all_ms": _pct(every),
        "idle_engine_ms": idle,
        "shots_done_during_run": sum(f["shots_done"] for f in finals),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="A running API; default: start a local stack for the run.")
    p.add_argument("--token", default=os.environ.get("STORYMEM_API_TOKEN"))
    p.add_argument("--pollers", type=int, default=50)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument(
        "--interval", type=float, default=1.0, help="Pause between one poller's requests (s); 0: back to back."
    )
    p.add_argument("--stories", type=int, default=3)
    p.add_argument("--shots", type=int, default=12)
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="Skip measuring the same load on an idle engine first.")  # fmt: skip
    p.add_argument("--out", default=None, help="Also write the result as JSON here.")
    args = p.parse_args(argv)

    stack_dir = None
    url, token = args.url, args.token
    if url is not None and not token:
        p.error("--token (or STORYMEM_API_TOKEN) is needed with --url")
    if url is None:
        stack_dir = Path(tempfile.mkdtemp(prefix="smbench-"))
        token = secrets.token_urlsafe(24)
        port = _free_port()
        env = {**os.environ, "STORYMEM_API_TOKEN": token}
        start = subprocess.run(
            [sys.executable, "-m", "cluster.local", "start", "--dir", str(stack_dir / "s"), "--port", str(port),
             "--s3-port", str(_free_port())],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if start.returncode != 0:
            print(start.stdout, start.stderr, file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{port}"
    try:
        result = asyncio.run(
            measure(
                url,
                token,
                args.pollers,
                args.duration,
                args.interval,
                args.stories,
                args.shots,
                args.baseline,
                _stack_pids(stack_dir),
            )
        )
    finally:
        if stack_dir is not None:
            subprocess.run([sys.executable, "-m", "cluster.local", "stop", "--dir", str(stack_dir / "s")], cwd=REPO,
                           capture_output=True, timeout=120)  # fmt: skip
            shutil.rmtree(stack_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
