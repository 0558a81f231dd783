"""The whole service on one machine, detached: `make serve` and `make stop`.

    python -m cluster.local start [--dir .storymem] [--port 8000] [--s3-port 9000] [--config FILE]
    python -m cluster.local status
    python -m cluster.local stop

`start` launches, each in its own session so that the command returns:
  1. an S3 server (SeaweedFS through `python -m storymem.s3server`), data in DIR/s3;
  2. a Ray head (`ray start --head --block`), temp dir DIR/ray, token auth (DIR/ray_auth_token);
  3. the story engine (a detached actor) and the Serve app, API on 127.0.0.1:PORT.
Credentials are made once and kept in DIR/credentials.env (mode 0600): the S3 keys and, unless
STORYMEM_API_TOKEN is set, the API token (printed when it is made). DIR/ray.env holds what
`ray job submit` and other drivers need (address, auth mode, token path). `stop` shuts Serve down,
then stops the Ray head and the S3 server by the process ids recorded at start (never a global
`ray stop`, which would end every Ray cluster of this user on the machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from storymem.s3server import port_free

DEFAULT_DIR = ".storymem"
APP_NAME = "storymem"
_SOCKET_ROOM = 75  # Ray's session dir adds up to this much under --temp-dir; unix sockets stop at 107


class Layout:
    """Files of one local stack under `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    credentials = property(lambda self: self.root / "credentials.env")
    ray_env = property(lambda self: self.root / "ray.env")
    ray_token = property(lambda self: self.root / "ray_auth_token")
    state = property(lambda self: self.root / "state.json")
    logs = property(lambda self: self.root / "logs")
    s3 = property(lambda self: self.root / "s3")

    @property
    def ray_tmp(self) -> Path:
        own = self.root / "ray"
        if len(str(own)) + _SOCKET_ROOM <= 107:
            return own
        # A deep working directory would push Ray's socket paths past the unix limit.
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path("/tmp") / f"storymem-ray-{os.getuid()}-{digest}"


# ---------------------------------------------------------------------------------------- helpers


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (credentials)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def read_env(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.removeprefix("export ").strip()] = value.strip()
    return env


def _env_text(env: dict[str, str]) -> str:
    return "".join(f"export {k}={v}\n" for k, v in env.items())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def stop_pid(pid: int | None, name: str, timeout_s: float = 30.0) -> None:
    """SIGTERM the process we started (a session leader), then SIGKILL its process group."""
    if not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        print(f"{name} (pid {pid}) did not stop in {timeout_s:.0f} s; killing its process group", file=sys.stderr)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


def _wait(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}\n{_tail(log) if log else ''}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s\n{_tail(log) if log else ''}")


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _ray_bin() -> str:
    local = Path(sys.executable).parent / "ray"
    found = str(local) if local.is_file() else shutil.which("ray")
    if not found:
        raise FileNotFoundError("the 'ray' command is not installed next to this Python or on PATH")
    return found


# ---------------------------------------------------------------------------------------- config


def credentials(layout: Layout, s3_endpoint: str, bucket: str) -> tuple[dict[str, str], str | None]:
    """The stack's credentials (kept across restarts) and the API token if it was just made."""
    env = read_env(layout.credentials)
    env.setdefault("STORYMEM_S3_ACCESS_KEY", "storymem")
    env.setdefault("STORYMEM_S3_SECRET_KEY", secrets.token_urlsafe(24))
    env["STORYMEM_S3_ENDPOINT"] = s3_endpoint
    env["STORYMEM_S3_BUCKET"] = bucket
    made = None
    if not os.environ.get("STORYMEM_API_TOKEN") and not env.get("STORYMEM_API_TOKEN"):
        made = env["STORYMEM_API_TOKEN"] = secrets.token_urlsafe(32)
    write_private(layout.credentials, _env_text(env))
    if os.environ.get("STORYMEM_API_TOKEN"):
        env["STORYMEM_API_TOKEN"] = os.environ["STORYMEM_API_TOKEN"]
    return env, made


def local_config(path: str | None, creds: dict[str, str], port: int):
    """The config file (or defaults) pointed at this stack's S3 server and API port."""
    from pydantic import SecretStr

    from storymem.config import load_config

    cfg = load_config(path)
    storage = cfg.storage.model_copy(
        update={
            "endpoint": creds["STORYMEM_S3_ENDPOINT"],
            "bucket": creds["STORYMEM_S3_BUCKET"],
            "access_key": SecretStr(creds["STORYMEM_S3_ACCESS_KEY"]),
            "secret_key": SecretStr(creds["STORYMEM_S3_SECRET_KEY"]),
            "secure": False,
        }
    )
    service = cfg.service.model_copy(
        update={"host": "127.0.0.1", "port": port, "api_token": SecretStr(creds["STORYMEM_API_TOKEN"])}
    )
    engine = cfg.engine.model_copy(update={"detached": True})
    return cfg.model_copy(update={"storage": storage, "service": service, "engine": engine})


def _ray_env(layout: Layout, gcs: str, dashboard: str) -> dict[str, str]:
    return {
        "RAY_ADDRESS": gcs,
        "RAY_API_SERVER_ADDRESS": dashboard,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(layout.ray_token),
    }


# ---------------------------------------------------------------------------------------- commands


def read_state(layout: Layout) -> dict | None:
    try:
        return json.loads(layout.state.read_text())
    except (OSError, ValueError):
        return None


def start(args) -> int:
    layout = Layout(args.dir)
    state = read_state(layout)
    if state and (alive(state.get("ray_pid")) or alive(state.get("s3_pid"))):
        print(f"already running (state in {layout.state}); `python -m cluster.local stop --dir {args.dir}` first")
        return status(args)
    layout.root.mkdir(parents=True, exist_ok=True)
    os.chmod(layout.root, 0o700)
    for name, port in (("--port", args.port), ("--s3-port", args.s3_port)):
        if not port_free(args.host, port):
            print(f"{name}: {args.host}:{port} is in use", file=sys.stderr)
            return 2

    s3_endpoint = f"127.0.0.1:{args.s3_port}"
    creds, made_token = credentials(layout, s3_endpoint, args.bucket)
    if not layout.ray_token.is_file():
        write_private(layout.ray_token, secrets.token_hex(32))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("STORYMEM_", "RAY_"))}
    base_env.update(creds)
    # `ray job submit -- python ...` runs `python` from the head's PATH: make it this environment's.
    base_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base_env.get("PATH", "")])
    state = {"dir": str(layout.root), "started": time.time()}
    try:
        # 1. S3
        s3_log = layout.logs / "s3.log"
        s3 = _spawn(
            [sys.executable, "-m", "storymem.s3server", "--dir", str(layout.s3), "--port", str(args.s3_port),
             "--bucket", args.bucket, "--pid-file", str(layout.root / "s3.pid")],
            s3_log, base_env,
        )  # fmt: skip
        state["s3_pid"] = s3.pid
        state["s3_endpoint"] = s3_endpoint
        _write_state(layout, state)
        _wait(lambda: (layout.root / "s3.pid").is_file(), 60, "S3 server", s3, s3_log)

        # 2. Ray head; workers inherit this environment (S3 credentials, the API token).
        gcs_port, dash_port, agent_port, client_port = (free_port() for _ in range(4))
        gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
        ray_env = _ray_env(layout, gcs, dashboard)
        head_env = dict(base_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(layout.ray_token),
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # fmt: skip
        head_cmd = [
            _ray_bin(), "start", "--head", "--block", f"--temp-dir={layout.ray_tmp}", f"--port={gcs_port}",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
            f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
            "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
        ]  # fmt: skip
        if args.num_cpus is not None:
            head_cmd.append(f"--num-cpus={args.num_cpus}")
        ray_log = layout.logs / "ray-head.log"
        mark = ray_log.stat().st_size if ray_log.exists() else 0  # earlier runs append to the same log
        head = _spawn(head_cmd, ray_log, head_env)
        state.update(ray_pid=head.pid, gcs_address=gcs, dashboard=dashboard)
        _write_state(layout, state)
        write_private(layout.ray_env, _env_text(ray_env))
        _wait(lambda: b"will now block forever" in ray_log.read_bytes()[mark:], 120, "Ray head", head, ray_log)

        # 3. engine + Serve app, deployed from this process (both outlive it).
        os.environ.update(creds)
        os.environ.update(ray_env)
        api = f"http://{args.host}:{args.port}"
        deploy(args, creds, gcs)
        state["api"] = api
        _write_state(layout, state)
        _wait(lambda: _healthy(api), 180, "API /healthz", head, layout.logs / "ray-head.log")
    except BaseException as exc:
        print(f"start failed: {exc}", file=sys.stderr)
        _stop_processes(layout, state, quiet=True)
        return 1

    print(f"StoryMem API   {api}  (docs {api}/docs)")
    print(f"Ray dashboard  {dashboard}; for `ray job submit`: source {layout.ray_env}")
    print(f"S3             http://{s3_endpoint} bucket {args.bucket}; credentials in {layout.credentials}")
    if made_token:
        print(f"API token (made now, saved in {layout.credentials}): {made_token}")
    print(f"logs in {layout.logs}; stop with `make stop`")
    return 0


def deploy(args, creds: dict[str, str], gcs: str) -> None:
    import logging

    import ray
    from ray import serve

    import serve_app
    from actors import start_engine

    cfg = local_config(args.config, creds, args.port)
    cfg = cfg.model_copy(update={"service": cfg.service.model_copy(update={"host": args.host})})
    ray.init(address=gcs, namespace=cfg.engine.namespace, logging_level=logging.WARNING, log_to_driver=False)
    try:
        start_engine(cfg)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(serve_app.ingress_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    finally:
        ray.shutdown()


def _healthy(api: str) -> bool:
    import httpx

    return httpx.get(f"{api}/healthz", timeout=5.0).status_code == 200


def _write_state(layout: Layout, state: dict) -> None:
    write_private(layout.state, json.dumps(state, indent=2))


def _stop_processes(layout: Layout, state: dict, quiet: bool = False) -> None:
    if alive(state.get("ray_pid")) and state.get("gcs_address"):
        env = dict(os.environ, **_ray_env(layout, state["gcs_address"], state.get("dashboard", "")))
        code = (
            "import ray, logging; from ray import serve; "
            f"ray.init(address={state['gcs_address']!r}, logging_level=logging.ERROR); serve.shutdown()"
        )
        try:
            subprocess.run([sys.executable, "-c", code], env=env, timeout=60, capture_output=True, check=False)
        except subprocess.TimeoutExpired:
            if not quiet:
                print("Serve did not shut down within 60 s; stopping the Ray head anyway", file=sys.stderr)
    stop_pid(state.get("ray_pid"), "Ray head")
    stop_pid(state.get("s3_pid"), "S3 server", timeout_s=15)


def stop(args) -> int:
    layout = Layout(args.dir)
    state = read_state(layout)
    if not state:
        print(f"nothing to stop: no {layout.state}")
        return 0
    _stop_processes(layout, state)
    layout.state.unlink(missing_ok=True)
    layout.ray_env.unlink(missing_ok=True)
    if not layout.ray_tmp.is_relative_to(layout.root):  # the short /tmp fallback: nothing to keep
        shutil.rmtree(layout.ray_tmp, ignore_errors=True)
    print("stopped")
    return 0


def status(args) -> int:
    layout = Layout(args.dir)
    state = read_state(layout)
    if not state:
        print("not running")
        return 3
    ok = True
    for name, key in (("S3 server", "s3_pid"), ("Ray head", "ray_pid")):
        up = alive(state.get(key))
        ok &= up
        print(f"{name:10} pid {state.get(key)}: {'running' if up else 'not running'}")
    api = state.get("api")
    if api:
        try:
            healthy = _healthy(api)
        except Exception:
            healthy = False
        ok &= healthy
        print(f"{'API':10} {api}: {'healthy' if healthy else 'not answering'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default=DEFAULT_DIR, help="State, data, logs and credentials (default .storymem).")
    p = sub.choices["start"]
    p.add_argument("--host", default="127.0.0.1", help="Bind address of the API.")
    p.add_argument("--port", type=int, default=8000, help="API port.")
    p.add_argument("--s3-port", type=int, default=9000, help="S3 port.")
    p.add_argument("--bucket", default="storymem", help="Bucket of the stories.")
    p.add_argument("--config", default=os.environ.get("STORYMEM_CONFIG"), help="StoryMem config file (YAML/JSON).")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: all).")
    args = parser.parse_args(argv)
    return {"start": start, "stop": stop, "status": status}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
