"""Loss terms against naive loops straight from docs/method.md §4."""

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
    infonce_loss,
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
    negatives = "hardest" if hardest else "mean"
    got = triplet_loss(S, positive_mask(4, 20), margin=0.2, negatives=negatives)
    i2t, t2i = naive_triplet(S.numpy(), 0.2, hardest)
    assert got["i2t_loss"].item() == pytest.approx(i2t, abs=1e-12)
    assert got["t2i_loss"].item() == pytest.approx(t2i, abs=1e-12)


def test_triplet_hand_worked_case() -> None:
    # 2 images x 2 captions each; image 0's hardest negative caption scores 0.5.
    S = torch.tensor([[0.9, 0.4, 0.5, 0.1], [0.2, 0.3, 0.8, 0.7]], dtype=torch.float64)
    got = triplet_loss(S, positive_mask(2, 4), margin=0.2, negatives="hardest", reduction="sum")
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
    cfg = LossConfig(margin=0.2, negatives="hardest", mmd_weight=0.5, div_weight=0.25)
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
        LossConfig(negatives="hardest", mean_negative_epochs=2, mmd_weight=0, div_weight=0),
        similarity.chamfer,
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


# --- selective negatives and InfoNCE (docs/objectives.md) --------------------------------------


def naive_selective(S: np.ndarray, margin: float) -> tuple[float, float]:
    """Per (query, positive): the hardest negative's hinge when the positive beats it, else
    the mean hinge over all negatives."""
    N, M = S.shape
    per = M // N

    def one(pos: float, negs: list[float]) -> float:
        hinges = [max(0.0, margin + n - pos) for n in negs]
        return max(hinges) if pos > max(negs) else sum(hinges) / len(hinges)

    i2t = [
        one(S[i, c], [S[i, n] for n in range(M) if n // per != i])
        for i in range(N)
        for c in range(i * per, (i + 1) * per)
    ]
    t2i = [one(S[c // per, c], [S[j, c] for j in range(N) if j != c // per]) for c in range(M)]
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_selective_negatives_match_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(3)
    S = torch.rand(5, 15, generator=g, dtype=torch.float64) * 2 - 1
    S[torch.arange(5), torch.arange(5) * 3] += 1.5  # some positives win, some do not
    got = triplet_loss(S, positive_mask(5, 15), margin=0.2, negatives="selective")
    i2t, t2i = naive_selective(S.numpy(), 0.2)
    assert got["i2t_loss"].item() == pytest.approx(i2t, abs=1e-12)
    assert got["t2i_loss"].item() == pytest.approx(t2i, abs=1e-12)
    # the two extremes: every positive wins -> hardest; none does -> mean
    for shift, like in ((5.0, "hardest"), (-5.0, "mean")):
        T = S + shift * positive_mask(5, 15)
        sel = triplet_loss(T, positive_mask(5, 15), 0.2, "selective")
        ref = triplet_loss(T, positive_mask(5, 15), 0.2, like)
        assert sel["i2t_loss"].item() == pytest.approx(ref["i2t_loss"].item(), abs=1e-12)


@pytest.mark.parametrize("negatives", ["selective", "hardest", "mean"])
def test_robust_triplet_weighs_each_hinge_by_the_share_of_negatives_below_its_positive(
    negatives: str,
) -> None:
    g = torch.Generator().manual_seed(5)
    S = torch.rand(4, 12, generator=g, dtype=torch.float64) * 2 - 1
    pos = positive_mask(4, 12)
    per, q = 3, 0.5
    i2t, t2i = [], []
    for i in range(4):  # naive: hinge of each pair (as above) x (share below the positive)^q
        negs = [S[i, n].item() for n in range(12) if n // per != i]
        for c in range(i * per, (i + 1) * per):
            one = triplet_loss(S[i : i + 1, [c, *[n for n in range(12) if n // per != i]]],
                               torch.tensor([[True] + [False] * 9]), 0.2, negatives)  # fmt: skip
            share = sum(n < S[i, c].item() for n in negs) / len(negs)
            i2t.append(one["i2t_loss"].item() * share**q)
    for c in range(12):
        negs = [S[j, c].item() for j in range(4) if j != c // per]
        col = S[[c // per, *[j for j in range(4) if j != c // per]], c : c + 1]
        one = triplet_loss(col.T, torch.tensor([[True, False, False, False]]), 0.2, negatives)
        share = sum(n < S[c // per, c].item() for n in negs) / len(negs)
        t2i.append(one["i2t_loss"].item() * share**q)
    got = triplet_loss(S, pos, 0.2, negatives, robust_q=q)
    assert got["i2t_loss"].item() == pytest.approx(np.mean(i2t), abs=1e-12)
    assert got["t2i_loss"].item() == pytest.approx(np.mean(t2i), abs=1e-12)


def test_at_a_constant_matrix_selective_pushes_apart_as_mean_negatives_do() -> None:
    """The collapse optimum of the hardest negative (every score alike) is no resting point
    for selective negatives: its gradient there is the mean negatives' (positives up, every
    negative down a little), not one negative's."""
    pos = positive_mask(4, 8)
    noise = 1e-3 * torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for negatives in ("selective", "mean", "hardest"):
        # a nearly collapsed matrix whose positives lose narrowly (the collapse's basin)
        S = (0.7 + noise - 0.01 * pos).requires_grad_()
        sum(triplet_loss(S, pos, 0.2, negatives).values()).backward()
        grads[negatives] = S.grad
    torch.testing.assert_close(grads["selective"], grads["mean"])
    assert (grads["mean"][~pos] > 0).all()  # every negative pushed down
    assert (grads["hardest"][~pos] != 0).sum() < (~pos).sum() / 2  # hardest: a few


def naive_infonce(S: np.ndarray, tau: float, beta: float, q: float = 0.0) -> tuple[float, float]:
    """Straight from the formula: each (query, positive) against the query's negatives (an
    image's other captions are neither), HN-NCE weights w = |neg| e^{b l} / sum e^{b l}; with
    q > 0 the positive's probability p enters as (1 - p^q) / q instead of -log p."""
    N, M = S.shape
    per = M // N

    def one(pos: float, negs: list[float]) -> float:
        lp, ln = pos / tau, [n / tau for n in negs]
        z = sum(math.exp(beta * x) for x in ln)
        w = [len(ln) * math.exp(beta * x) / z for x in ln]
        z = math.exp(lp) + sum(wi * math.exp(x) for wi, x in zip(w, ln, strict=True))
        p = math.exp(lp) / z
        return -math.log(p) if q == 0 else (1 - p**q) / q

    i2t = [
        one(S[i, c], [S[i, n] for n in range(M) if n // per != i])
        for i in range(N)
        for c in range(i * per, (i + 1) * per)
    ]
    t2i = [one(S[c // per, c], [S[j, c] for j in range(N) if j != c // per]) for c in range(M)]
    return float(np.mean(i2t)), float(np.mean(t2i))


@pytest.mark.parametrize(
    ("per", "beta", "q"),
    [(5, 0.0, 0.0), (5, 0.5, 0.0), (1, 0.0, 0.0), (1, 1.0, 0.0), (5, 0.0, 0.5), (1, 0.5, 1.0)],
)
def test_infonce_matches_a_naive_loop(per: int, beta: float, q: float) -> None:
    g = torch.Generator().manual_seed(per)
    S = torch.rand(4, 4 * per, generator=g, dtype=torch.float64) * 2 - 1
    got = infonce_loss(S, positive_mask(4, 4 * per), temperature=0.1, beta=beta, robust_q=q)
    i2t, t2i = naive_infonce(S.numpy(), 0.1, beta, q)
    assert got["i2t_loss"].item() == pytest.approx(i2t, abs=1e-10)
    assert got["t2i_loss"].item() == pytest.approx(t2i, abs=1e-10)


def test_infonce_hand_worked_case() -> None:
    # 2 images x 1 caption, temperature 1: i2t row 0 = -log(e^1 / (e^1 + e^0)), etc.
    S = torch.tensor([[1.0, 0.0], [0.5, 0.2]], dtype=torch.float64)
    got = infonce_loss(S, positive_mask(2, 2), temperature=1.0)
    i2t = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5 - 0.2))) / 2
    t2i = (math.log(1 + math.exp(0.5 - 1.0)) + math.log(1 + math.exp(0.0 - 0.2))) / 2
    assert got["i2t_loss"].item() == pytest.approx(i2t, abs=1e-12)
    assert got["t2i_loss"].item() == pytest.approx(t2i, abs=1e-12)


def test_infonce_loss_module_learns_a_clamped_temperature() -> None:
    img, txt = _sets(4, 2, 8), _sets(20, 2, 8)
    cfg = LossConfig(name="infonce", temperature=0.1, max_logit_scale=20.0, mmd_weight=0,
                     div_weight=0)  # fmt: skip
    loss = build_loss(cfg, similarity.smooth_chamfer)
    params = dict(loss.named_parameters())
    assert list(params) == ["log_scale"]
    terms = loss(img, txt)
    S = similarity.smooth_chamfer(img.embeds, txt.embeds).detach().double().numpy()
    i2t, t2i = naive_infonce(S, 0.1, 0.0)
    assert terms["i2t_loss"].item() == pytest.approx(i2t, rel=1e-5)
    assert loss.last_temperature == pytest.approx(0.1, rel=1e-6)
    sum(terms.values()).backward()
    assert params["log_scale"].grad is not None and params["log_scale"].grad.abs().item() > 0
    with torch.no_grad():  # past the clamp (scale 20): the temperature stays at 1/20, no grad
        params["log_scale"].fill_(math.log(50.0))
    params["log_scale"].grad = None
    sum(loss(img, txt).values()).backward()
    assert loss.last_temperature == pytest.approx(1 / 20, rel=1e-6)
    assert params["log_scale"].grad.abs().item() == 0.0
    fixed = build_loss(LossConfig(name="infonce", learn_temperature=False), similarity.chamfer)
    assert not list(fixed.parameters()) and "log_scale" in dict(fixed.named_buffers())


def test_all_negatives_fallback_and_warm_up() -> None:
    img, txt = _sets(4, 2, 8), _sets(20, 2, 8)
    S = similarity.chamfer(img.embeds, txt.embeds).detach().double()
    pos = positive_mask(4, 20)
    sel = build_loss(LossConfig(mmd_weight=0, div_weight=0), similarity.chamfer)
    mean = triplet_loss(S, pos, 0.2, "mean")["i2t_loss"].item()
    assert sel(img, txt, all_negatives=True)["i2t_loss"].item() == pytest.approx(mean, rel=1e-6)
    assert sel.can_fall_back(0) and sel.negatives(0) == "selective"
    hn = LossConfig(name="infonce", hn_beta=0.5, mean_negative_epochs=1, mmd_weight=0, div_weight=0)
    nce = build_loss(hn, similarity.chamfer)
    plain = infonce_loss(S, pos, 0.07)["i2t_loss"].item()
    weighted = infonce_loss(S, pos, 0.07, beta=0.5)["i2t_loss"].item()
    assert nce(img, txt, epoch=0)["i2t_loss"].item() == pytest.approx(plain, rel=1e-5)  # warm-up
    assert nce(img, txt, epoch=1)["i2t_loss"].item() == pytest.approx(weighted, rel=1e-5)
    got = nce(img, txt, epoch=1, all_negatives=True)["i2t_loss"].item()
    assert got == pytest.approx(plain, rel=1e-5)
    assert nce.can_fall_back(1) and not nce.can_fall_back(0)
    assert not build_loss(LossConfig(name="infonce"), similarity.chamfer).can_fall_back(3)
    assert not build_loss(LossConfig(negatives="mean"), similarity.chamfer).can_fall_back(3)
