"""Loss terms against naive loops straight from SPEC §4."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from setdiv import similarity
from setdiv.config import LossConfig
from setdiv.losses import (
    build_loss,
    diversity_loss,
    mmd_loss,
    positive_mask,
    similarity_moments,
    similarity_spread,
    triplet_loss,
)
from setdiv.model.set_modules import SetOutput


def naive_triplet(S: np.ndarray, margin: float, hardest: bool) -> tuple[float, float]:
    N, M = S.shape
    per = M // N
    i2t, t2i = [], []
    for i in range(N):
        negs = [c for c in range(M) if c // per != i]
        for c in range(i * per, (i + 1) * per):
            hinges = [max(0.0, margin + S[i, n] - S[i, c]) for n in negs]
            i2t.append(max(hinges) if hardest else sum(hinges) / len(hinges))
    for c in range(M):
        own = c // per
        hinges = [max(0.0, margin + S[j, c] - S[own, c]) for j in range(N) if j != own]
        t2i.append(max(hinges) if hardest else sum(hinges) / len(hinges))
    return float(np.mean(i2t)), float(np.mean(t2i))


@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_matches_naive_loop(hardest: bool) -> None:
    S = torch.rand(4, 20, dtype=torch.float64) * 2 - 1
    got = triplet_loss(S, positive_mask(4, 20), margin=0.2, hardest=hardest)
    i2t, t2i = naive_triplet(S.numpy(), 0.2, hardest)
    assert got["i2t_loss"].item() == pytest.approx(i2t, abs=1e-12)
    assert got["t2i_loss"].item() == pytest.approx(t2i, abs=1e-12)


def test_triplet_hand_worked_case() -> None:
    # 2 images x 2 captions each; image 0's hardest negative caption scores 0.5.
    S = torch.tensor([[0.9, 0.4, 0.5, 0.1], [0.2, 0.3, 0.8, 0.7]], dtype=torch.float64)
    got = triplet_loss(S, positive_mask(2, 4), margin=0.2, hardest=True, reduction="sum")
    # i2t: img0: [0.2+0.5-0.9]+=0, [0.2+0.5-0.4]+=0.3; img1: [0.2+0.3-0.8]+=0, [0.2+0.3-0.7]+=0
    # t2i: c0 0.2+0.2-0.9<0, c1 0.2+0.3-0.4=0.1, c2 0.2+0.5-0.8<0, c3 0.2+0.1-0.7<0
    assert got["i2t_loss"].item() == pytest.approx(0.3)
    assert got["t2i_loss"].item() == pytest.approx(0.1)


def test_positive_mask_is_image_major() -> None:
    mask = positive_mask(3, 15)
    assert mask.sum() == 15 and mask[1, 5:10].all() and not mask[1, :5].any()
    with pytest.raises(ValueError, match="evenly"):
        positive_mask(3, 14)


def test_mmd_matches_naive_loop() -> None:
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)

    def kmean(a: torch.Tensor, b: torch.Tensor) -> float:
        vals = [math.exp(-0.5 * math.dist(p.tolist(), q.tolist())) for p in a for q in b]
        return sum(vals) / len(vals)

    ref = kmean(x, x) + kmean(y, y) - 2 * kmean(x, y)
    assert mmd_loss(x, y).item() == pytest.approx(ref, abs=1e-5)  # 1e-12 clamp on distance 0
    assert mmd_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)


def test_diversity_matches_naive_loop() -> None:
    slots = torch.randn(3, 4, 6, dtype=torch.float64)
    r = F.normalize(slots, dim=-1)
    ref = []
    for b in range(3):
        pairs = [
            math.exp(-2 * float((r[b, i] - r[b, j]).pow(2).sum()))
            for i in range(4)
            for j in range(i + 1, 4)
        ]
        ref.append(2 / (4 * 3) * sum(pairs))
    assert diversity_loss(slots).item() == pytest.approx(np.mean(ref), abs=1e-12)
    assert diversity_loss(torch.randn(3, 1, 6)).item() == 0.0


def _sets(n: int, k: int, d: int) -> SetOutput:
    e = F.normalize(torch.randn(n, k, d), dim=-1)
    return SetOutput(embeds=e.requires_grad_(), slots=torch.randn(n, k, d, requires_grad=True))


def test_loss_returns_weighted_named_terms() -> None:
    img, txt = _sets(4, 3, 8), _sets(20, 3, 8)
    cfg = LossConfig(margin=0.2, mmd_weight=0.5, div_weight=0.25)
    loss = build_loss(cfg, similarity.smooth_chamfer)
    terms = loss(img, txt)
    assert set(terms) == {"i2t_loss", "t2i_loss", "mmd_loss", "div_loss"}
    S = similarity.smooth_chamfer(img.embeds, txt.embeds).detach().double().numpy()
    i2t, t2i = naive_triplet(S, 0.2, hardest=True)
    assert terms["i2t_loss"].item() == pytest.approx(i2t, abs=1e-6)
    assert terms["t2i_loss"].item() == pytest.approx(t2i, abs=1e-6)
    mmd = mmd_loss(img.embeds.reshape(-1, 8), txt.embeds.reshape(-1, 8))
    assert terms["mmd_loss"].item() == pytest.approx(0.5 * mmd.item(), rel=1e-6)
    div = diversity_loss(img.slots) + diversity_loss(txt.slots)
    assert terms["div_loss"].item() == pytest.approx(0.25 * div.item(), rel=1e-6)
    sum(terms.values()).backward()
    assert torch.isfinite(img.embeds.grad).all() and torch.isfinite(txt.slots.grad).all()
    # the loss keeps the batch's similarity moments for the trainer's `sim_std`
    assert similarity_spread(loss.sim_moments) == pytest.approx(S.std(), rel=1e-5)


def test_mean_negative_warmup_switches_to_hardest() -> None:
    img, txt = _sets(4, 2, 8), _sets(20, 2, 8)
    loss = build_loss(
        LossConfig(mean_negative_epochs=2, mmd_weight=0, div_weight=0), similarity.chamfer
    )
    S = similarity.chamfer(img.embeds, txt.embeds).detach().double().numpy()
    for epoch, hardest in [(0, False), (1, False), (2, True)]:
        got = loss(img, txt, epoch=epoch)
        assert set(got) == {"i2t_loss", "t2i_loss"}
        assert got["i2t_loss"].item() == pytest.approx(naive_triplet(S, 0.2, hardest)[0], abs=1e-6)


def test_similarity_spread_of_a_collapsed_matrix_summed_over_parts() -> None:
    """A matrix whose entries differ only in the 4th decimal around 0.997 (the collapsed
    demo model's): the spread summed over uneven row blocks (ranks) is numpy's std of the
    whole, with no cancellation from the large mean."""
    rng = np.random.default_rng(0)
    S = 0.997 + 7e-4 * rng.standard_normal((12, 60))
    blocks = [S[:5], S[5:6], S[6:], S[:0]]  # uneven ranks, one empty
    total = sum(similarity_moments(torch.from_numpy(b).float()) for b in blocks)
    expected = np.asarray(S, dtype=np.float32).astype(np.float64).std()
    assert similarity_spread(total) == pytest.approx(expected, rel=1e-9)
    assert similarity_spread(similarity_moments(torch.ones(3, 3))) == 0.0
    assert similarity_spread(similarity_moments(torch.empty(0, 4))) == 0.0
    spread = np.array([[0.1, 0.9], [0.5, 0.5]])  # hand-worked: mean 0.5, squares 0.32 / 4
    assert similarity_spread(similarity_moments(torch.from_numpy(spread))) == pytest.approx(
        math.sqrt(0.08)
    )
