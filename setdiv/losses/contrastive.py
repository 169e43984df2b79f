"""Symmetric InfoNCE over a set-similarity matrix (CLIP's objective, any registered set
similarity in place of the cosine), with optional hard-negative weighting (HN-NCE) and any
number of captions per image (docs/objectives.md).

For a query q (an image row, or a caption column) and one of its positives p, with logits
l = scale * S and the query's negatives n:

    loss(q, p) = -l_qp + log(exp(l_qp) + sum_n w_qn exp(l_qn))
    w_qn       = |neg(q)| * exp(beta l_qn) / sum_n' exp(beta l_qn')      (beta = 0: w = 1)

An image's other captions are neither its positive in that term nor its negatives: each of
COCO's 5 captions competes only with the captions of other images. i2t averages over the
(image, caption) pairs, t2i over the captions. The negative sum has the closed form
log sum_n w exp(l) = LSE((1 + beta) l) - LSE(beta l) + log |neg|, computed with log-sum-exp.

Shape legend: Q queries, C candidates, P (query, positive) pairs, N images, M captions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["infonce_loss", "infonce_terms", "robust"]


def _row_nce(logits_QC: Tensor, pos_QC: Tensor, beta: float) -> Tensor:
    """-log p(positive) per (query, positive) pair -> (P,)."""
    q_idx, c_idx = pos_QC.nonzero(as_tuple=True)
    pos_P = logits_QC[q_idx, c_idx]
    neg_QC = logits_QC.masked_fill(pos_QC, float("-inf"))
    count_Q = (~pos_QC).sum(dim=1).to(logits_QC.dtype)
    negatives_Q = torch.logsumexp((1 + beta) * neg_QC, dim=1)
    if beta:
        negatives_Q = negatives_Q - torch.logsumexp(beta * neg_QC, dim=1) + count_Q.log()
    # (a query without negatives gets LSE = -inf: its term is 0, as it should)
    return torch.logaddexp(pos_P, negatives_Q[q_idx]) - pos_P


def robust(nll_P: Tensor, q: float) -> Tensor:
    """Per-pair -log p -> the generalised cross-entropy (1 - p^q) / q (Zhang & Sabuncu 2018;
    RINCE carries the idea to contrastive losses): its gradient is p^q times InfoNCE's, so a
    pair the model cannot explain (small p: a likely wrong pair) pulls less. q = 0 is InfoNCE
    itself, q = 1 a bounded, mean-absolute-error-like loss."""
    if q == 0:
        return nll_P
    return -torch.expm1(-q * nll_P) / q


def infonce_terms(
    rows_nM: Tensor,
    pos_nM: Tensor,
    cols_Nm: Tensor,
    pos_Nm: Tensor,
    scale: Tensor,
    beta: float,
    reduction: str,
    num_pairs: int,
    robust_q: float = 0.0,
) -> dict[str, Tensor]:
    """A share of the symmetric InfoNCE loss: i2t over the image rows (n,M) against all
    captions, t2i over the caption columns (N,m) against all images; `scale` (a 0-d tensor,
    1 / temperature) multiplies the similarities. `mean` divides by `num_pairs` (the positive
    pairs of the whole batch: one per caption), so the ranks' shares sum to the whole loss.
    `robust_q` > 0: each pair's term -log p becomes (1 - p^q) / q (`robust`)."""
    i2t = robust(_row_nce(scale * rows_nM, pos_nM, beta), robust_q).sum()
    t2i = robust(_row_nce(scale * cols_Nm.T, pos_Nm.T, beta), robust_q).sum()
    if reduction == "mean":
        i2t, t2i = i2t / num_pairs, t2i / num_pairs
    return {"i2t_loss": i2t, "t2i_loss": t2i}


def infonce_loss(
    sims_NM: Tensor,
    pos_NM: Tensor,
    temperature: float | Tensor = 0.07,
    beta: float = 0.0,
    reduction: str = "mean",
    robust_q: float = 0.0,
) -> dict[str, Tensor]:
    """The symmetric InfoNCE loss of a whole (N,M) similarity matrix with an (N,M) positive
    mask (every caption has exactly one positive image)."""
    scale = 1 / torch.as_tensor(temperature, dtype=sims_NM.dtype)
    num_pairs = int(pos_NM.sum())
    return infonce_terms(
        sims_NM, pos_NM, sims_NM, pos_NM, scale, beta, reduction, num_pairs, robust_q
    )


def log_scale_bounds(max_scale: float) -> tuple[float, float]:
    """(min, max) of the log-parametrised scale: a temperature between 1 and 1 / max_scale
    (CLIP clamps its logit scale at 100)."""
    return 0.0, math.log(max_scale)
