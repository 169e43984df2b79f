"""A real uvicorn server over a `Service` in a thread, plain HTTP requests to it, and the query
page as headless Chromium renders it."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from setdiv.distributed import free_port

HOSTS = {"127.0.0.1", "localhost"}


@contextmanager
def running_server(service: Any) -> Iterator[int]:
    """`setdiv serve`'s app, protocol and middleware over `service` on a free loopback port."""
    import uvicorn

    from setdiv.index.guard import Guard, HeadTimeoutH11
    from setdiv.index.serve import create_app

    port = free_port()
    config = uvicorn.Config(
        Guard(create_app(service, HOSTS), HOSTS),
        host="127.0.0.1",
        port=port,
        http=HeadTimeoutH11,
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text or bytes, headers) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    base = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers={**base, **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    if ctype.startswith("application/json") and data:
        parsed: Any = json.loads(data, parse_constant=_refuse)  # NaN / Infinity are not JSON
    elif ctype.startswith("text/"):
        parsed = data.decode()
    else:
        parsed = data
    return resp.status, parsed, dict(resp.getheaders())


def _refuse(name: str) -> None:
    raise ValueError(f"{name} in a JSON response")


def chromium_dom(url: str) -> str:
    """The DOM of `url` after headless Chromium has run its scripts (skips without one)."""
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        pytest.skip("no Chromium here (tools/bootstrap.sh installs it where apt-get can)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    r = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout
