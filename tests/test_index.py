"""Search indexes: two-stage search against brute force, reranked scores against a naive
smooth-Chamfer, export identity, appending, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from setdiv import cli
from setdiv import config as config_lib
from setdiv import similarity as sim
from setdiv.data.convert import synthetic_samples
from setdiv.data.shards import write_shards
from setdiv.data.vocab import Vocab
from setdiv.export import export_model, load_exported
from setdiv.index.search import SetSearcher
from setdiv.model import build_model

ROOT = Path(__file__).parents[1]


def make_export(root: Path, seed: int) -> Path:
    cfg = config_lib.load(
        [ROOT / "configs/demo.yaml"],
        [f"model.text.vocab_path={root / 'vocab.json'}", "model.text.vocab_size=null"],
    )
    torch.manual_seed(seed)
    return export_model(build_model(cfg.model), cfg, root / f"export{seed}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("index")
    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    make_export(root, 0)
    make_export(root, 1)
    write_shards(synthetic_samples("test", 40, 0), root / "a", "test", "regions", "synthetic", 20)
    write_shards(synthetic_samples("val", 20, 0), root / "b", "val", "regions", "synthetic", 20)
    build = ["index", "build", str(root / "export0"), "--modality"]
    assert (
        cli.main([*build, "image", "--data", f"{root}/a/test-*.tar", "--out", str(root / "img")])
        == 0
    )
    assert (
        cli.main([*build, "text", "--data", f"{root}/a/test-*.tar", "--out", str(root / "txt")])
        == 0
    )
    return root


def naive_smooth_chamfer(x_NKD: torch.Tensor, y_MLD: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per pair, the SPEC formula written out (fp64)."""
    out = torch.empty(x_NKD.shape[0], y_MLD.shape[0], dtype=torch.float64)
    for n in range(x_NKD.shape[0]):
        for m in range(y_MLD.shape[0]):
            c = x_NKD[n].double() @ y_MLD[m].double().T  # (K, L) cosines
            a = torch.logsumexp(alpha * c, dim=1).mean() + torch.logsumexp(alpha * c, dim=0).mean()
            out[n, m] = a / (2 * alpha)
    return out


def test_full_candidate_budget_equals_brute_force(setup: Path) -> None:
    s = SetSearcher(setup / "img")
    queries = s.encode_texts(["a red circle", "two blue squares and a green triangle", "a star"])
    n_elements = len(s.store) * s.store.meta.num_embeds
    fast = s.search(queries, k=10, candidates=n_elements)
    exact = s.exact(queries, k=10)
    assert fast.candidates == [len(s.store)] * 3
    assert torch.equal(fast.items, exact.items)
    torch.testing.assert_close(fast.scores, exact.scores, atol=1e-5, rtol=0)
    # Reranked scores are the export's smooth-Chamfer on the same sets (a naive reference).
    gallery = s.store.elements(fast.items[0].numpy())
    alpha = s.exported.cfg.similarity.alpha
    ref = naive_smooth_chamfer(gallery, queries[0:1], alpha)[:, 0]
    torch.testing.assert_close(fast.scores[0].double(), ref, atol=1e-5, rtol=0)
    # And the stored elements are the model's own encodings.
    ex = load_exported(setup / "export0")
    sample = next(iter(synthetic_samples("test", 40, 0)))
    with torch.no_grad():
        own = ex.model.encode_image(torch.from_numpy(sample.regions)[None]).embeds
    torch.testing.assert_close(s.store.elements(np.array([0]))[0], own[0], atol=1e-5, rtol=0)
    assert s.store.items[0]["id"] == sample.image_id and s.store.items[0]["captions"] == list(
        sample.captions
    )
    # A smaller budget re-scores fewer items.
    assert max(s.search(queries, k=5, candidates=2).candidates) < len(s.store)
    assert torch.isfinite(sim.smooth_chamfer(gallery, queries[0:1], alpha=alpha)).all()


def test_index_from_another_export_is_refused(setup: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="holds other weights .*rebuild the index"):
        SetSearcher(setup / "img", export=setup / "export1")
    args = ["search", str(setup / "img"), "a red circle", "--export", str(setup / "export1")]
    assert cli.main(args) == 2
    assert "rebuild the index with this export" in capsys.readouterr().err
    add = ["index", "build", str(setup / "export1"), "--modality", "image"]
    add += ["--data", f"{setup}/b/val-*.tar", "--out", str(setup / "img")]
    assert cli.main(add) == 2
    assert "was built with another export" in capsys.readouterr().err


def test_append_hnsw_and_cli_json(setup: Path, capsys: pytest.CaptureFixture) -> None:
    out = setup / "hnsw"
    build = ["index", "build", str(setup / "export0"), "--modality", "image", "--kind", "hnsw"]
    build += ["--fp16", "--out", str(out)]
    assert cli.main([*build, "--data", f"{setup}/a/test-*.tar"]) == 0
    assert cli.main([*build, "--data", f"{setup}/b/val-*.tar"]) == 0
    s = SetSearcher(out)
    assert len(s.store) == 60 and s.store.ann.ntotal == 60 * 4
    assert s.store.items[40]["id"] == "val0000000"
    capsys.readouterr()
    assert cli.main(["search", str(out), "a red circle", "--k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    q = s.encode_texts(["a red circle"])
    exact = s.exact(q, 3)
    assert [h["index"] for h in hits] == exact.items[0].tolist()  # fp16 elements, same order


def test_text_gallery_with_an_image_sample_query(
    setup: Path, capsys: pytest.CaptureFixture
) -> None:
    s = SetSearcher(setup / "txt")
    assert len(s.store) == 200 and s.store.items[7]["image_id"] == "test0000001"
    args = ["search", str(setup / "txt"), "--sample", f"{setup}/a/test-*.tar", "test0000003"]
    assert cli.main([*args, "--json", "--k", "5", "--candidates", "1000"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 5 and all("text" in h for h in hits)
    assert cli.main(["search", str(setup / "txt"), "a red circle"]) == 2
    assert "holds text items" in capsys.readouterr().err
    assert cli.main(["index", "eval", str(setup / "img"), "--queries", f"{setup}/a/test-*.tar",
                     "--candidates", "1000", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["recall@10_vs_exact"] == 1.0 and result["queries"] == 200
    assert result["two_stage"] == result["exact"]


# --- the HTTP API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(setup: Path):  # noqa: ANN201
    import threading

    from setdiv.index.serve import Service, make_server

    srv = make_server(Service(SetSearcher(setup / "img")), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict | str]:  # fmt: skip
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    base = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers={**base, **(headers or {})})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, json.loads(data) if ctype.startswith("application/json") else data


def test_server_answers_queries_like_the_library(setup: Path, server: int) -> None:
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["items"] == 40 and health["modality"] == "image"
    status, spec = request(server, "GET", "/openapi.json")
    assert status == 200 and "/search" in spec["paths"]
    status, page = request(server, "GET", "/")
    assert status == 200 and "<form" in page
    body = json.dumps({"texts": ["a red circle", "a blue square"], "k": 4}).encode()
    status, out = request(server, "POST", "/search", body)
    assert status == 200 and len(out["results"]) == 2
    s = SetSearcher(setup / "img")
    hits = s.search(s.encode_texts(["a blue square"]), 4, 64)
    assert [h["index"] for h in out["results"][1]["hits"]] == hits.items[0].tolist()


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{not json", None, 400, "not JSON"),
        (b"[1, 2]", None, 400, "JSON object"),
        (b'{"text": "a"', None, 400, "not JSON"),
        (json.dumps({"text": "a", "k": 0}).encode(), None, 400, "'k' must be an integer"),
        (json.dumps({"text": "a", "k": 10**9}).encode(), None, 400, "'k' must be an integer"),
        (json.dumps({"text": "a", "k": True}).encode(), None, 400, "'k' must be an integer"),
        (json.dumps({"text": "a", "candidates": "9"}).encode(), None, 400, "'candidates'"),
        (json.dumps({"text": ""}).encode(), None, 400, "non-empty strings"),
        (json.dumps({"text": 5}).encode(), None, 400, "non-empty strings"),
        (json.dumps({"text": "a" * 5000}).encode(), None, 400, "over 1000 characters"),
        (json.dumps({"texts": ["a"] * 65}).encode(), None, 400, "1..64 queries"),
        (json.dumps({"text": "a", "texts": ["b"]}).encode(), None, 400, "exactly one"),
        (json.dumps({"query": "a"}).encode(), None, 400, "unknown fields"),
        (json.dumps({"image": "aGVsbG8="}).encode(), None, 400, "send text queries"),
        (json.dumps({"text": "   "}).encode(), None, 400, "empty text query"),
        (b"{}", {"Content-Type": "text/plain"}, 415, "application/json"),
        (b"{}", {"Content-Length": str(10**9)}, 413, "limited to"),
    ],
)
def test_bad_requests_get_4xx_never_500(
    server: int, body: bytes, headers: dict | None, status: int, message: str
) -> None:
    got, out = request(server, "POST", "/search", body, headers)
    assert got == status and message in out["error"], out


def test_server_survives_odd_clients(server: int) -> None:
    import socket

    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "DELETE", "/search")[0] == 405
    assert request(server, "POST", "/elsewhere", b"{}")[0] == 404
    with socket.create_connection(("127.0.0.1", server), timeout=20) as raw:
        # No Content-Length: refused, not waited on.
        raw.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        assert b" 411 " in raw.recv(4096).split(b"\r\n")[0]
    with socket.create_connection(("127.0.0.1", server), timeout=20) as stalled:
        stalled.sendall(b"POST /search HTTP/1.1\r\nContent-Length: 100\r\n")  # and then nothing
        # Meanwhile other clients are served.
        assert request(server, "GET", "/health")[0] == 200


def test_query_page_in_a_headless_browser(server: int) -> None:
    """The HTML page, run by a real browser: it asks /health, posts the query in its URL and
    lists the hits."""
    import shutil
    import subprocess

    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        pytest.skip("no Chromium here (tools/bootstrap.sh installs it where apt-get can)")
    page = f"http://127.0.0.1:{server}/?q=a+red+circle"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000"]
    r = subprocess.run(
        [browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "40 image items, Flat" in r.stdout
    assert r.stdout.count("<li>") == 10 and "test00000" in r.stdout


@pytest.mark.distributed
def test_two_processes_build_the_same_index(setup: Path) -> None:
    out = setup / "img2"
    args = ["index", "build", str(setup / "export0"), "--modality", "image", "--nproc", "2"]
    assert cli.main([*args, "--data", f"{setup}/a/test-*.tar", "--out", str(out)]) == 0
    one, two = SetSearcher(setup / "img").store, SetSearcher(out).store
    assert two.items == one.items
    assert torch.equal(two.elements(), one.elements())


def test_an_append_that_dies_leaves_the_previous_index_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from setdiv.index.store import AnnSpec, IndexMeta, SetIndexStore

    meta = IndexMeta("image", "x", "0" * 64, "", AnnSpec("flat"), 2, 8, "float32")
    store = SetIndexStore.create(tmp_path, meta)
    first = torch.nn.functional.normalize(torch.randn(5, 2, 8), dim=-1)
    store.append(first, [{"id": i} for i in range(5)], "a")

    def crash() -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_meta", crash)
    with pytest.raises(OSError):
        store.append(torch.randn(3, 2, 8), [{"id": 9}] * 3, "b")
    again = SetIndexStore.open(tmp_path)
    assert len(again) == 5 and again.ann.ntotal == 10 and len(again.items) == 5
    assert torch.equal(again.elements(), first)
    again.append(torch.randn(3, 2, 8), [{"id": 7}] * 3, "c")  # and it goes on from there
    assert len(SetIndexStore.open(tmp_path).items) == 8


def test_image_queries_to_a_region_model_are_a_4xx(setup: Path) -> None:
    import base64

    from setdiv.index.serve import RequestError, Service

    service = Service(SetSearcher(setup / "txt"))
    blob = base64.b64encode(b"\x89PNG not really").decode()
    with pytest.raises(RequestError, match="reads region features") as err:
        service.search({"image": blob})
    assert err.value.status == 400
    with pytest.raises(RequestError, match="send image queries"):
        service.search({"text": "a red circle"})
