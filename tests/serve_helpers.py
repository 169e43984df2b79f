"""A real uvicorn server over a `Service` in a thread, plain HTTP requests to it, small indexes
to serve, and the query page as headless Chromium renders it and uses it."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from setdiv.data.shards import Sample, write_shards
from setdiv.distributed import free_port

ROOT = Path(__file__).parents[1]

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


def post(port: int, obj: object, headers: dict | None = None) -> tuple[int, Any]:
    """(status, parsed answer) of POST /search with `obj` as JSON."""
    status, out, _ = request(port, "POST", "/search", json.dumps(obj).encode(), headers)
    return status, out


def b64(data: bytes) -> str:
    """`data` as the base64 text of an image query."""
    return base64.b64encode(data).decode()


def jpeg(width: int = 96, height: int = 72) -> bytes:
    """A noisy RGB JPEG photo (its scan data is most of the file: a cut one is damaged)."""
    buf = io.BytesIO()
    Image.effect_noise((width, height), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    """A black bilevel PNG: a few hundred bytes per megapixel on the wire."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def build_index(
    root: Path, export: Path, samples: Iterable[Sample], kind: str, modality: str, name: str
) -> Path:
    """`setdiv index build` of `samples` (written as `kind` shards) into `root/name`."""
    from setdiv import cli

    write_shards(samples, root / f"{name}_shards", "test", kind, "synthetic", 100)
    data = f"{root}/{name}_shards/test-*.tar"
    build = ["index", "build", str(export), "--modality", modality, "--data", data]
    assert cli.main([*build, "--out", str(root / name)]) == 0
    return root / name


def pixel_export(root: Path) -> Path:
    """An export whose image tower reads pixels (timm's tiny `test_resnet`, random weights,
    64-pixel inputs), with the text side of configs/demo.yaml (needs root/vocab.json)."""
    import torch

    from setdiv import config as config_lib
    from setdiv.export import export_model
    from setdiv.model import build_model

    overrides = [
        f"model.text.vocab_path={root / 'vocab.json'}", "model.text.vocab_size=null",
        "model.image.name=timm", "model.image.arch=test_resnet", "data.image_size=64",
    ]  # fmt: skip
    cfg = config_lib.load([ROOT / "configs/demo.yaml"], overrides)
    torch.manual_seed(0)
    return export_model(build_model(cfg.model), cfg, root / "pixel_export")


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


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ending in NUL, commands on fd 3, answers and events on fd 4)."""

    def __init__(self) -> None:
        browser = next(
            (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
        )
        if browser is None:
            pytest.skip("no Chromium here (tools/bootstrap.sh installs it where apt-get can)")
        (to_r, self._to), (self._from, from_w) = os.pipe(), os.pipe()
        # A profile of its own: two browsers at once (tests on two xdist workers) would
        # otherwise share the default one, and the second hands its page to the first.
        self._profile = tempfile.mkdtemp(prefix="sdchromium")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                 f"--user-data-dir={self._profile}"]  # fmt: skip
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', browser, *flags],
            pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_r)
        os.close(from_w)
        self._id, self._buf, self.session = 0, b"", None

    def call(self, method: str, **params: Any) -> dict:
        """The result of one command (in the attached page's session once there is one)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from, 1 << 16)
                assert chunk, "Chromium closed its DevTools pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer
                return answer["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def value(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """The first truthy value of a JS expression, polled."""
        deadline = time.monotonic() + timeout
        while not (value := self.value(expression)):
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.1)
        return value

    def upload(self, selector: str, path: str) -> None:
        """Choose `path` in the file input at `selector`, as a user would (fires change)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[path], nodeId=node)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._to)
        os.close(self._from)
        shutil.rmtree(self._profile, ignore_errors=True)
