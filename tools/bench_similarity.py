"""Smooth-Chamfer matrix vs the bare element matrix product, and peak extra memory.

COCO 5K shape by default: 5000 image sets x 25000 caption sets, K = L = 4, D = 1024, fp32.
The bare product is (N*K x D) @ (D x M*L), computed in row chunks into a reused buffer (its
full output alone would be 8 GB); setdiv's `smooth_chamfer` computes the (N, M) matrix block
by block, with the fused Triton kernel on CUDA (docs/kernels.md; the torch kernel is timed
too, in the same run) and the torch one elsewhere. Also times the official DivE evaluation
loop (one image set against all caption sets at a time, raw exp/sum/log) on a 1K x 5K slice.

    python tools/bench_similarity.py [--images 5000] [--device cpu|cuda] [--block-size 512]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
import torch.nn.functional as F

from setdiv.similarity import smooth_chamfer


class PeakRSS:
    """Samples this process's resident memory every 5 ms (CPU); CUDA uses the allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakRSS:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def timed(fn, device: torch.device) -> float:  # noqa: ANN001
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def official_loop(x: torch.Tensor, y: torch.Tensor, alpha: float = 16.0) -> torch.Tensor:
    """DivE eval.py's structure: per image set, all caption elements at once, raw exp."""
    M, L, D = y.shape
    out = x.new_empty(x.shape[0], M)
    y_flat = y.reshape(-1, D)
    for i in range(x.shape[0]):
        e = torch.exp(alpha * (x[i] @ y_flat.T)).view(x.shape[1], M, L)
        t1 = torch.log(e.sum(dim=2)).sum(dim=0) / (alpha * x.shape[1])
        t2 = torch.log(e.sum(dim=0)).sum(dim=1) / (alpha * L)
        out[i] = (t1 + t2) / 2
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    N, M, K, D = args.images, 5 * args.images, args.k, args.dim
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = F.normalize(torch.randn(N, K, D, generator=g), dim=-1).to(device, dtype)
    y = F.normalize(torch.randn(M, K, D, generator=g), dim=-1).to(device, dtype)
    x_flat, y_flat_T = x.reshape(-1, D), y.reshape(-1, D).T
    chunk = 2048
    buf = torch.empty(chunk, M * K, device=device, dtype=dtype)

    def bare() -> None:
        for i in range(0, N * K, chunk):
            rows = x_flat[i : i + chunk]
            torch.mm(rows, y_flat_T, out=buf[: rows.shape[0]])

    with torch.no_grad():
        bare()  # warm-up (threads, allocator)
        smooth_chamfer(x[:64], y[:640], block_size=args.block_size)
        t_bare = timed(bare, device)
        with PeakRSS(device) as mem:
            t_sc = timed(lambda: smooth_chamfer(x, y, block_size=args.block_size), device)
        out_bytes = N * M * 4
        if device.type == "cuda":  # auto = the Triton kernel: the torch one for comparison
            smooth_chamfer(x[:64], y[:640], block_size=args.block_size, kernel="torch")
            t_torch = timed(
                lambda: smooth_chamfer(x, y, block_size=args.block_size, kernel="torch"), device
            )
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    kernel = "triton" if device.type == "cuda" else "torch"
    print(f"shape: {N} x {M} sets, K=L={K}, D={D}, {args.dtype}, block_size={args.block_size}")
    print(f"bare element product ({N * K}x{D} @ {D}x{M * K}): {t_bare:8.3f} s")
    print(
        f"smooth_chamfer matrix ({N}x{M}), {kernel} kernel: {t_sc:8.3f} s   "
        f"ratio {t_sc / t_bare:.3f}x"
    )
    if device.type == "cuda":
        print(
            f"smooth_chamfer matrix ({N}x{M}), torch kernel:  {t_torch:8.3f} s   "
            f"ratio {t_torch / t_bare:.3f}x"
        )
    extra = mem.extra - out_bytes
    print(
        f"peak extra memory beyond inputs and the {out_bytes / 2**30:.2f} GiB output: "
        f"{extra / 2**30:.3f} GiB"
    )
    if not args.skip_official:
        n1 = min(1000, N)
        xs, ys = x[:n1], y[: 5 * n1]
        t_bare1 = timed(lambda: xs.reshape(-1, D) @ ys.reshape(-1, D).T, device)
        t_off = timed(lambda: official_loop(xs, ys), device)
        t_sc1 = timed(lambda: smooth_chamfer(xs, ys, block_size=args.block_size), device)
        print(
            f"at {n1}x{5 * n1}: bare {t_bare1:.2f} s | official loop {t_off:.2f} s "
            f"({t_off / t_bare1:.1f}x) | setdiv {t_sc1:.2f} s ({t_sc1 / t_bare1:.2f}x)"
        )


if __name__ == "__main__":
    main()
