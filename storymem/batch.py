"""Run a folder or an S3 prefix of story scripts through the engine and tabulate the results.

    python -m storymem.batch ../shared/st-bench --out results.parquet --url http://127.0.0.1:8000
    ray job submit -- python -m actors.batch s3://storymem/st-bench/ --out s3://storymem/results/st-bench.parquet

`--url` runs against the HTTP API (token from STORYMEM_API_TOKEN); `python -m actors.batch` (the
same options) joins the running Ray cluster and its engine instead, or starts a local one. Every
submission carries an Idempotency-Key made from the table and the row, so a job that is run again
after a crash (or retries a lost call) never makes a story twice. The Parquet table has one row
per script: story name, script source, script and settings digests, story id, state, shots, mean
seconds per shot, video key, error. Running again with the same table skips stories already done
(matched by script digest and settings), follows the ones still running, resumes failed or
cancelled ones and submits the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .config import StoryMemConfig, load_config
from .script import ScriptError, load_request
from .story import script_digest

log = logging.getLogger("storymem.batch")

COLUMNS = (
    "story_name", "script", "script_digest", "settings_digest", "story_id", "state", "shots", "shots_done",
    "seconds_per_shot", "video_key", "error", "submitted", "finished",
)  # fmt: skip
_TERMINAL = {"done", "failed", "cancelled", "invalid"}


@dataclass
class Row:
    """One script's line in the results table."""

    story_name: str | None
    script: str
    script_digest: str | None = None
    settings_digest: str | None = None
    story_id: str | None = None
    state: str = "pending"
    shots: int | None = None
    shots_done: int | None = None
    seconds_per_shot: float | None = None
    video_key: str | None = None
    error: str | None = None
    submitted: float | None = None
    finished: float | None = None
    body: dict | None = field(default=None, repr=False)  # the submission; not written

    @property
    def key(self) -> tuple[str | None, str | None]:
        return self.script_digest, self.settings_digest

    def update(self, status) -> None:
        self.state = status.state.value
        self.shots, self.shots_done = status.shots_total, status.shots_done
        spent = status.seconds_per_shot
        self.seconds_per_shot = float(sum(spent) / len(spent)) if spent else None
        self.video_key, self.error = status.video_key, status.error
        if self.state in _TERMINAL and self.finished is None:
            self.finished = status.finished or time.time()


# ---------------------------------------------------------------------------------------- sources


def _split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: expected s3://bucket/prefix")
    return bucket, key


def _s3_store(cfg: StoryMemConfig, bucket: str):
    from .storage import S3Store

    return S3Store(cfg.storage.model_copy(update={"bucket": bucket}))


def _parse(raw: bytes, where: str) -> dict:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScriptError([("<json>", f"{where}: not valid JSON ({exc})")]) from None


def collect(source: str, cfg: StoryMemConfig, pattern: str = "*.json", settings: dict | None = None) -> list[Row]:
    """One row per script under `source` (a folder, a file or s3://bucket/prefix), validated; a
    script that does not validate gets state 'invalid' and the problems as its error."""
    from .client import build_request

    rows: list[Row] = []

    def add(label: str, name: str, load) -> None:
        row = Row(story_name=name, script=label)
        try:
            body = build_request(load(), settings)
            request = load_request(body, allow_paths=False)
        except ScriptError as exc:
            row.state, row.error = "invalid", str(exc).replace("\n", "; ")
            rows.append(row)
            return
        row.body = body
        row.story_name = request.script.story_name or name
        row.shots = request.script.num_shots
        row.script_digest = script_digest(request.script)
        unset = request.settings.model_dump(mode="json", exclude_unset=True)
        row.settings_digest = hashlib.sha256(json.dumps(unset, sort_keys=True).encode()).hexdigest()
        rows.append(row)

    if source.startswith("s3://"):
        bucket, prefix = _split_s3(source)
        store = _s3_store(cfg, bucket)
        for key in store.list(prefix):
            if Path(key).match(pattern):
                add(f"s3://{bucket}/{key}", Path(key).stem, lambda k=key: _parse(store.get_bytes(k), k))
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.glob(pattern) if p.is_file())
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"scripts: {source} is neither a folder, a file nor s3://bucket/prefix")
        for f in files:
            add(str(f), f.stem, lambda f=f: f)
    if not rows:
        raise ValueError(f"scripts: no file matching {pattern!r} in {source}")
    return rows


# ---------------------------------------------------------------------------------------- table


def read_batch_table(out: str, cfg: StoryMemConfig) -> list[Row]:
    import pyarrow.parquet as pq

    if out.startswith("s3://"):
        bucket, key = _split_s3(out)
        try:
            data = _s3_store(cfg, bucket).get_bytes(key)
        except KeyError:
            return []
        table = pq.read_table(io.BytesIO(data))
    else:
        if not Path(out).is_file():
            return []
        table = pq.read_table(out)
    names = {f.name for f in fields(Row)} - {"body"}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in table.to_pylist()]


def write_batch_table(rows: list[Row], out: str, cfg: StoryMemConfig) -> None:
    """Write the table (atomically for a local file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("story_name", pa.string()), ("script", pa.string()), ("script_digest", pa.string()),
         ("settings_digest", pa.string()), ("story_id", pa.string()), ("state", pa.string()),
         ("shots", pa.int32()), ("shots_done", pa.int32()), ("seconds_per_shot", pa.float64()),
         ("video_key", pa.string()), ("error", pa.string()), ("submitted", pa.float64()),
         ("finished", pa.float64())]
    )  # fmt: skip
    records = [{k: v for k, v in asdict(r).items() if k in COLUMNS} for r in rows]
    table = pa.Table.from_pylist(records, schema=schema)
    if out.startswith("s3://"):
        bucket, key = _split_s3(out)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        _s3_store(cfg, bucket).put_bytes(key, buf.getvalue(), "application/vnd.apache.parquet")
        return
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(dest)


# ---------------------------------------------------------------------------------------- engine


class _LazyClient:
    """Makes the client on first use."""

    def __init__(self, factory):
        self._factory = factory
        self._client = None

    def __getattr__(self, name):
        if self._client is None:
            self._client = self._factory()
        return getattr(self._client, name)


def run(
    rows: list[Row],
    previous: list[Row],
    client,
    wait: bool = True,
    poll_s: float = 2.0,
    on_change=None,
    progress: bool = True,
) -> list[Row]:
    """Submit (or skip, follow, resume) each row; with `wait`, follow them all to the end.

    `client`: an EngineClient (or StoryMemClient), or a function making one, called only when a
    row needs the engine (a run where every story is done already touches no cluster)."""
    from .client import Conflict, NotFound, QueueFull, retry_after

    if callable(client) and not hasattr(client, "submit"):
        client = _LazyClient(client)
    done_before = {r.key: r for r in previous if r.state == "done"}
    known = {r.key: r for r in previous if r.story_id}
    tracked: list[Row] = []
    for row in rows:
        if row.state == "invalid":
            continue
        if row.key in done_before:
            old = done_before[row.key]
            row.story_id, row.state, row.submitted, row.finished = old.story_id, "done", old.submitted, old.finished
            row.shots, row.shots_done, row.seconds_per_shot = old.shots, old.shots_done, old.seconds_per_shot
            row.video_key, row.error = old.video_key, None
            log.info("skip %s: done as %s", row.script, row.story_id)
            continue
        old = known.get(row.key)
        if old is not None:
            try:
                status = client.status(old.story_id)
                row.story_id, row.submitted = old.story_id, old.submitted
                if status.state.value in ("failed", "cancelled"):
                    status = client.resume(old.story_id)
                row.update(status)
                tracked.append(row)
                continue
            except (NotFound, Conflict):
                pass  # the engine no longer knows it (or will not resume it): submit again
        key = f"batch-{row.script_digest[:32]}-{row.settings_digest[:16]}"
        while True:
            try:
                row.story_id = client.submit(row.body, idempotency_key=key)
                break
            except QueueFull as exc:
                time.sleep(retry_after(exc))
        row.submitted, row.state, row.error, row.finished = time.time(), "queued", None, None
        tracked.append(row)
        if on_change:
            on_change()
    if on_change:
        on_change()
    if not wait:
        for row in tracked:
            row.update(client.status(row.story_id))
        return rows

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tracked), desc="stories", unit="story")
    pending = [r for r in tracked if r.state not in _TERMINAL]
    if bar is not None:
        bar.update(len(tracked) - len(pending))
    while pending:
        time.sleep(poll_s)
        still = []
        for row in pending:
            row.update(client.status(row.story_id))
            if row.state in _TERMINAL:
                if bar is not None:
                    bar.update(1)
                if on_change:
                    on_change()
            else:
                still.append(row)
        pending = still
    if bar is not None:
        bar.close()
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m storymem.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("scripts", help="Folder of script files, one script file, or s3://bucket/prefix.")
    parser.add_argument("--out", required=True, help="Results table: a .parquet path or s3://bucket/key.")
    parser.add_argument(
        "--config", default=os.environ.get("STORYMEM_CONFIG"), help="StoryMem config file (env STORYMEM_CONFIG)."
    )
    parser.add_argument("--settings", default=None, help="Settings for every story: JSON text or a JSON file.")
    parser.add_argument("--pattern", default="*.json", help="File name pattern of scripts (default *.json).")
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Wait for every story to end (default); --no-wait submits and writes the table.",
    )
    parser.add_argument("--url", default=os.environ.get("STORYMEM_URL"), help="The HTTP API (env STORYMEM_URL).")
    parser.add_argument("--address", default=None, help="Ray address, with `python -m actors.batch` (default: auto).")
    parser.add_argument("--poll-s", type=float, default=2.0, help="Seconds between status polls.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    return parser


def main(argv: list[str] | None = None, connect=None) -> int:
    """The batch job. `connect(cfg, address)` makes the client when no --url is given
    (`actors.batch` passes the in-cluster one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url:
        from .client import StoryMemClient

        def connect(cfg, address, url=args.url):  # noqa: F811
            return StoryMemClient(url)
    elif connect is None:
        parser.error("--url is required (or run `python -m actors.batch` inside a Ray cluster)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = load_config(args.config)
    settings = None
    if args.settings:
        text = Path(args.settings).read_text() if Path(args.settings).is_file() else args.settings
        settings = json.loads(text)
        if not isinstance(settings, dict):
            parser.error("--settings: expected a JSON object")
    rows = collect(args.scripts, cfg, args.pattern, settings)
    previous = read_batch_table(args.out, cfg)

    def save() -> None:
        write_batch_table(rows, args.out, cfg)

    run(
        rows,
        previous,
        lambda: connect(cfg, args.address),
        wait=args.wait,
        poll_s=args.poll_s,
        on_change=save,
        progress=not args.quiet,
    )
    save()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    print(f"{len(rows)} scripts: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; table {args.out}")
    bad = counts.get("failed", 0) + counts.get("invalid", 0) + counts.get("cancelled", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
