"""What the trainer watches for: divergence (non-finite losses or weights: exit code 3), a
collapse of the batch's scores to a constant (acted on: `CollapseGuard`, exit code 3 when it
cannot recover; docs/objectives.md), and a stall at the margin (every step of an epoch's
triplet terms at the margin: a warning)."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from setdiv.config import CollapseConfig, LossConfig
from setdiv.errors import UserError

__all__ = ["CollapseError", "CollapseGuard", "MarginStall", "NonFiniteLossError", "margin_share"]


class NonFiniteLossError(UserError):
    """Too many consecutive non-finite losses, or non-finite weights at a checkpoint: training
    stops, the last (finite) checkpoint is kept. Reported as one line, like any user error."""

    exit_code = 3
    """`setdiv train` exits with this code, so a scheduler can tell divergence from a crash."""


class MarginStall:
    """Counts the steps of an epoch whose triplet terms (mean reduction) both sit within 10% of
    the margin: what a hardest-negative loss shows when every similarity is alike."""

    def __init__(self, margin: float, reduction: str, tolerance: float = 0.1) -> None:
        self.margin, self.tolerance = margin, tolerance
        self.enabled = margin > 0 and reduction == "mean"
        self.steps, self.at_margin = 0, 0
        self.sums = {"i2t_loss": 0.0, "t2i_loss": 0.0}
        self.spreads: list[float] = []

    def update(self, terms: dict[str, float]) -> None:
        """Count one finite step's global loss terms."""
        if not self.enabled or not all(k in terms for k in self.sums):
            return
        self.steps += 1
        for k in self.sums:
            self.sums[k] += terms[k]
        if "sim_std" in terms:
            self.spreads.append(terms["sim_std"])
        if all(abs(terms[k] - self.margin) <= self.tolerance * self.margin for k in self.sums):
            self.at_margin += 1

    def mean(self, key: str) -> float:
        """The epoch's mean of `i2t_loss` or `t2i_loss` so far."""
        return self.sums[key] / max(self.steps, 1)

    def spread(self) -> float:
        """The epoch's mean `sim_std` (the batches' similarity spread) so far; NaN when the
        steps did not report one."""
        return sum(self.spreads) / len(self.spreads) if self.spreads else float("nan")

    def whole_epoch(self) -> bool:
        """Whether every step counted sat at the margin."""
        return self.steps > 0 and self.at_margin == self.steps

    def warning(self, epoch: int, negatives: str) -> str:
        """The warning for a whole epoch at the margin, with its remedies."""
        return (
            f"epoch {epoch}: the triplet terms sat at the margin {self.margin:.3g} for all "
            f"{self.steps} steps (i2t {self.mean('i2t_loss'):.4f}, t2i "
            f"{self.mean('t2i_loss'):.4f}): positives score no higher than the {negatives} "
            "negatives, the similarities are collapsing to a constant (their standard "
            f"deviation in a batch: {self.spread():.4f}). Remedies (docs/objectives.md): "
            "selective or mean negatives (loss.negatives=selective, the default, or mean), "
            "more mean-negative epochs (loss.mean_negative_epochs), less input dropout "
            "(data.region_dropout, data.word_dropout), a lower LR."
        )


class CollapseError(NonFiniteLossError):
    """Training collapsed (every pair scores alike) and could not recover: it stops, exit 3."""


REMEDY = (
    "remedies (docs/objectives.md): loss.negatives=selective (the default) or mean, "
    "loss.hn_beta=0, less input dropout (data.region_dropout, data.word_dropout), a lower "
    "optim.lr; train.collapse.action=warn trains on regardless"
)


class CollapseGuard:
    """Acts on a collapse of the batch's scores. Each step reports the spread of the scores the
    objective ranks (`sim_std`; InfoNCE: the logits'); the guard averages it over `window`
    steps and compares the average with the highest one of the run so far:

    - below `ratio` of it, or, for a triplet loss against its hardest negatives, below
      `recover_ratio` of it while the window's triplet terms sit at or above the margin (the
      average positive scores no higher than its negatives: a run that collapses from its
      first steps never had a spread to fall from): collapsed. `recover`: from then on the
      trainer trains against all negatives (`fallback`: the mean negative, InfoNCE without
      hard-negative weighting: the objective that just collapsed would collapse again); the
      run has recovered once the average is back above `recover_ratio` of the highest. Where
      the objective already uses all negatives (mean negatives, plain InfoNCE, a second
      collapse) it stops at once.
      `stop`: it stops at once. `warn`: one warning per collapse, nothing else.
    - a run collapsed for more than `patience` steps in all, or still collapsed when training
      ends, stops (`CollapseError`, exit 3): a collapsed model is never trained to the end.

    Every rank sees the same (all-reduced) spreads, so every rank decides alike. `state()` /
    `load()` carry the guard through a checkpoint, so a resumed run decides as the
    uninterrupted one."""

    _KEYS = ("best", "last_mean", "fallback", "collapsed", "collapsed_steps")

    def __init__(self, cfg: CollapseConfig) -> None:
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.window)
        self.recent_share: deque[float | None] = deque(maxlen=cfg.window)
        """Per step: the smaller triplet term over the margin (None: no margin objective)."""
        self.best = 0.0
        """The highest window average of the run so far."""
        self.last_mean = 0.0
        """The latest window average."""
        self.fallback = False
        self.collapsed = False
        self.collapsed_steps = 0

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps."""
        return {
            "recent": list(self.recent),
            "recent_share": list(self.recent_share),
            **{k: getattr(self, k) for k in self._KEYS},
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore `state()` (an empty dict: a fresh guard)."""
        self.recent = deque(state.get("recent", []), maxlen=self.cfg.window)
        self.recent_share = deque(state.get("recent_share", []), maxlen=self.cfg.window)
        self.best = float(state.get("best", 0.0))
        self.last_mean = float(state.get("last_mean", 0.0))
        self.fallback = bool(state.get("fallback", False))
        self.collapsed = bool(state.get("collapsed", False))
        self.collapsed_steps = int(state.get("collapsed_steps", 0))

    def update(
        self,
        spread: float,
        can_fall_back: bool,
        step: int,
        log: logging.Logger | None = None,
        margin_share: float | None = None,
    ) -> str | None:
        """One finite step's score spread -> "collapsed", "recovered" or None, logged to `log`
        (rank 0's); raises `CollapseError` when the run must stop. `can_fall_back`: whether
        all negatives would change the objective in use. `margin_share`: for a triplet loss
        (mean reduction), the smaller of its two terms over the margin (>= 1: positives score
        no higher than their negatives); None otherwise."""
        self.recent_share.append(margin_share)
        event = self._decide(spread, can_fall_back, step)
        if log is not None and event == "collapsed":
            then = {"recover": "training against all negatives from now on"}.get(
                self.cfg.action, "training on (train.collapse.action=warn)"
            )
            log.warning("step %d: collapse: %s; %s", step, self.describe(), then)
        elif log is not None and event == "recovered":
            log.info("step %d: recovered from the collapse: %s", step, self.describe())
        return event

    def _decide(self, spread: float, can_fall_back: bool, step: int) -> str | None:
        cfg = self.cfg
        self.recent.append(spread)
        if len(self.recent) < cfg.window:
            self.collapsed_steps += self.collapsed
            return None
        mean = self.last_mean = sum(self.recent) / len(self.recent)
        self.best = max(self.best, mean)
        if self.collapsed:
            self.collapsed_steps += 1
            if mean >= cfg.recover_ratio * self.best:
                self.collapsed = False
                return "recovered"
            if self.collapsed_steps > cfg.patience and cfg.action != "warn":
                raise self._error(step, f"still collapsed after {cfg.patience} steps")
            return None
        # the margin sign counts only against the hardest negatives (an objective that can
        # still fall back): the mean hinge sits near the margin at every start
        at_margin = can_fall_back and mean < cfg.recover_ratio * self.best and self._at_margin()
        if mean >= cfg.ratio * self.best and not at_margin:
            return None
        self.collapsed, self.collapsed_steps = True, self.collapsed_steps + 1
        if cfg.action == "stop":
            raise self._error(step, "train.collapse.action=stop")
        if cfg.action == "recover":
            if self.fallback or not can_fall_back:
                raise self._error(step, "it already trains against all negatives")
            self.fallback = True
            self.recent.clear()  # the next window measures the fallback objective
            self.recent_share.clear()
        return "collapsed"

    def _at_margin(self) -> bool:
        """Whether the window's triplet terms sat at or above the margin on average."""
        shares = list(self.recent_share)
        if len(shares) < self.cfg.window or any(s is None for s in shares):
            return False
        return sum(shares) / len(shares) >= 1.0

    def finish(self, step: int) -> None:
        """At the end of training: a run still collapsed stops with exit 3 (`warn`: not)."""
        if self.collapsed and self.cfg.action != "warn":
            raise self._error(step, "the run ended collapsed")

    def describe(self) -> str:
        """The spread against the run's highest, for log lines."""
        return (
            f"the batch scores' spread averaged {self.last_mean:.4g} over the last "
            f"{self.cfg.window} steps, against {self.best:.4g} earlier in the run"
        )

    def _error(self, step: int, why: str) -> CollapseError:
        return CollapseError(
            f"step {step}: training collapsed, every pair scores alike ({self.describe()}); "
            f"stopped ({why}); {REMEDY}"
        )


def margin_share(loss: LossConfig, terms: dict[str, float]) -> float | None:
    """For a triplet loss with a margin and mean reduction, not robust-weighted: the smaller of
    the step's two terms (`i2t_loss`, `t2i_loss`) over the margin; >= 1 when the average
    positive scores no higher than its negatives. None for any other objective."""
    if loss.name != "triplet" or loss.reduction != "mean" or loss.margin <= 0:
        return None
    if loss.robust_q > 0 or "i2t_loss" not in terms or "t2i_loss" not in terms:
        return None
    return min(terms["i2t_loss"], terms["t2i_loss"]) / loss.margin
