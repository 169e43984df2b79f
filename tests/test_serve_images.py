"""`setdiv serve` with pictures and image queries: thumbnails found by id (never by
position), the query page in a headless browser (text search, image upload), image queries
answered like the library, damaged images refused, decoded pixels bounded per request and per
process."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import (
    Chromium,
    b64,
    build_index,
    chromium_dom,
    jpeg,
    png,
    post,
    request,
    running_server,
)

from setdiv import cli
from setdiv.data.convert import synthetic_samples
from setdiv.data.samples import image_file_pixels, sample_options
from setdiv.data.shards import write_shards
from setdiv.index import guard
from setdiv.index import service as service_module
from setdiv.index.search import SetSearcher
from setdiv.index.service import (
    MAX_PIXELS,
    MAX_REQUEST_PIXELS,
    THUMB,
    Service,
    decode_query_image,
    thumbnail,
)


def test_pictures_are_served_as_bounded_thumbnails(gallery: Path, server: int) -> None:
    status, data, headers = request(server, "GET", "/image/at/3")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and max(im.size) <= THUMB
    items = SetSearcher(gallery / "img").store.items
    assert request(server, "GET", f"/image/{items[3]['id']}")[1] == data  # by id
    assert request(server, "GET", "/image/at/99999")[0] == 404
    assert request(server, "GET", "/image/nope")[0] == 404
    # A region gallery built from shards without pictures has none to show.
    root = gallery
    write_shards(synthetic_samples("val", 6, 0), root / "np", "val", "regions", "synthetic", 6)
    build = ["index", "build", str(root / "export0"), "--modality", "image"]
    assert cli.main([*build, "--data", f"{root}/np/val-*.tar", "--out", str(root / "np_idx")]) == 0
    with running_server(Service(SetSearcher(root / "np_idx"))) as port:
        status, out, _ = request(port, "GET", "/image/at/0")
        assert status == 404 and "no picture" in out["error"]


def test_pictures_are_found_by_id_never_by_position(gallery: Path) -> None:
    """Zero-padded numeric ids (img2dataset keys, COCO ids) that are not the positions:
    /image/{id} is that id's picture, /image/at/{n} the n-th item's, the hits link theirs, and
    odd ids (a superscript digit, 5000 digits) are a JSON 404, never a 500."""
    scenes = synthetic_samples("val", 6, 0, picture=True)
    samples = [replace(s, image_id=f"{7 - n:09d}") for n, s in enumerate(scenes)]
    index = build_index(gallery, gallery / "export0", samples, "regions", "image", "padded")
    by_id = {s.image_id: thumbnail(s.jpg) for s in samples}  # type: ignore[arg-type]
    third = str(SetSearcher(index).store.items[3]["id"])
    assert third != "000000003" and by_id[third] != by_id["000000003"]
    with running_server(Service(SetSearcher(index))) as port:
        assert request(port, "GET", "/image/000000003")[1] == by_id["000000003"]
        assert request(port, "GET", "/image/at/3")[1] == by_id[third]
        odd = ["/image/3", "/image/%C2%B2", "/image/" + "9" * 5000, "/image/at/000000009",
               "/image/at/%C2%B2", "/image/at/" + "9" * 5000, "/image/at/-1"]  # fmt: skip
        for path in odd:
            status, out, _ = request(port, "GET", path)
            assert status == 404 and isinstance(out["error"], str), (path[:40], out)
        hits = post(port, {"text": "a red circle", "k": 6})[1]["results"][0]["hits"]
        assert len(hits) == 6
        for hit in hits:
            assert request(port, "GET", hit["picture"])[1] == by_id[hit["id"]]


def test_query_page_shows_ten_thumbnails_in_a_headless_browser(server: int) -> None:
    """The HTML page, run by a real browser: it asks /health, posts the query in its URL and
    shows the hits as thumbnails that load."""
    dom = chromium_dom(f"http://127.0.0.1:{server}/?q=a+red+circle")
    assert "40 image items, Flat" in dom
    assert dom.count('class="hit"') == 10 and dom.count("<img") == 10
    assert dom.count('data-loaded="') == 10, dom[-3000:]
    assert 'data-loaded="0"' not in dom


def test_query_page_searches_an_uploaded_image_in_a_headless_browser(
    text_server: tuple[int, Service], tmp_path: Path
) -> None:
    """A text gallery's page offers an image upload: the chosen file is searched and its hits'
    captions shown, as /search answers them; a file over the pixel limit is refused there."""
    port, _ = text_server
    (tmp_path / "q.jpg").write_bytes(jpeg())
    Image.new("L", (7000, 5000)).save(tmp_path / "big.png")  # 35 megapixels: over the limit
    hits = post(port, {"image": b64((tmp_path / "q.jpg").read_bytes())})[1]
    browser = Chromium()
    try:
        browser.open(f"http://127.0.0.1:{port}/")
        shown = "!document.getElementById('u').hidden && document.getElementById('f').hidden"
        assert browser.wait_for(shown)
        browser.upload("#img", str(tmp_path / "q.jpg"))
        items = "[...document.querySelectorAll('#hits li.text')].map(li => li.textContent)"
        texts = browser.wait_for(f"(x => x.length == 10 && x)({items})")
        browser.upload("#img", str(tmp_path / "big.png"))
        refusal = browser.wait_for(
            "(t => t.includes('pixels, over') && t)(document.getElementById('hits').textContent)"
        )
    finally:
        browser.close()
    want = hits["results"][0]["hits"]
    assert len(want) == 10
    for text, hit in zip(texts, want, strict=True):
        assert text.startswith(f"#{hit['rank']} ") and text.endswith(f" {hit['id']}{hit['text']}")
    assert f"35000000 pixels, over {MAX_PIXELS}" in refusal


def test_image_queries_answer_like_the_library_and_damaged_ones_get_400(
    text_server: tuple[int, Service],
) -> None:
    port, service = text_server
    data = jpeg()
    status, out = post(port, {"image": b64(data), "k": 5})
    s = service.searcher  # the reference: evaluation's reading of the image, the library
    opts = sample_options(s.exported.cfg.data, "image", None, train=False, augment=False)  # type: ignore[arg-type]
    hits = s.search(s.encode_images(image_file_pixels(io.BytesIO(data), 64, "crop", opts)), 5)
    assert status == 200
    assert [h["index"] for h in out["results"][0]["hits"]] == hits.items[0].tolist()
    for cut in (len(data) // 2, len(data) - 10):  # a valid header, the body cut short
        status, out = post(port, {"images": [b64(data), b64(data[:cut])]})
        assert status == 400 and out["error"].startswith("image 1: a damaged JPEG"), out


def test_image_pixels_are_bounded_per_request_and_per_process(
    text_server: tuple[int, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's request (8 x 31 megapixels) is refused before decoding; within the budget,
    concurrent requests decode one large image at a time (and one small one beside it); a
    large image whose lane stays busy past the deadline is a 503, and a small one meanwhile
    is not held up."""
    port, _ = text_server
    big = b64(png(6800, 4560))  # 31 megapixels, a few KB on the wire
    real, lock, gate = service_module.decode_query_image, threading.Lock(), threading.Event()
    inside, peak = {True: 0, False: 0}, {True: 0, False: 0}

    def counted(data: bytes, *args: object) -> torch.Tensor:
        large = service_module.image_pixels(data) > service_module.LARGE_IMAGE
        with lock:
            inside[large] += 1
            peak[large] = max(peak[large], inside[large])
        try:
            gate.wait(30 if large else 0)
            return real(data, *args)  # type: ignore[arg-type]
        finally:
            with lock:
                inside[large] -= 1

    monkeypatch.setattr(service_module, "decode_query_image", counted)
    t0 = time.monotonic()
    status, out = post(port, {"images": [big] * 8})
    assert status == 413 and f"at most {MAX_REQUEST_PIXELS} pixels" in out["error"], out
    assert time.monotonic() - t0 < 3 and peak == {True: 0, False: 0}
    spec = request(port, "GET", "/openapi.json")[1]["info"]["description"]
    assert f"{MAX_REQUEST_PIXELS} per request" in spec and f"{MAX_PIXELS} pixels each" in spec
    gate.set()
    with ThreadPoolExecutor(4) as pool:
        body = {"images": [big, b64(jpeg()), big], "k": 3}
        answers = list(pool.map(lambda _: post(port, body), range(4)))
    assert [s for s, _ in answers] == [200] * 4 and peak == {True: 1, False: 1}
    gate.clear()  # from here on, a large image's decoding hangs
    monkeypatch.setattr(guard, "DEADLINE_S", 3.0)
    t0 = time.monotonic()
    status, out, headers = request(port, "POST", "/search", json.dumps({"image": big}).encode())
    assert status == 503 and "not decoded within the request deadline" in out["error"], out
    assert headers["retry-after"] == "1" and time.monotonic() - t0 < 3.5
    try:
        assert post(port, {"image": b64(jpeg())})[0] == 200  # not queued behind it
    finally:
        gate.set()


def test_query_images_are_checked_before_decoding() -> None:
    ok = png(300, 200)
    assert decode_query_image(ok, 64, "crop").shape == (1, 3, 64, 64)
    for fmt in ("JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (80, 60), "red").save(buf, format=fmt)
        assert decode_query_image(buf.getvalue(), 64, "crop").shape == (1, 3, 64, 64)
    bomb = png(11000, 11000)  # ~100 KB on the wire, 121 megapixels decoded
    assert len(bomb) < 1 << 20 and 11000 * 11000 > MAX_PIXELS
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="over the limit"):
        decode_query_image(bomb, 64, "crop")
    assert time.monotonic() - t0 < 0.5
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ValueError, match="not a JPEG, PNG or WebP"):
        decode_query_image(eps, 64, "crop")
    smooth = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    photo = io.BytesIO()  # a large picture is shrunk before the transform, reading the same
    Image.fromarray(smooth).resize((1003, 797), Image.Resampling.BICUBIC).save(photo, "PNG")
    full = image_file_pixels(io.BytesIO(photo.getvalue()), 64, "crop")
    assert (decode_query_image(photo.getvalue(), 64, "crop") - full).abs().mean() < 0.03
    cut = jpeg()[:-100]
    with pytest.raises(ValueError, match="a damaged JPEG image"):
        decode_query_image(cut, 64, "crop")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(ValueError, match="not a JPEG, PNG or WebP"):
        decode_query_image(gif.getvalue(), 64, "crop")
