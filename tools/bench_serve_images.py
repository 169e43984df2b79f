"""`setdiv serve` under the image-query load of issue 29 D: C clients each sending requests of
N large, mostly flat PNGs (31 megapixels, ~100 KB each on the wire) without pause, while one
client times text queries and one times small image queries.

A server answers one kind of query, so two servers run from one export whose image tower
reads pixels (timm's `test_resnet`, random weights; 224-pixel inputs): a caption gallery takes
the image load and the small image queries (the same process: what its pixel budgets protect),
and a picture gallery on the same machine takes the text queries (its neighbour: what the
load's CPU and memory cost others). Both galleries are the synthetic data's test split.

    python tools/bench_serve_images.py [--clients 8] [--images 8 2] [--seconds 30] [--out r.json]
    git archive COMMIT | tar -x -C /tmp/old                 # an older server, same measurement:
    python tools/bench_serve_images.py --code /tmp/old --images 8

Each `--images` value is one load phase. Prints per phase: text and small-image p50 / p95 (and
their ratio to the unloaded phase), the image requests' status codes and latency, and both
servers' peak RSS (VmHWM, summed over a server's processes).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_serve import captions, start  # noqa: E402

from setdiv.distributed import free_port  # noqa: E402
from setdiv.index.service import MAX_DECODING_PIXELS, MAX_REQUEST_PIXELS  # noqa: E402


def build(root: Path, n_images: int) -> tuple[Path, Path, str]:
    """(picture index, caption index, shard glob) over synthetic test images, from an export
    whose image tower reads pixels."""
    import torch

    from setdiv import cli
    from setdiv import config as config_lib
    from setdiv.data.convert import synthetic_samples
    from setdiv.data.shards import write_shards
    from setdiv.data.vocab import Vocab
    from setdiv.export import export_model
    from setdiv.model import build_model

    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    overrides = [
        f"model.text.vocab_path={root / 'vocab.json'}", "model.text.vocab_size=null",
        "model.image.name=timm", "model.image.arch=test_resnet", "data.image_size=224",
    ]  # fmt: skip
    cfg = config_lib.load([ROOT / "configs/demo.yaml"], overrides)
    torch.manual_seed(0)
    export = export_model(build_model(cfg.model), cfg, root / "export")
    samples = synthetic_samples("test", n_images, 0, kind="image", image_size=224)
    write_shards(samples, root / "shards", "test", "image", "synthetic", 100)
    data = f"{root}/shards/test-*.tar"
    for modality in ("image", "text"):
        build = ["index", "build", str(export), "--modality", modality, "--data", data]
        assert cli.main([*build, "--out", str(root / modality)]) == 0
    return root / "image", root / "text", data


def big_png(width: int = 6800, height: int = 4560) -> bytes:
    """A mostly flat RGB PNG: `width` x `height` pixels in ~100 KB."""
    im = Image.new("RGB", (width, height), "white")
    im.paste((200, 30, 30), (width // 50, height // 50, width // 2, height // 2))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((640, 480), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def post(port: int, body: bytes, timeout: float = 120) -> tuple[int | str, float]:
    """(status, seconds) of one POST /search on a new connection."""
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/search", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        status: int | str = resp.status
    except OSError as exc:
        status = type(exc).__name__
    return status, time.perf_counter() - t0


def until(stop: threading.Event, port: int, bodies: list[bytes], out: list) -> None:
    """Send `bodies` in turn until `stop`, appending (status, seconds) to `out`."""
    i = 0
    while not stop.is_set():
        out.append(post(port, bodies[i % len(bodies)]))
        i += 1


def peak_rss_mb(pid: int) -> float:
    """VmHWM of `pid` and its descendants (uvicorn's workers), MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def stats(samples: list[tuple[int | str, float]]) -> dict:
    ms = np.array([s for _, s in samples]) * 1000
    codes = Counter(str(c) for c, _ in samples)
    return {
        "n": len(samples),
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
        "codes": dict(sorted(codes.items())),
    }


def phase(ports: dict[str, int], light: dict[str, list[bytes]], load: list[bytes],
          clients: int, seconds: float) -> dict:  # fmt: skip
    """Light queries timed for `seconds` (one client per kind), beside `clients` load clients
    sending `load` bodies (none: the unloaded phase)."""
    stop, threads, got = threading.Event(), [], {"text": [], "small image": [], "load": []}
    for kind in ("text", "small image"):
        port = ports["image gallery"] if kind == "text" else ports["text gallery"]
        threads.append(threading.Thread(target=until, args=(stop, port, light[kind], got[kind])))
    for _ in range(clients if load else 0):
        args = (stop, ports["text gallery"], load, got["load"])
        threads.append(threading.Thread(target=until, args=args))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return {kind: stats(samples) for kind, samples in got.items() if samples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8, help="load clients")
    p.add_argument("--images", type=int, nargs="+", default=[8, 2], help="PNGs per request")
    p.add_argument("--seconds", type=float, default=30, help="per phase")
    p.add_argument("--gallery", type=int, default=200, help="synthetic images in the galleries")
    p.add_argument("--code", type=Path, default=ROOT, help="the servers' source tree")
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    png = big_png()
    with Image.open(io.BytesIO(png)) as im:
        megapixels = im.size[0] * im.size[1] / 1e6
    results: dict = {"machine": machine, "code": str(args.code), "png_bytes": len(png),
                     "png_megapixels": megapixels}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        img_index, txt_index, data = build(Path(tmp), args.gallery)
        texts = captions(data, 200)
        light = {
            "text": [json.dumps({"text": t, "k": 10}).encode() for t in texts],
            "small image": [
                json.dumps({"image": base64.b64encode(small_jpeg()).decode()}).encode()
                for _ in range(4)
            ],  # fmt: skip
        }
        procs, ports = {}, {}
        try:
            for name, index in (("image gallery", img_index), ("text gallery", txt_index)):
                ports[name] = free_port()
                log = Path(tmp) / f"{index.name}.log"
                procs[name] = start(args.code, index, ports[name], log)
            phase(ports, light, [], 0, 3)  # warm up
            results["unloaded"] = phase(ports, light, [], 0, args.seconds)
            results["unloaded"]["peak_rss_mb"] = {n: peak_rss_mb(q.pid) for n, q in procs.items()}
            for n in args.images:
                images = [base64.b64encode(png).decode()] * n
                body = json.dumps({"images": images, "k": 10}).encode()
                name = f"{args.clients} clients x {n} PNGs"
                results[name] = phase(ports, light, [body], args.clients, args.seconds)
                results[name]["body_bytes"] = len(body)
                results[name]["peak_rss_mb"] = {n: peak_rss_mb(q.pid) for n, q in procs.items()}
                print(name, json.dumps(results[name]), flush=True)
        finally:
            for proc in procs.values():
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    report(results, args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def report(results: dict, args: argparse.Namespace) -> None:
    base = results["unloaded"]
    budgets = (
        f"; budgets: {MAX_REQUEST_PIXELS} pixels per request, {MAX_DECODING_PIXELS} decoding"
        if args.code == ROOT else ""
    )  # fmt: skip
    print(f"machine: {results['machine']}; server code: {args.code}; PNG "
          f"{results['png_megapixels']:.1f} MP, {results['png_bytes']} bytes{budgets}; "
          f"{args.seconds:.0f} s a phase")  # fmt: skip
    print(f"{'phase':<24}{'text p50/p95 ms':>18}{'x':>6}{'small img p50/p95':>20}{'x':>6}"
          f"  {'load codes':<22}{'load p50 ms':>12}{'peak RSS MB (txt/img)':>24}")  # fmt: skip
    for name, r in results.items():
        if not isinstance(r, dict) or "text" not in r:
            continue
        t, s, load = r["text"], r["small image"], r.get("load", {"codes": {}, "p50_ms": 0.0})
        rss = r["peak_rss_mb"]
        print(
            f"{name:<24}{t['p50_ms']:8.1f} /{t['p95_ms']:7.1f}"
            f"{t['p50_ms'] / base['text']['p50_ms']:6.2f}"
            f"{s['p50_ms']:10.1f} /{s['p95_ms']:7.1f}"
            f"{s['p50_ms'] / base['small image']['p50_ms']:6.2f}"
            f"  {json.dumps(load['codes']):<22}{load['p50_ms']:12.1f}"
            f"{rss['text gallery']:12.0f} / {rss['image gallery']:.0f}"
        )


if __name__ == "__main__":
    main()
