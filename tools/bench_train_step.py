"""Training throughput of one recipe, split into forward, loss, backward and optimizer step.

`--recipe roi_bigru` (default), the paper size: 200 images x 36 BUTD regions (2048-d), 1000
captions, K = L = 4, T = 4, D = 1024, smooth-Chamfer + triplet + MMD + diversity, AdamW. Data:
the training reader (2 workers) on BUTD-sized shards it writes to a temp dir (CPU only).

`--recipe vit_setheads`: configs/vit_setheads.yaml, K=4 set heads over a frozen open_clip
ViT-B/16 image tower and its text tower (random weights: speed does not depend on them), one
224 px image and one CLIP-tokenised caption (<= 32 tokens) per pair, the towers frozen as
the recipe freezes them.

Both compare setdiv's block-wise log-sum-exp smooth-Chamfer + loss with the official
formulation (whole element matrix, raw exp / sum / log) measured in the same run.

    python tools/bench_train_step.py [--recipe vit_setheads] [--reps 3] [--images 200] \
        [--device cuda --precision bf16]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from setdiv import config as config_lib
from setdiv.data.reader import SampleOptions, TrainReader
from setdiv.data.text import build_tokenizer
from setdiv.data.vocab import Vocab
from setdiv.losses import build_loss
from setdiv.model import build_model
from setdiv.model.set_modules import SetOutput
from setdiv.similarity import build_similarity
from setdiv.train.optim import build_optimizer, group_parameters

sys.path.insert(0, str(Path(__file__).parent))
from bench_reader import write_region_shards  # noqa: E402


def official_smooth_chamfer(x: torch.Tensor, y: torch.Tensor, alpha: float = 16.0) -> torch.Tensor:
    """The official evaluation/training formulation: one (N*K, M*L) matrix, raw exp/sum/log."""
    N, K, D = x.shape
    M, L, _ = y.shape
    e = torch.exp(alpha * (x.reshape(-1, D) @ y.reshape(-1, D).T)).view(N, K, M, L)
    t1 = torch.log(e.sum(dim=3)).sum(dim=1) / (alpha * K)
    t2 = torch.log(e.sum(dim=1)).sum(dim=2) / (alpha * L)
    return (t1 + t2) / 2


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_batch(n_images: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    regions = torch.randn(n_images, 36, 2048, generator=gen)
    lengths = torch.randint(10, 19, (5 * n_images,), generator=gen)  # COCO: ~12 words + start/end
    ids = torch.randint(5, vocab, (5 * n_images, int(lengths.max())), generator=gen)
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    return regions, ids.masked_fill(~mask, 0), mask


def clip_captions(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 32) CLIP-style ids (start, 8-30 words, end-of-text, padding) and their mask."""
    lengths = torch.randint(10, 33, (n,), generator=gen)
    ids = torch.randint(1, 49406, (n, int(lengths.max())), generator=gen)
    ids[:, 0] = 49406  # <start_of_text>
    ids[torch.arange(n), lengths - 1] = 49407  # <end_of_text>
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask


def data_seconds_per_batch(n_images: int, reps: int) -> float:
    """Seconds per batch of the training reader (2 workers) on BUTD-sized region shards."""
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_region_shards(Path(tmp), n_images * (reps + 2))
        vocab = Vocab.build(["a man riding a horse on a beach number"])
        tok = build_tokenizer(config_lib.TextEncoderConfig(), vocab)
        opts = SampleOptions("regions", tok, True, region_dropout=0.2, word_dropout=0.2)
        reader = TrainReader(pattern, opts, n_images, num_workers=2, shuffle_buffer=200)
        it = reader.epoch(0)
        next(it)  # workers started, first batch ready
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        return (time.perf_counter() - t0) / max(n, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("roi_bigru", "vit_setheads"), default="roi_bigru")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = args.images
    if args.recipe == "roi_bigru":
        cfg = config_lib.load(
            ["configs/roi_bigru.yaml"],
            [
                "model.text.vocab_path=null",
                "model.text.vocab_size=11354",
                "model.text.glove_path=null",
            ],
        )
        model = build_model(cfg.model).to(device, dtype).train()
        regions, ids, mask = (t.to(device) for t in make_batch(n, 11354, gen))
        images = regions.to(dtype)
        shape = f"{n} images x 36 regions, {5 * n} captions (<= {ids.shape[1]} tokens)"
    else:
        logging.getLogger("setdiv").setLevel(logging.ERROR)  # (random towers: no warning)
        cfg = config_lib.load(["configs/vit_setheads.yaml"], [])
        model = build_model(cfg.model).to(device, dtype).train()
        groups = group_parameters(model)
        for name in cfg.optim.freeze_groups:  # the recipe's frozen towers
            for p in groups[name]:
                p.requires_grad_(False)
        images = torch.randn(n, 3, 224, 224, generator=gen).to(device, dtype)
        ids, mask = clip_captions(n, gen)
        ids, mask = ids.to(device), mask.to(device)
        shape = f"{n} images 224 px, {n} captions (<= {ids.shape[1]} CLIP tokens)"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = build_optimizer(model, cfg.optim)
    loss_fn = build_loss(cfg.loss, build_similarity(cfg.similarity))
    official_loss = build_loss(cfg.loss, official_smooth_chamfer)

    def forward() -> tuple[SetOutput, SetOutput]:
        return model(images, None, ids, mask)

    holder: dict[str, object] = {}

    def loss_only() -> None:
        holder["terms"] = loss_fn(*holder["sets"])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sum(loss_fn(*forward()).values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()

    def fwd_loss_bwd() -> None:
        optimizer.zero_grad(set_to_none=True)
        sum(loss_fn(*forward()).values()).backward()

    t_step = timed(step, args.reps, device)
    t_fb = timed(fwd_loss_bwd, args.reps, device)
    t_fwd = timed(lambda: holder.update(sets=forward()), args.reps, device)
    t_loss = timed(loss_only, args.reps, device)
    t_bwd = t_fb - t_fwd - t_loss
    t_opt = t_step - t_fb

    with torch.no_grad():
        img, txt = forward()

    def leaf(s: SetOutput) -> SetOutput:
        return SetOutput(
            s.embeds.detach().clone().requires_grad_(), s.slots.detach().clone().requires_grad_()
        )

    def sim_loss(loss: Callable[..., dict[str, torch.Tensor]]) -> Callable[[], None]:
        return lambda: sum(loss(leaf(img), leaf(txt)).values()).backward()

    t_sl = timed(sim_loss(loss_fn), args.reps, device)
    t_sl_official = timed(sim_loss(official_loss), args.reps, device)
    t_data = (
        data_seconds_per_batch(n, args.reps)
        if device.type == "cpu" and args.recipe == "roi_bigru"
        else float("nan")
    )
    K, L = cfg.model.image_set.num_embeds, cfg.model.text_set.num_embeds
    print(
        f"device {device} ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.precision}"
    )
    print(
        f"recipe {args.recipe}, batch: {shape}, K={K} L={L}, D={cfg.model.embed_dim}; "
        f"parameters: {trainable / 1e6:.1f}M trained, {frozen / 1e6:.1f}M frozen"
    )
    print(f"training step (fwd+loss+bwd+AdamW)  {t_step:8.3f} s   {n / t_step:8.1f} images/s")
    for name, t in (
        ("forward", t_fwd),
        ("loss (similarity + terms)", t_loss),
        ("backward", t_bwd),
        ("optimizer (clip + AdamW)", t_opt),
    ):
        print(f"  {name:<32}{t:8.3f} s   {100 * t / t_step:5.1f}%")
    if t_data == t_data:  # (measured: CPU, roi_bigru)
        print(
            f"data: reader, 2 workers, per batch  {t_data:8.3f} s   "
            f"({n / t_data:.0f} images/s; overlaps compute)"
        )
    print(
        f"similarity+loss fwd+bwd: setdiv {t_sl:.3f} s, official {t_sl_official:.3f} s, "
        f"setdiv/official = {t_sl / t_sl_official:.2f}x"
    )


if __name__ == "__main__":
    main()
