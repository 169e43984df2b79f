"""Real servers for the remote-shard tests, each started by the test that needs it and stopped
(its whole process group) when it ends: nginx from Debian serving a folder over HTTP, moto's
S3-compatible server (a separate HTTP process speaking the S3 REST protocol, which s3fs talks
to over a socket: no client library is patched), and a TCP proxy that drops a connection
mid-transfer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from setdiv.distributed.jobs import free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "setdiv-test",
    "AWS_SECRET_ACCESS_KEY": "setdiv-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Credentials the moto server accepts (any); the endpoint comes with `AWS_ENDPOINT_URL`."""


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def nginx(root: Path, workdir: Path) -> Iterator[tuple[str, Path]]:
    """nginx serving `root` (directory listings on) at the yielded base URL; its access log
    path comes with it."""
    assert NGINX is not None
    workdir.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), workdir / "access.log"
    user = "user root;" if os.geteuid() == 0 else ""  # (workers read the test's private tmp)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {log};
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex on;
    }}
}}
""")
    proc = subprocess.Popen(
        [NGINX, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
        start_new_session=True, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_port(port, proc, "nginx")
        yield f"http://127.0.0.1:{port}", log
    finally:
        _stop(proc)


@contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    """moto's S3 server in its own process; yields its endpoint URL."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    out = open(workdir / "moto.log", "wb")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, **S3_ENV},
    )  # fmt: skip
    try:
        wait_port(port, proc, "moto server", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        out.close()


class DroppingProxy:
    """A TCP proxy to `upstream` that closes the first `drops` connections carrying more than
    `after` bytes back to the client, mid-transfer, as a failing server or network would."""

    def __init__(self, upstream: int, after: int, drops: int = 1) -> None:
        self.upstream, self.after, self.left = upstream, after, drops
        self.dropped, self.port = 0, free_port()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def forward_requests() -> None:
            with suppress(OSError):
                while data := client.recv(65536):
                    up.sendall(data)
            with suppress(OSError):
                up.shutdown(socket.SHUT_WR)

        threading.Thread(target=forward_requests, daemon=True).start()
        sent = 0
        with suppress(OSError), client, up:
            while data := up.recv(65536):
                if sent + len(data) > self.after:
                    with self._lock:
                        drop = self.left > 0
                        self.left -= drop
                    if drop:  # (shutdown also wakes the thread reading requests)
                        client.sendall(data[: self.after - sent])
                        self.dropped += 1
                        client.shutdown(socket.SHUT_RDWR)
                        up.shutdown(socket.SHUT_RDWR)
                        return
                client.sendall(data)
                sent += len(data)

    def close(self) -> None:
        self._stopped = True
        self._server.close()
