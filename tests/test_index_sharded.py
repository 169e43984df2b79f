"""A sharded index (`setdiv/index/sharded.py`): shards built over parts of the data answer
as the single index over all of it (ties included: copies of the same image in different
shards), in this process and as Ray Serve replicas on a real two-node Ray cluster behind
`setdiv serve --ray`, which answers 503 (never a partial answer) while a killed replica
restarts."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from run_helpers import RAY_ENV, run_setdiv
from test_index_ray import ray_start

from setdiv.data.convert import synthetic_samples
from setdiv.data.shards import write_shards
from setdiv.data.vocab import Vocab
from setdiv.distributed import free_port
from setdiv.index.search import SetSearcher
from setdiv.index.sharded import local_shards

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 synthetic images in 4 data shards of 40, the last 20 copies (new ids, same regions)
    of images in the first shard; one index over all 4, and one of 2 shards over 2 each."""
    from test_index import make_export

    root = tmp_path_factory.mktemp("sharded")
    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    export = make_export(root, 0)
    samples = list(synthetic_samples("test", 140, 0))
    copies = [dataclasses.replace(s, image_id=f"copy-{s.image_id}") for s in samples[5:25]]
    write_shards([*samples, *copies], root / "g", "test", "regions", "syn", 40)
    build = ["index", "build", str(export), "--modality", "image", "--batch-size", "16"]
    parts = {"one": "{000000..000003}", "sharded/shard-000": "{000000..000001}",
             "sharded/shard-001": "{000002..000003}"}  # fmt: skip
    for out, which in parts.items():
        done = run_setdiv(*build, "--data", f"{root}/g/test-{which}.tar", "--out", str(root / out))
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def queries(root: Path) -> list[str]:
    """Every caption of the split (5 per image): its text queries."""
    return [c for s in synthetic_samples("test", 140, 0) for c in s.captions]


def test_shards_answer_as_the_single_index_ties_included(built: Path) -> None:
    one, sharded = SetSearcher(built / "one"), local_shards(built / "sharded")
    assert len(sharded.store) == len(one.store) == 160
    assert [i["id"] for i in sharded.store.items] == [i["id"] for i in one.store.items]
    q = one.encode_texts(queries(built))
    assert torch.equal(sharded.encode_texts(queries(built)), q)
    for name in ("exact", "auto"):
        want = one.exact(q, 10) if name == "exact" else one.search(q, 10)
        got = sharded.exact(q, 10) if name == "exact" else sharded.search(q, 10)
        assert torch.equal(got.items, want.items), name
        assert torch.equal(got.scores, want.scores), name
    # The copies tie with their originals, and sort behind them (the lower row first).
    ids, tied = [i["id"] for i in one.store.items], []
    for row_s, row_i in zip(want.scores.tolist(), want.items.tolist(), strict=True):
        for j in range(len(row_s) - 1):
            if row_s[j] == row_s[j + 1]:
                tied.append((ids[row_i[j]], ids[row_i[j + 1]]))
    assert tied and all(b == f"copy-{a}" for a, b in tied), tied[:5]


def _replica_pid(name: str) -> int:
    """The pid of the Serve replica process of deployment `name` (its process title)."""
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{name}:"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1, out
    return pids[0]


def _post(url: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_serve_shards_on_two_nodes_answer_as_one_index_and_503_while_restarting(
    built: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (ray[serve])")
    one = SetSearcher(built / "one")
    texts = queries(built)
    want = one.search(one.encode_texts(texts), 10)
    want_ids = [[r["id"] for r in one.describe(want, n)] for n in range(len(texts))]
    temp = tempfile.mkdtemp(prefix="sds", dir="/tmp")  # (Ray's socket paths: keep it short)
    port = free_port()
    head = ray_start("--head", "--port", str(port), "--temp-dir", temp,
                     "--include-dashboard", "false", log=tmp_path / "head.log")  # fmt: skip
    worker = server = None
    try:
        time.sleep(3)
        worker = ray_start("--address", f"127.0.0.1:{port}", log=tmp_path / "worker.log")
        http = free_port()
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "setdiv.cli", "serve", str(built / "sharded"), "--ray",
             "--address", f"127.0.0.1:{port}", "--port", str(http)], cwd=ROOT, env=RAY_ENV,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{http}"
        deadline = time.time() + 300
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        text = (tmp_path / "serve.log").read_text()
        assert "2 index shards (160 items) on Ray Serve, 2 node(s)" in text, text[-3000:]
        for start in range(0, len(texts), 20):
            status, got = _post(f"{url}/search", {"texts": texts[start : start + 20], "k": 10})
            assert status == 200, got
            ids = [[h["id"] for h in r["hits"]] for r in got["results"]]
            assert ids == want_ids[start : start + 20]
        # 20 s of queries from 2 clients; 3 s in, shard 1's replica process is SIGKILLed.
        log: list[tuple[float, float, int, bool | str]] = []  # (sent, answered, status, ...)
        t0 = time.time()

        def load() -> None:
            n = 0
            while time.time() - t0 < 20:
                batch = [texts[(n + i) % len(texts)] for i in range(4)]
                sent = time.time() - t0
                status, got = _post(f"{url}/search", {"texts": batch, "k": 10})
                right = [want_ids[(n + i) % len(texts)] for i in range(4)]
                ok = (
                    [[h["id"] for h in r["hits"]] for r in got["results"]] == right
                    if status == 200 else got.get("error", "")
                )  # fmt: skip
                log.append((sent, time.time() - t0, status, ok))
                n += 4

        clients = [threading.Thread(target=load) for _ in range(2)]
        for c in clients:
            c.start()
        time.sleep(3)
        victim = _replica_pid("setdiv-shard-001")
        os.kill(victim, signal.SIGKILL)
        killed = time.time() - t0
        for c in clients:
            c.join()
        answered = [x for x in log if x[2] == 200]
        assert all(x[3] is True for x in answered), "a wrong answer"
        failed = [x for x in log if x[2] != 200]
        assert all(x[2] == 503 and "did not answer" in str(x[3]) for x in failed), failed[:3]
        back = min(x[1] for x in answered if x[0] > killed)  # the first answer sent after
        assert all(killed <= x[1] <= back for x in failed), (killed, back, failed[:3])
        assert back - killed < 15 and len(answered) > 20, (back - killed, len(answered))
        assert _replica_pid("setdiv-shard-001") != victim  # Serve started a new one
    finally:
        for p in (server, worker, head):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
