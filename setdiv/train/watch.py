"""What the trainer watches for: divergence (non-finite losses or weights: exit code 3) and a
stall at the margin (every step of an epoch's triplet terms at the margin, the
hardest-negative collapse)."""

from __future__ import annotations

from setdiv.errors import UserError

__all__ = ["MarginStall", "NonFiniteLossError"]


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
