"""The sharded index on Ray Serve against the single-process service, on galleries of random
sets (K=4, D=256, unit vectors; float16 elements, IVF-SQ8 FAISS indexes, nlist 1024): for
each gallery size, S index shards are written directly (no encoder involved), then

  1. `setdiv serve DIR --ray` on a two-node Ray cluster started here (head + worker, one CPU
     slot each: one shard replica per node), and
  2. `setdiv serve DIR` (the same shards searched in one process: the baseline),

each under C clients sending one caption query after another for T seconds (text queries,
encoded by the router with a bi-GRU export of width 256). Reported per size and server:
req/s, p50 / p99 latency, and peak RSS (VmHWM) of every replica process and of the router.
The baseline runs only up to --compare-max (both hold the whole gallery in memory at once).

    python tools/bench_serve_sharded.py [--sizes 1000000 4000000] [--shards 2] [--clients 4]
        [--seconds 20] [--compare-max 1000000] [--out docs/bench/serve_sharded.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from setdiv.distributed import free_port  # noqa: E402

K, D = 4, 256
CHUNK = 250_000
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
RAY = str(Path(sys.executable).parent / "ray")


def make_export(root: Path) -> Path:
    import torch

    from setdiv import config as config_lib
    from setdiv.data.convert import synthetic_samples
    from setdiv.data.vocab import Vocab
    from setdiv.export import export_model
    from setdiv.model import build_model

    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    cfg = config_lib.load(
        [ROOT / "configs/demo.yaml"],
        [f"model.text.vocab_path={root / 'vocab.json'}", "model.text.vocab_size=null",
         f"model.embed_dim={D}"],
    )  # fmt: skip
    torch.manual_seed(0)
    return export_model(build_model(cfg.model), cfg, root / "export")


def write_shards(root: Path, export: Path, n: int, shards: int) -> float:
    """`shards` index shards of n random sets in all; returns the seconds it took."""
    import torch

    from setdiv.export import load_exported
    from setdiv.index.meta import AnnSpec, IndexMeta
    from setdiv.index.store import SetIndexStore

    start = time.perf_counter()
    ex = load_exported(export)
    rng = np.random.default_rng(0)
    per = -(-n // shards)
    for s in range(shards):
        meta = IndexMeta("image", str(export), ex.sha256, (export / "config.yaml").read_text(),
                         AnnSpec(kind="ivf", codec="sq8"), K, D, "float16")  # fmt: skip
        store = SetIndexStore.create(root / f"shard-{s:03d}", meta)
        first, last = s * per, min((s + 1) * per, n)
        for a in range(first, last, CHUNK):
            b = min(a + CHUNK, last)
            x = rng.standard_normal((b - a, K, D), dtype=np.float32)
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
            store.append(torch.from_numpy(x), [{"id": f"r{i:08d}"} for i in range(a, b)], "random")
            print(f"  shard {s}: {b - first} of {last - first} sets", flush=True)
    return time.perf_counter() - start


def ray_start(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0",
         "--disable-usage-stats", *args],
        env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def serve(index: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "setdiv.cli", "serve", str(index), "--port", str(port), *extra],
        cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise RuntimeError(f"the server did not start: see {log}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:setdiv-shard-"], capture_output=True,
                         text=True)  # fmt: skip
    return [int(p) for p in out.stdout.split()]


def load(port: int, texts: list[str], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(c: int) -> None:
        conn, n = http.client.HTTPConnection("127.0.0.1", port, timeout=120), c
        while time.perf_counter() < end:
            body = json.dumps({"text": texts[n % len(texts)], "k": 10})
            t0 = time.perf_counter()
            conn.request("POST", "/search", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            with lock:
                latencies.append(time.perf_counter() - t0)
                codes[r.status] = codes.get(r.status, 0) + 1
            n += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms), "req_s": len(ms) / wall, "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)), "codes": codes,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--compare-max", type=int, default=1_000_000)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    from setdiv.data.convert import synthetic_samples

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_sharded_"))
    work.mkdir(parents=True, exist_ok=True)
    export = make_export(work)
    texts = [c for s in synthetic_samples("test", 200, 1) for c in s.captions]
    results: dict = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "runs": []}
    for n in args.sizes:
        index = work / f"g{n}"
        print(f"gallery of {n} sets in {args.shards} shards ...", flush=True)
        built = write_shards(index, export, n, args.shards)
        run: dict = {"sets": n, "shards": args.shards, "build_s": built}
        temp = tempfile.mkdtemp(prefix="bsr", dir="/tmp")
        port = free_port()
        head = ray_start("--head", "--port", str(port), "--temp-dir", temp,
                         "--include-dashboard", "false", log=work / "head.log")  # fmt: skip
        worker = server = None
        try:
            time.sleep(3)
            worker = ray_start("--address", f"127.0.0.1:{port}", log=work / "worker.log")
            time.sleep(3)
            http_port = free_port()
            t0 = time.perf_counter()
            server = serve(index, http_port, work / f"serve_ray_{n}.log", "--ray", "--address",
                           f"127.0.0.1:{port}")  # fmt: skip
            run["ray_ready_s"] = time.perf_counter() - t0
            run["ray"] = load(http_port, texts, args.clients, args.seconds)
            run["ray"]["replica_peak_rss_mb"] = [peak_rss_mb(p) for p in replica_pids()]
            run["ray"]["router_peak_rss_mb"] = peak_rss_mb(server.pid)
            print(f"  ray serve: {run['ray']}", flush=True)
        finally:
            for p in (server, worker, head):
                stop(p)
            shutil.rmtree(temp, ignore_errors=True)
        if n <= args.compare_max:
            http_port = free_port()
            server = serve(index, http_port, work / f"serve_one_{n}.log")
            try:
                run["single"] = load(http_port, texts, args.clients, args.seconds)
                run["single"]["peak_rss_mb"] = peak_rss_mb(server.pid)
                print(f"  single process: {run['single']}", flush=True)
            finally:
                stop(server)
        results["runs"].append(run)
        shutil.rmtree(index, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
