"""Training throughput of one recipe, split into forward, loss, backward and optimizer step.

`--recipe roi_bigru` (default), the paper size: 200 images x 36 BUTD regions (2048-d), 1000
captions, K = L = 4, T = 4, D = 1024, smooth-Chamfer + triplet + MMD + diversity, AdamW. Data:
the training reader (2 workers) on BUTD-sized shards it writes to a temp dir (CPU only).

`--recipe vit_setheads`: configs/vit_setheads.yaml, K=4 set heads over a frozen open_clip
ViT-B/16 image tower and its text tower (random weights: speed does not depend on them), one
224 px image and one CLIP-tokenised caption (<= 32 tokens) per pair, the towers frozen as
the recipe freezes them.

`--recipe resnext_bert`: configs/resnext_bert.yaml after its frozen first epoch: the
ResNeXt-101 32x8d grid tower on 512 px images (BatchNorm frozen, as the recipe) and a
BERT-base text tower (random weights), 5 captions (<= 24 BERT tokens) per image.

Every recipe compares setdiv's smooth-Chamfer + loss with the official formulation (whole
element matrix, raw exp / sum / log) measured in the same run; on CUDA both of setdiv's
kernels (the fused Triton one and the torch one, docs/kernels.md).

Model FLOPs per step are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode`
over one forward + loss + backward (with the torch similarity kernel, whose GEMMs the counter
sees; the fused kernel does the same GEMMs; a grouped convolution's backward with a corrected
formula, `_conv_backward_flops`). On CUDA the achieved FLOP/s of the whole step
(optimizer included) is reported as a share of the device's peak dense bf16 / fp32 tensor
FLOP/s (MFU); `--peak-tflops` gives the peak of a device not in `PEAK_TFLOPS`.

    python tools/bench_train_step.py [--recipe vit_setheads|resnext_bert] [--reps 3] \
        [--images 200] [--device cuda --precision bf16] [--peak-tflops 989] [--flops-only]
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
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

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

PEAK_TFLOPS = {
    # device name substring -> (dense bf16 tensor, dense tf32 tensor) TFLOP/s, vendor figures
    "H200": (989.4, 494.7),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.4, 494.7),
    "A100": (312.0, 156.0),
    "L40S": (362.1, 183.0),
    "L4": (121.0, 60.0),
}
"""Peak FLOP/s for the MFU: bf16 steps against the bf16 figure, fp32 ones against TF32's."""


def peak_flops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if precision == "bf16" else tf32) * 1e12
    return None


def _conv_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,  # noqa: ANN001
    _output_padding, _groups, output_mask, out_shape=None,  # noqa: ANN001
) -> int:  # fmt: skip
    """FLOPs of a convolution's backward: one forward's worth per gradient asked for.

    torch 2.14's own formula counts a grouped convolution's input gradient as if the
    convolution were dense (ResNeXt's 32 groups: 33x its forward instead of 2x); the
    forward count (`conv_flop_count`, which reads the grouped weight shape) is right.
    """
    fwd = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flops}


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
    parser.add_argument(
        "--recipe", choices=("roi_bigru", "vit_setheads", "resnext_bert"), default="roi_bigru"
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument("--flops-only", action="store_true", help="count the FLOPs, time nothing")
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
    elif args.recipe == "resnext_bert":
        logging.getLogger("setdiv").setLevel(logging.ERROR)  # (random towers: no warning)
        cfg = config_lib.load(
            ["configs/resnext_bert.yaml"], ["model.image.weights=null", "model.text.bert_path=null"]
        )
        model = build_model(cfg.model).to(device, dtype).train()
        side = cfg.data.image_size
        images = torch.randn(n, 3, side, side, generator=gen).to(device, dtype)
        lengths = torch.randint(10, 25, (5 * n,), generator=gen)  # [CLS] ~12 words [SEP]
        ids = torch.randint(1000, 30522, (5 * n, int(lengths.max())), generator=gen)
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        ids, mask = ids.masked_fill(~mask, 0).to(device), mask.to(device)
        shape = f"{n} images {side} px, {5 * n} captions (<= {ids.shape[1]} BERT tokens)"
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
    torch_loss = build_loss(cfg.loss, build_similarity(replace(cfg.similarity, kernel="torch")))
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

    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        optimizer.zero_grad(set_to_none=True)
        sum(torch_loss(*forward()).values()).backward()
    flops = counter.get_total_flops()
    if args.flops_only:
        print(f"recipe {args.recipe}, batch: {shape}")
        print(f"model FLOPs per step (counted): {flops / 1e12:.3f} TFLOP, "
              f"{flops / n / 1e9:.1f} GFLOP per image")  # fmt: skip
        return

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
    t_sl_torch = timed(sim_loss(torch_loss), args.reps, device) if device.type == "cuda" else t_sl
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
    peak = peak_flops(device, args.precision, args.peak_tflops)
    mfu = f", MFU {100 * flops / t_step / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ""
    print(
        f"model FLOPs per step (counted)      {flops / 1e12:8.3f} TFLOP   "
        f"achieved {flops / t_step / 1e12:.2f} TFLOP/s{mfu}"
    )
    if t_data == t_data:  # (measured: CPU, roi_bigru)
        print(
            f"data: reader, 2 workers, per batch  {t_data:8.3f} s   "
            f"({n / t_data:.0f} images/s; overlaps compute)"
        )
    kernel = "triton" if device.type == "cuda" and cfg.similarity.kernel != "torch" else "torch"
    print(
        f"similarity+loss fwd+bwd: setdiv ({kernel} kernel) {t_sl:.4f} s, official "
        f"{t_sl_official:.4f} s, setdiv/official = {t_sl / t_sl_official:.2f}x"
    )
    if device.type == "cuda":
        print(
            f"similarity+loss fwd+bwd, torch kernel: {t_sl_torch:.4f} s, "
            f"{t_sl_torch / t_sl_official:.2f}x the official formulation"
        )


if __name__ == "__main__":
    main()
