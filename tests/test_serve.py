"""`setdiv serve` (FastAPI + uvicorn) against real clients: answers equal to the library's, the
OpenAPI document's limits are the enforced ones, hostile and broken clients get 4xx (never a
500 or a wrong answer), pictures in the query page, micro-batching, workers and SIGTERM."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_helpers import (
    post,
    request,
    running_server,
)

from setdiv import cli
from setdiv.distributed import free_port
from setdiv.index import guard, serve
from setdiv.index.search import SetSearcher
from setdiv.index.service import (
    Service,
)


def test_server_answers_queries_like_the_library(gallery: Path, server: int) -> None:
    status, health, _ = request(server, "GET", "/health")
    assert status == 200 and health["items"] == 40 and health["modality"] == "image"
    assert health["pictures"] is True
    status, spec, _ = request(server, "GET", "/openapi.json")
    assert status == 200 and "/search" in spec["paths"]
    status, page, _ = request(server, "GET", "/")
    assert status == 200 and "<form" in page
    status, out = post(server, {"texts": ["a red circle", "a blue square"], "k": 4})
    assert status == 200 and len(out["results"]) == 2
    s = SetSearcher(gallery / "img")
    hits = s.search(s.encode_texts(["a blue square"]), 4)
    assert [h["index"] for h in out["results"][1]["hits"]] == hits.items[0].tolist()
    assert out["results"][1]["scored"] == hits.candidates[0]
    first = out["results"][1]["hits"][0]
    assert first["picture"] == f"/image/at/{first['index']}"
    status, fixed = post(server, {"text": "a blue square", "k": 4, "candidates": 1000})
    exact = s.exact(s.encode_texts(["a blue square"]), 4)
    assert [h["index"] for h in fixed["results"][0]["hits"]] == exact.items[0].tolist()


BAD = [
    (b"{not json", None, 400, "JSON decode error"),
    (b"[1, 2]", None, 400, "valid dictionary"),
    (b'{"text": "a"', None, 400, "JSON decode error"),
    (json.dumps({"text": "a", "k": 0}).encode(), None, 400, "k: Input should be greater"),
    (json.dumps({"text": "a", "k": 10**9}).encode(), None, 400, "k: Input should be less"),
    (json.dumps({"text": "a", "k": True}).encode(), None, 400, "k: Input should be a valid int"),
    (json.dumps({"text": "a", "candidates": "9"}).encode(), None, 400, "candidates"),
    (json.dumps({"text": ""}).encode(), None, 400, "text: String should have at least 1"),
    (json.dumps({"text": 5}).encode(), None, 400, "text: Input should be a valid string"),
    (json.dumps({"text": "a" * 5000}).encode(), None, 400, "at most 1000 characters"),
    (json.dumps({"texts": ["a"] * 65}).encode(), None, 400, "at most 64 items"),
    (json.dumps({"text": "a", "texts": ["b"]}).encode(), None, 400, "exactly one"),
    (json.dumps({"query": "a"}).encode(), None, 400, "Extra inputs are not permitted"),
    (json.dumps({"image": "aGVsbG8="}).encode(), None, 400, "send text queries"),
    (json.dumps({"text": "   "}).encode(), None, 400, "empty text query"),
    (b"{}", {"Content-Type": "text/plain"}, 415, "application/json"),
    (b"{}", {"Content-Length": str(10**9)}, 413, "limited to"),
]


@pytest.mark.parametrize(("body", "headers", "status", "message"), BAD)
def test_bad_requests_get_4xx_never_500(
    server: int, body: bytes, headers: dict | None, status: int, message: str
) -> None:
    got, out, _ = request(server, "POST", "/search", body, headers)
    assert got == status and message in out["error"], out


def test_openapi_limits_are_the_enforced_limits(server: int) -> None:
    """Every bound the document states, sent at and just over it."""
    spec = request(server, "GET", "/openapi.json")[1]
    ref = spec["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]
    name = ref["schema"]["$ref"].rsplit("/", 1)[1]
    props = spec["components"]["schemas"][name]["properties"]
    assert spec["components"]["schemas"][name]["additionalProperties"] is False
    one_of = spec["components"]["schemas"][name]["oneOf"]
    assert sorted(r["required"][0] for r in one_of) == ["image", "images", "text", "texts"]

    def bound(field: str, key: str) -> int:
        schema = props[field]
        options = schema.get("anyOf", [schema])
        return int(next(o[key] for o in options if key in o))

    n = bound("text", "maxLength")
    assert post(server, {"text": "a" * n})[0] == 200
    assert "text" in post(server, {"text": "a" * (n + 1)})[1]["error"]
    n = bound("texts", "maxItems")
    status, out = post(server, {"texts": ["a red circle"] * n, "k": 1})
    assert status == 200 and len(out["results"]) == n
    assert "texts" in post(server, {"texts": ["a"] * (n + 1)})[1]["error"]
    for field in ("k", "candidates"):
        hi, lo = bound(field, "maximum"), bound(field, "minimum")
        assert post(server, {"text": "a", field: hi})[0] == 200
        assert post(server, {"text": "a", field: lo})[0] == 200
        assert field in post(server, {"text": "a", field: hi + 1})[1]["error"]
        assert field in post(server, {"text": "a", field: lo - 1})[1]["error"]
    n = bound("images", "maxItems")  # a region gallery: in bounds, then refused for its kind
    assert "send text queries" in post(server, {"images": ["aGk="] * n})[1]["error"]
    assert "images" in post(server, {"images": ["aGk="] * (n + 1)})[1]["error"]
    # The body limit the document describes, at and over it.
    limit = serve.MAX_BODY
    assert f"{limit} bytes" in spec["info"]["description"]
    body = json.dumps({"text": "a"}).encode()
    status, _, _ = request(server, "POST", "/search", body + b" " * (limit - len(body)))
    assert status == 200
    status, _, _ = request(server, "POST", "/search", body + b" " * (limit + 1 - len(body)))
    assert status == 413


def test_server_survives_odd_clients(server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "DELETE", "/search")[0] == 405
    assert request(server, "POST", "/elsewhere", b"{}")[0] == 404
    assert request(server, "HEAD", "/health")[0] == 200
    status, out, _ = request(server, "GET", "/health", headers={"Host": "evil.example"})
    assert status == 400 and "unknown Host" in out["error"]
    with socket.create_connection(("127.0.0.1", server), timeout=20) as raw:
        # No Content-Length: refused, not waited on.
        raw.sendall(
            b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\r\n"
        )
        assert b" 411 " in raw.recv(4096).split(b"\r\n")[0]
    monkeypatch.setattr(guard, "HEAD_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", server), timeout=20) as stalled:
        stalled.sendall(b"POST /search HTTP/1.1\r\nContent-Length: 100\r\n")  # and then nothing
        assert request(server, "GET", "/health")[0] == 200  # others are served meanwhile
        t0 = time.monotonic()
        assert stalled.recv(4096) == b""  # and the stalled head is dropped
        assert time.monotonic() - t0 < 5


def test_slow_and_short_bodies_and_a_burst_get_4xx(
    server: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(guard, "DEADLINE_S", 2.0)
    head = b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    slow = []
    for _ in range(60):  # a burst of slow clients: each sends part of its body, then stalls
        c = socket.create_connection(("127.0.0.1", server), timeout=30)
        c.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"text": ')
        slow.append(c)
    assert post(server, {"text": "a red circle"})[0] == 200  # served meanwhile
    statuses = [c.recv(4096).split(b"\r\n")[0] for c in slow]
    for c in slow:
        c.close()
    assert all(b" 408 " in s for s in statuses), set(statuses)
    # A body shorter than its Content-Length, then the client's half of the stream closes.
    with socket.create_connection(("127.0.0.1", server), timeout=30) as c:
        c.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"text": "a"}')
        c.shutdown(socket.SHUT_WR)
        answer = c.recv(4096).split(b"\r\n")[0]
        assert answer == b"" or b" 4" in answer, answer
    # JSON nested far deeper than any request needs.
    status, out, _ = request(server, "POST", "/search", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400, out
    # The in-flight bound: held slots make the next request a 503 with Retry-After.
    monkeypatch.setattr(guard, "MAX_IN_FLIGHT", 3)
    held = []
    for _ in range(3):
        c = socket.create_connection(("127.0.0.1", server), timeout=30)
        c.sendall(head + b"Content-Length: 100\r\n\r\n{")
        held.append(c)
    time.sleep(0.3)
    status, out, headers = request(server, "GET", "/health")
    assert status == 503 and headers.get("retry-after") == "1", out
    for c in held:
        c.close()
    text = caplog.text
    assert "Traceback" not in text and '" 500 ' not in text


def test_log_lines_escape_what_clients_send(server: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="setdiv.index.serve")
    request(server, "GET", "/x%0d%0aINFO%20forged%20line%1b[31m")
    deadline = time.monotonic() + 10  # the line is written after the response is sent
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "setdiv.index.serve"]
        forged = [m for m in lines if "forged" in m]
        if forged or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert forged, lines
    line = forged[0]
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "/x%0d%0aINFO%20forged" in line and " 404 " in line


def test_every_error_is_json_with_an_error_message(server: int) -> None:
    """Errors of FastAPI (405, bodies it cannot parse), uvicorn (a broken request line) and the
    guard (a chunked body over the limit) in the one documented shape."""
    cases = [
        ("DELETE", "/search", None, {}, 405),
        ("POST", "/search", b"{not json", {}, 400),
        ("POST", "/search", b"[" * 100_000 + b"]" * 100_000, {}, 400),
        ("GET", "/nope", None, {}, 404),
    ]
    for method, path, body, headers, want in cases:
        status, out, _ = request(server, method, path, body, headers)
        assert status == want and isinstance(out["error"], str), (method, path, out)
        assert set(out) <= {"error", "detail"} and (status == 400 or "detail" not in out)
    assert request(server, "DELETE", "/search")[2]["allow"] == "POST"

    def answer(raw: bytes) -> tuple[int, dict]:
        with socket.create_connection(("127.0.0.1", server), timeout=30) as c:
            c.sendall(raw)
            resp = http.client.HTTPResponse(c)
            resp.begin()
            return resp.status, json.loads(resp.read())

    status, out = answer(b"GET /health HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n")
    assert status == 400 and isinstance(out["error"], str)
    head = b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    over = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * (guard.MAX_BODY // (1 << 20) + 1)
    status, out = answer(over + b"0\r\n\r\n")
    assert status == 413 and f"limited to {guard.MAX_BODY} bytes" in out["error"]


def test_a_port_out_of_range_is_one_line_and_exit_2(
    gallery: Path, capsys: pytest.CaptureFixture
) -> None:
    for port in ("99999", "-1"):
        assert cli.main(["serve", str(gallery / "img"), "--port", port]) == 2
        err = capsys.readouterr().err
        assert f"--port must be 0..65535, got {port}" in err and err.count("\n") == 1, err


def test_concurrent_queries_are_batched_through_the_model(service: Service) -> None:
    calls = []
    real = service.searcher.encode_texts
    gate = threading.Event()

    def counted(texts: list[str]) -> torch.Tensor:
        gate.wait(10)  # hold the model while the other requests queue up
        calls.append(len(texts))
        return real(texts)

    service.searcher.encode_texts = counted  # type: ignore[method-assign]
    try:
        texts = [f"a {c} circle" for c in ("red", "blue", "green", "yellow")] * 4
        futures = [service.submit("text", [t], 5, "auto") for t in texts]
        gate.set()
        hits = [f.result(timeout=60) for f in futures]
    finally:
        service.searcher.encode_texts = real  # type: ignore[method-assign]
    assert sum(calls) == 16 and len(calls) <= 2, calls  # the first alone, the rest together
    for t, h in zip(texts, hits, strict=True):
        alone = service.searcher.search(real([t]), 5)
        assert h.items[0].tolist() == alone.items[0].tolist()


def test_non_finite_sets_never_rank_and_never_reach_json(
    gallery: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    from setdiv.index.store import SetIndexStore

    broken = gallery / "nan_idx"
    shutil.copytree(gallery / "img", broken)
    part = np.load(broken / "elements-00000.npy", mmap_mode="r+")
    part[7, 0, :] = np.nan  # a NaN element written behind the index's back
    part.flush()
    del part
    with running_server(Service(SetSearcher(broken))) as port:
        for candidates in ("auto", 1000):
            status, out = post(port, {"texts": ["a red circle", "a star"], "k": 40,
                                      "candidates": candidates})  # fmt: skip
            assert status == 200
            for result in out["results"]:
                assert 7 not in [h["index"] for h in result["hits"]]
                assert all(np.isfinite(h["score"]) for h in result["hits"])
    # Appending non-finite elements is refused, naming the item.
    store = SetIndexStore.open(gallery / "img")
    sets = store.elements(np.arange(3)).clone()
    sets[1, 2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite elements.*test0000001"):
        store.append(sets, [store.items[i] for i in range(3)], "x")


def test_an_export_with_nan_weights_is_refused_by_build_and_eval(
    gallery: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from setdiv.eval.run import check_finite

    bad = gallery / "export_nan"
    shutil.copytree(gallery / "export0", bad)
    state = load_file(bad / "model.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    save_file(state, bad / "model.safetensors")
    build = ["index", "build", str(bad), "--modality", "image"]
    assert cli.main([*build, "--data", f"{gallery}/a/test-*.tar", "--out", str(gallery / "x")]) == 2
    assert "hold NaN or inf" in capsys.readouterr().err
    args = ["eval", str(bad), "--data", f"{gallery}/a/test-*.tar", "--protocol", "coco"]
    assert cli.main([*args, "--allow-partial"]) == 2
    assert "hold NaN or inf" in capsys.readouterr().err
    sims = np.random.default_rng(0).random((4, 20), dtype=np.float32)
    check_finite(sims, "0" * 64)
    sims[2, 3] = np.nan
    with pytest.raises(ValueError, match="1 non-finite scores of 80"):
        check_finite(sims, "0" * 64)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_workers_share_the_index_and_stop_gracefully_on_sigterm(gallery: Path) -> None:
    for bad in (["--threads", "0"], ["--workers", "0"], ["--workers", "2", "--port", "0"]):
        assert cli.main(["serve", str(gallery / "img"), *bad]) == 2
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "setdiv.cli", "serve", str(gallery / "img"), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--workers", "2", "--threads", "1"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                status, health, _ = request(port, "GET", "/health")
                if status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert health["threads"] == 1  # one math thread per worker (--threads)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(port, {"text": "a red circle"}), range(16)))
        assert {s for s, _ in answers} == {200}
        hits = [o["results"][0]["hits"] for _, o in answers]
        assert len({tuple(h["index"] for h in x) for x in hits}) == 1  # batches differ
        scores = np.array([[h["score"] for h in x] for x in hits])
        np.testing.assert_allclose(scores, scores[:1].repeat(len(scores), 0), atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("Started server process") == 2 and "Shutting down" in out, out[-3000:]
    assert "Traceback" not in out
