"""The objective's config sections: the loss (`loss`) and what the trainer does when training
collapses (`train.collapse`). docs/objectives.md explains the choices and the measurements
behind the defaults. No torch, nothing from setdiv but the config rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from setdiv.config.rules import non_negative, positive, ruled

__all__ = ["CollapseConfig", "LossConfig", "NegativesName", "ObjectiveName"]

ObjectiveName = Literal["triplet", "infonce"]
"""`setdiv.losses.OBJECTIVES`."""
NegativesName = Literal["selective", "hardest", "mean"]
"""`setdiv.losses.NEGATIVES`."""

_TEMPERATURE, _MAX_SCALE = 0.07, 100.0


def _in_unit(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _between(lo: float, hi: float) -> object:
    return lambda v: None if lo < v < hi else f"must be in ({lo}, {hi})"


@dataclass
class LossConfig:
    name: ObjectiveName = "triplet"
    """The ranking term: triplet (hinge with `margin` against the negatives `negatives` names)
    | infonce (symmetric InfoNCE over the set similarities, learnable temperature). Neither
    reads the other's keys: infonce uses no `margin` and no `negatives`."""
    negatives: NegativesName = "selective"
    """triplet: selective (per pair, the hardest negative when the positive already beats it,
    else the mean over all negatives: no warm-up needed, no collapse) | hardest (VSE++, the
    official DivE objective: needs `mean_negative_epochs`) | mean (all negatives, always)."""
    margin: float = non_negative(0.2)
    """triplet: the margin m (0.2 for region features, 0.1 for CNN grids)."""
    mean_negative_epochs: int = non_negative(0)
    """Warm-up: the first E epochs weigh all negatives alike (triplet: the mean negative;
    infonce: no hard-negative weighting). The official recipes: 1 epoch with `hardest`."""
    reduction: Literal["mean", "sum"] = "mean"
    """How the per-pair terms are reduced: mean (official DivE) | sum (VSE++)."""
    temperature: float = ruled(_TEMPERATURE, _in_unit)
    """infonce: the initial temperature (CLIP: 0.07); logits are similarity / temperature."""
    learn_temperature: bool = True
    """infonce: learn the temperature (log-parametrised, its own parameter group without
    weight decay) or keep it fixed."""
    max_logit_scale: float = ruled(_MAX_SCALE, lambda v: None if v >= 1 else "must be >= 1")
    """infonce: the learned 1 / temperature is clamped to [1, this] (CLIP: 100)."""
    hn_beta: float = non_negative(0.0)
    """infonce: HN-NCE's hard-negative weighting beta (0 = plain InfoNCE): each query's
    negatives weighted by exp(beta * logit), normalised to mean 1."""
    robust_q: float = ruled(0.0, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    """For noisy pairs: a pair the model cannot explain (a likely wrong pair) pulls less.
    infonce: each pair's -log p becomes (1 - p^q) / q (generalised cross entropy); triplet:
    each hinge is weighted by (share of its negatives scoring below the positive)^q. 0: off."""
    mmd_weight: float = 0.01
    """Weight of the MMD regulariser between image and caption elements."""
    div_weight: float = 0.01
    """Weight of the diversity regulariser on the pre-fusion slots."""

    def _conflict(self) -> tuple[str, str] | None:
        if self.name == "triplet":
            infonce_only = {
                "hn_beta": self.hn_beta != 0,
                "temperature": self.temperature != _TEMPERATURE,
                "learn_temperature": not self.learn_temperature,
                "max_logit_scale": self.max_logit_scale != _MAX_SCALE,
            }
            for key, set_ in infonce_only.items():
                if set_:
                    return key, "applies to loss.name=infonce only (loss.name is triplet)"
        elif self.negatives != "selective":
            return "negatives", (
                "applies to loss.name=triplet only; InfoNCE weighs hard negatives with loss.hn_beta"
            )
        if 1 / self.temperature > self.max_logit_scale:
            return (
                "temperature",
                f"must be at least 1 / loss.max_logit_scale = {1 / self.max_logit_scale:g}",
            )
        return None


@dataclass
class CollapseConfig:
    """The collapse guard: the spread of the batch's scores (`sim_std`; InfoNCE: of the logits,
    sim_std / temperature), averaged over `window` steps, against the highest such average of
    the run so far."""

    action: Literal["recover", "stop", "warn"] = "recover"
    """On a collapse: recover (train against all negatives from then on: the mean negative,
    InfoNCE without hard-negative weighting; stop with exit 3 where that is not possible, or
    when the spread has not returned after `patience` steps or by the end of training) | stop
    (exit 3 at once) | warn (log only)."""
    window: int = positive(20)
    """Steps whose spread is averaged."""
    ratio: float = ruled(0.2, _between(0.0, 1.0))
    """Collapsed: the window's spread is below this fraction of the run's highest."""
    recover_ratio: float = ruled(0.5, _between(0.0, 1.0))
    """Recovered: the window's spread is back above this fraction of the run's highest."""
    patience: int = positive(1000)
    """Steps a run may spend collapsed in all before it stops with exit 3 (`warn`: never)."""

    def _conflict(self) -> tuple[str, str] | None:
        if self.recover_ratio <= self.ratio:
            return "recover_ratio", f"must be above train.collapse.ratio={self.ratio}"
        return None
