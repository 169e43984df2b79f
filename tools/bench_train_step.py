"""Forward+backward time of one paper-size ROI + bi-GRU training step, split by phase.

Paper size: 200 images x 36 BUTD regions (2048-d), 1000 captions, K = L = 4, T = 4, D = 1024,
smooth-Chamfer + triplet + MMD + diversity. Reports the share of the step spent in
similarity + loss, and compares setdiv's block-wise log-sum-exp smooth-Chamfer against the
official formulation (whole element matrix, raw exp / sum / log) measured in the same run.

    python tools/bench_train_step.py [--reps 3] [--images 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from setdiv import config as config_lib
from setdiv.losses import build_loss
from setdiv.model import build_model
from setdiv.model.set_modules import SetOutput
from setdiv.similarity import build_similarity


def official_smooth_chamfer(x: torch.Tensor, y: torch.Tensor, alpha: float = 16.0) -> torch.Tensor:
    """The official evaluation/training formulation: one (N*K, M*L) matrix, raw exp/sum/log."""
    N, K, D = x.shape
    M, L, _ = y.shape
    e = torch.exp(alpha * (x.reshape(-1, D) @ y.reshape(-1, D).T)).view(N, K, M, L)
    t1 = torch.log(e.sum(dim=3)).sum(dim=1) / (alpha * K)
    t2 = torch.log(e.sum(dim=1)).sum(dim=2) / (alpha * L)
    return (t1 + t2) / 2


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_batch(n_images: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    regions = torch.randn(n_images, 36, 2048, generator=gen)
    lengths = torch.randint(10, 19, (5 * n_images,), generator=gen)  # COCO: ~12 words + start/end
    ids = torch.randint(5, vocab, (5 * n_images, int(lengths.max())), generator=gen)
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    return regions, ids.masked_fill(~mask, 0), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    cfg = config_lib.load(
        ["configs/roi_bigru.yaml"],
        ["model.text.vocab_path=null", "model.text.vocab_size=11354", "model.text.glove_path=null"],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    loss_fn = build_loss(cfg.loss, build_similarity(cfg.similarity))
    regions, ids, mask = make_batch(args.images, 11354, torch.Generator().manual_seed(0))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        img, txt = model(regions, None, ids, mask)
        sum(loss_fn(img, txt).values()).backward()

    def forward() -> tuple[SetOutput, SetOutput]:
        with torch.no_grad():
            return model(regions, None, ids, mask)

    img, txt = forward()

    def leaf(s: SetOutput) -> SetOutput:
        return SetOutput(s.embeds.clone().requires_grad_(), s.slots.clone().requires_grad_())

    def sim_loss(loss: Callable[..., dict[str, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            sum(loss(leaf(img), leaf(txt)).values()).backward()

        return run

    official_loss = build_loss(cfg.loss, official_smooth_chamfer)
    t_step = timed(step, args.reps)
    t_fwd = timed(forward, args.reps)
    t_loss = timed(sim_loss(loss_fn), args.reps)
    t_loss_official = timed(sim_loss(official_loss), args.reps)

    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"batch: {args.images} images x 36 regions, {5 * args.images} captions "
        f"(<= {ids.shape[1]} tokens), K=L=4, T=4, D=1024, fp32"
    )
    print(f"fwd+bwd step            {t_step:8.3f} s   {args.images / t_step:7.1f} images/s")
    print(f"  forward (no grad)     {t_fwd:8.3f} s")
    print(f"  similarity+loss f+b   {t_loss:8.3f} s   share of step {100 * t_loss / t_step:5.1f}%")
    print(
        f"official sim+loss f+b   {t_loss_official:8.3f} s   "
        f"setdiv/official = {t_loss / t_loss_official:.2f}x"
    )


if __name__ == "__main__":
    main()
