"""The triplet ranking loss (VSE++ / the official DivE objective, docs/objectives.md) with
three choices of negative per (query, positive) pair:

    hardest    the query's hardest negative (VSE++): sharp, but from a random start or under
               noisy pairs it slides into the constant-similarity optimum (every hinge = m)
    mean       the mean hinge over all the query's negatives: never collapses, less sharp
    selective  per pair, the hardest negative when the positive already outscores it, else the
               mean over all negatives (SelHN-style): the hardest negative's sharpness where it
               teaches, all negatives where it would pull towards the collapse

Shape legend: Q queries, C candidates, P (query, positive) pairs, N images, M captions.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

__all__ = ["NEGATIVES", "triplet_loss", "triplet_terms"]

Negatives = Literal["hardest", "mean", "selective"]
NEGATIVES: tuple[str, ...] = ("hardest", "mean", "selective")
"""The negatives a triplet hinge may use (`loss.negatives`)."""


def _row_hinges(
    sims_QC: Tensor, pos_QC: Tensor, margin: float, negatives: str, robust_q: float = 0.0
) -> Tensor:
    """Hinge per (query, positive) pair -> (P,), against the negatives `negatives` names;
    `robust_q` > 0 weighs each by `_confidence`."""
    q_idx, c_idx = pos_QC.nonzero(as_tuple=True)
    pos_sims_P = sims_QC[q_idx, c_idx]
    hinges_P = _hinges(sims_QC, pos_QC, q_idx, pos_sims_P, margin, negatives)
    if robust_q:
        hinges_P = hinges_P * _confidence(sims_QC, pos_QC, q_idx, pos_sims_P, robust_q)
    return hinges_P


def _hinges(
    sims_QC: Tensor, pos_QC: Tensor, q_idx: Tensor, pos_sims_P: Tensor, margin: float,
    negatives: str,
) -> Tensor:  # fmt: skip
    hardest_P = None
    if negatives != "mean":
        hardest_Q = sims_QC.masked_fill(pos_QC, float("-inf")).amax(dim=1)
        hardest_P = (margin + hardest_Q[q_idx] - pos_sims_P).clamp_min(0)
        if negatives == "hardest":
            return hardest_P
    hinge_PC = (margin + sims_QC[q_idx] - pos_sims_P[:, None]).clamp_min(0)
    neg_PC = ~pos_QC[q_idx]
    mean_P = (hinge_PC * neg_PC).sum(dim=1) / neg_PC.sum(dim=1).clamp_min(1)
    if hardest_P is None:
        return mean_P
    # selective: the positive already wins against its hardest negative (a decision, not a
    # function to differentiate: the comparison carries no gradient)
    wins_P = (pos_sims_P > hardest_Q[q_idx]).detach()
    return hardest_P.where(wins_P, mean_P)


def _confidence(
    sims_QC: Tensor, pos_QC: Tensor, q_idx: Tensor, pos_sims_P: Tensor, q: float
) -> Tensor:
    """(P,) detached weights (share of the query's negatives that score below the positive)^q:
    a pair ranked above most of its negatives keeps its pull, one the model ranks among the
    last (a likely wrong pair, a noisy caption) pulls less. At a random start every pair sits
    mid-ranking, so all weigh alike."""
    neg_PC = ~pos_QC[q_idx]
    below_PC = (sims_QC[q_idx] < pos_sims_P[:, None]) & neg_PC
    dtype = sims_QC.dtype
    share_P = below_PC.sum(dim=1).to(dtype) / neg_PC.sum(dim=1).clamp_min(1).to(dtype)
    return share_P.pow(q).detach()


def triplet_terms(
    rows_nM: Tensor,
    pos_nM: Tensor,
    cols_Nm: Tensor,
    pos_Nm: Tensor,
    margin: float,
    negatives: str,
    reduction: str,
    num_pairs: int,
    robust_q: float = 0.0,
) -> dict[str, Tensor]:
    """A share of the triplet loss: i2t over the image rows (n,M) against all captions, t2i
    over the caption columns (N,m) against all images. `mean` divides by `num_pairs`, the
    positive pairs of the whole (N,M) batch, so the shares sum to the whole loss."""
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    i2t = _row_hinges(rows_nM, pos_nM, margin, negatives, robust_q).sum()
    t2i = _row_hinges(cols_Nm.T, pos_Nm.T, margin, negatives, robust_q).sum()
    if reduction == "mean":
        i2t, t2i = i2t / num_pairs, t2i / num_pairs
    return {"i2t_loss": i2t, "t2i_loss": t2i}


def triplet_loss(
    sims_NM: Tensor,
    pos_NM: Tensor,
    margin: float,
    negatives: str = "hardest",
    reduction: str = "mean",
    robust_q: float = 0.0,
) -> dict[str, Tensor]:
    """The triplet loss of a whole (N,M) similarity matrix with an (N,M) positive mask.

    i2t: every (image, positive caption) pair against the image's negative captions; t2i:
    every caption against its negative images; `negatives` as the module docstring.
    """
    n = int(pos_NM.sum())
    return triplet_terms(
        sims_NM, pos_NM, sims_NM, pos_NM, margin, negatives, reduction, n, robust_q
    )
