"""Load test of `setdiv serve` on loopback: C clients x R text queries each (POST /search,
one connection per request, the server's default settings), against the server of another
commit (default: the last one on the standard library's http.server) measured in the same run
on an index it builds itself from the same export and shards.

    python tools/bench_serve.py --export DEMO/run_k4/export --data 'DEMO/data/test-*.tar' \
        --clients 8 --requests 200 [--busy 2] [--baseline 1c4a065] [--out results.json]

Prints, per server: requests/s, p50 / p99 latency, and the status codes seen. `--busy N`
keeps N other processes spinning on the CPU while both servers are measured (a loaded
machine, as a shared host or a training job next to the service would make it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from setdiv.distributed import free_port  # noqa: E402


def captions(data: str, n: int) -> list[str]:
    """`n` caption texts of the gallery's shards (queries people would type)."""
    import glob
    import tarfile

    out: list[str] = []
    for shard in sorted(glob.glob(data)):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out += json.loads(tar.extractfile(m).read())["captions"]  # type: ignore[union-attr]
                if len(out) >= n:
                    return out[:n]
    return out


def start(code: Path, index: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "setdiv.cli", "serve", str(index), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, cwd=code, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server from {code} did not start: see {log}")


def load(port: int, texts: list[str], clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    codes: Counter = Counter()
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            body = json.dumps({"text": texts[(c * per_client + r) % len(texts)], "k": 10})
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("POST", "/search", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                conn.close()
            except OSError as exc:
                status = type(exc).__name__
            with lock:
                latencies.append(time.perf_counter() - t0)
                codes[status] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "codes": {str(k): v for k, v in sorted(codes.items(), key=str)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True)
    p.add_argument("--data", required=True, help="gallery shards (image items)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="per client")
    p.add_argument("--baseline", default="1c4a065", help="commit of the server compared with")
    p.add_argument("--busy", type=int, default=0, help="CPU-bound processes running alongside")
    p.add_argument("--out", default=None, help="write the JSON results here")
    args = p.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    texts = captions(args.data, 1000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)  # fmt: skip
        try:
            for name, code in (("baseline " + args.baseline, base), ("this commit", ROOT)):
                index = Path(tmp) / f"index-{code.name}"
                subprocess.run(
                    [sys.executable, "-m", "setdiv.cli", "index", "build", args.export,
                     "--modality", "image", "--data", args.data, "--out", str(index)],
                    env={**os.environ, "PYTHONPATH": str(code)}, cwd=code, check=True,
                    capture_output=True,
                )  # fmt: skip
                port = free_port()
                proc = start(code, index, port, Path(tmp) / f"{code.name}.log")
                spin = "while True: pass"
                busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.busy)]
                try:
                    load(port, texts[:16], 2, 4)  # warm up
                    results[name] = load(port, texts, args.clients, args.requests)
                finally:
                    for b in busy:
                        b.kill()
                        b.wait()
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
                print(name, json.dumps(results[name]), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip
    old, new = results[f"baseline {args.baseline}"], results["this commit"]
    ratio = new["requests_per_s"] / old["requests_per_s"]
    print(
        f"machine: {machine}; {args.clients} clients x {args.requests} requests; "
        f"{args.busy} busy process(es) alongside"
    )
    print(f"{'server':<22}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}  codes")
    for name, r in results.items():
        print(f"{name:<22}{r['requests_per_s']:8.1f}{r['p50_ms']:9.1f}{r['p99_ms']:9.1f}  "
              f"{r['codes']}")  # fmt: skip
    print(f"requests/s: {ratio:.1f}x the baseline")
    if args.out:
        record = {"machine": machine, "busy": args.busy, "clients": args.clients, **results}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
