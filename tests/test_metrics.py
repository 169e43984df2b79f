"""Retrieval metrics against a naive sort-based reference with planted positives."""

from __future__ import annotations

import numpy as np
import pytest

from setdiv.eval.metrics import coco_1k, i2t_ranks, recall_at_k, t2i_ranks


def naive_metrics(S: np.ndarray, per: int = 5) -> dict[str, float]:
    """Reference: full stable descending sorts, exactly as docs/method.md §6 words it (image-major,
    `per` captions each)."""
    return naive_owned(S, [c // per for c in range(S.shape[1])])


def planted(N: int, seed: int, strength: float = 1.5, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((N, 5 * N))
    owner = np.arange(5 * N) // 5
    S[owner, np.arange(5 * N)] += strength * rng.random(5 * N)
    if ties:
        S = np.round(S, 1)  # many exact ties
    return S.astype(np.float32)


@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_naive_reference(ties: bool) -> None:
    S = planted(60, 0, ties=ties)
    got, ref = recall_at_k(S), naive_metrics(S)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key
    assert got["rsum"] == pytest.approx(
        sum(got[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    )


def test_hand_worked_case_and_tie_rule() -> None:
    # 2 images x 5 captions. Image 0 ties its best caption with a caption of image 1 at a lower
    # index? No: caption 7 ties caption 2 and comes later, so caption 2 wins the tie.
    S = np.zeros((2, 10), dtype=np.float32)
    S[0, 2] = S[0, 7] = 1.0
    S[1, :] = -1.0
    S[1, 9] = 0.5
    assert i2t_ranks(S).tolist() == [0, 0]
    # t2i: caption 7's column is [1, -1] so image 0 (wrong) ranks first: rank 1.
    # Constant columns (0 vs -1 or -1 vs -1) favour the earlier image on ties.
    ranks = t2i_ranks(S)
    assert ranks[7] == 1 and ranks[2] == 0 and ranks[9] == 0 and ranks[5] == 1
    assert recall_at_k(np.zeros((3, 15), dtype=np.float32))["i2t_r1"] == pytest.approx(100 / 3)


def test_5k_and_1k_protocols_match_reference() -> None:
    S = planted(5000, 1, strength=4.0)
    got = recall_at_k(S)
    i2t, t2i = i2t_ranks(S), t2i_ranks(S)
    rng = np.random.default_rng(5)
    rows = rng.choice(5000, 300, replace=False)
    order = np.argsort(-S[rows], axis=1, kind="stable")  # ties by index
    for q, i in enumerate(rows):
        where = np.flatnonzero(np.isin(order[q], np.arange(5 * i, 5 * i + 5)))
        assert i2t[i] == where.min()
    cols = rng.choice(25000, 300, replace=False)
    order = np.argsort(-S[:, cols].T, axis=1, kind="stable")
    for q, c in enumerate(cols):
        assert t2i[c] == np.flatnonzero(order[q] == c // 5)[0]
    assert got["i2t_r1"] == pytest.approx(100 * np.mean(i2t < 1))
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100
    one_k = coco_1k(S)
    folds = [recall_at_k(S[f * 1000 : (f + 1) * 1000, f * 5000 : (f + 1) * 5000]) for f in range(5)]
    for key in folds[0]:
        assert one_k[key] == pytest.approx(np.mean([f[key] for f in folds]), rel=1e-6), key
    assert one_k["i2t_r1"] > got["i2t_r1"]  # 1K is the easier protocol


def test_coco_1k_averages_folds() -> None:
    S = planted(50, 3)
    folds = [naive_metrics(S[f * 10 : (f + 1) * 10, f * 50 : (f + 1) * 50]) for f in range(5)]
    got = coco_1k(S)
    for key in folds[0]:
        assert got[key] == pytest.approx(np.mean([f[key] for f in folds])), key
    with pytest.raises(ValueError, match="folds"):
        coco_1k(planted(12, 0))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="N x 5N"):
        recall_at_k(np.zeros((3, 14), dtype=np.float32))


def test_nan_scores_rank_below_every_finite_score() -> None:
    """A diverged model's NaN matrix used to rank every target first (RSUM 600)."""
    nan = np.full((20, 100), np.nan, dtype=np.float32)
    # All ties, broken by index: i2t finds image 0 (R@1, R@5: 5%) and 0-1 (R@10: 10%); t2i
    # ranks caption c's image at c // 5 (R@1 5%, R@5 25%, R@10 50%): 100, not 600.
    assert recall_at_k(nan)["rsum"] == pytest.approx(100.0)
    perfect = np.full((20, 100), -1.0, dtype=np.float32)
    for i in range(20):
        perfect[i, 5 * i : 5 * i + 5] = 1.0
    assert recall_at_k(perfect)["rsum"] == 600
    broken = perfect.copy()
    broken[3, :] = np.nan  # image 3 diverged: all its scores NaN
    broken[:, 50] = np.inf  # caption 50 (image 10's) blew up too
    ranks = i2t_ranks(broken)
    assert ranks[3] == 5 * 3  # a row of NaN: all tied at the bottom, index order
    assert t2i_ranks(broken)[15] == 19  # caption 15 (image 3): its own score is now the worst
    assert t2i_ranks(broken)[50] == 10  # all of its column is -inf: ties by image index
    assert recall_at_k(broken)["rsum"] < 600


def naive_owned(S: np.ndarray, owners: list[int]) -> dict[str, float]:
    """Reference for any caption layout: per image, the best sorted position among the
    captions it owns; per caption, the sorted position of its owner (stable sorts)."""
    N, M = S.shape
    i2t, t2i = [], []
    for i in range(N):
        order = sorted(range(M), key=lambda j: (-S[i, j], j))
        i2t.append(min(order.index(c) for c in range(M) if owners[c] == i))
    for c in range(M):
        order = sorted(range(N), key=lambda j: (-S[j, c], j))
        t2i.append(order.index(owners[c]))
    out = {}
    for name, r in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100 * np.mean(r < k)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    return out


@pytest.mark.parametrize("layout", ["one", "variable", "shuffled"])
@pytest.mark.parametrize("ties", [False, True])
def test_any_number_of_captions_per_image_matches_naive(layout: str, ties: bool) -> None:
    """Web data (one caption per image), a variable count (1-7) and captions in no particular
    order, each against the naive reference; the image-major 5-caption layout through
    `owners` equals the default path."""
    rng = np.random.default_rng(3)
    N = 40
    counts = np.ones(N, int) if layout == "one" else rng.integers(1, 8, N)
    owners = np.repeat(np.arange(N), counts)
    if layout == "shuffled":
        owners = rng.permutation(owners)
    S = rng.standard_normal((N, len(owners)))
    S[owners, np.arange(len(owners))] += 1.5 * rng.random(len(owners))
    if ties:
        S = np.round(S, 1)
    S = S.astype(np.float32)
    got, ref = recall_at_k(S, owners=owners), naive_owned(S, owners.tolist())
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), (key, layout)
    five = planted(30, 1, ties=ties)
    assert recall_at_k(five, owners=np.arange(150) // 5) == recall_at_k(five)


def test_owner_errors() -> None:
    S = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="3 caption owners for 4"):
        recall_at_k(S, owners=[0, 1, 2])
    with pytest.raises(ValueError, match=r"images without a caption \(e.g. \[2\]\)"):
        recall_at_k(S, owners=[0, 1, 1, 0])
    with pytest.raises(ValueError, match="image indices"):
        recall_at_k(S, owners=[0, 1, 2, 3])
