"""`setdiv demo`, the README's main job: the set model beats the single embedding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from setdiv import cli


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_set_model_beats_single_embedding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["rows"]
    k4, k1 = rows["set K=4 (smooth-Chamfer)"], rows["single K=1 (cosine)"]
    assert k4["rsum"] > k1["rsum"]
    # Slots specialise: every slot's largest attention weight is above uniform attention on
    # average, and on the whole well above it (images hold 2-5 objects among 8 regions).
    spec = summary["specialisation"]
    peaks, uniform = spec["slot_max_attention"], spec["uniform"]
    assert len(peaks) == 4 and min(peaks) > uniform, (peaks, uniform)
    assert sum(peaks) / len(peaks) > 1.5 * uniform, (peaks, uniform)
    for png in ("attention.png", "specialisation.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "RSUM gain of the set model over the single embedding" in out
    _search_the_demo_gallery_over_http(tmp_path)


def _search_the_demo_gallery_over_http(demo: Path) -> None:
    """The demo's set model behind `setdiv serve`: an index over the synthetic test split, text
    queries over HTTP (a candidate budget covering this small gallery), the images whose
    captions name the queried object come first."""
    import http.client
    import threading

    from setdiv.index.search import SetSearcher
    from setdiv.index.serve import Service, make_server

    index = demo / "index"
    build = ["index", "build", str(demo / "run_k4/export"), "--modality", "image"]
    assert cli.main([*build, "--data", f"{demo}/data/test-*.tar", "--out", str(index)]) == 0
    objects = ["red circle", "large green triangle", "small blue square", "yellow diamond"]
    server = make_server(Service(SetSearcher(index)), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        body = json.dumps({"texts": [f"a {o}" for o in objects], "k": 5, "candidates": 4096})
        conn.request("POST", "/search", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        results = json.loads(response.read())["results"]
    finally:
        server.shutdown()
        server.server_close()
    items = SetSearcher(index).store.items
    named, base = [], []
    for result, obj in zip(results, objects, strict=True):
        obj = obj.split(" ", 1)[1] if obj.split()[0] in ("large", "small") else obj
        named.append(sum(any(obj in c for c in hit["captions"]) for hit in result["hits"]))
        base.append(sum(any(obj in c for c in it["captions"]) for it in items) / len(items))
    # Every query's top 5 holds images naming the object, on the whole half or more of them,
    # at least three times the share of such images in the gallery.
    share = sum(named) / (5 * len(objects))
    assert min(named) >= 2 and share >= 0.5, (named, base)
    assert share > 3 * sum(base) / len(base), (named, base)
