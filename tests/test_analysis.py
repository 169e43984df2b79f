"""Circular variance on hand-worked sets."""

from __future__ import annotations

import math

import pytest
import torch

from setdiv.eval.analysis import circular_variance


def test_circular_variance_hand_cases() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    sets = torch.stack(
        [
            torch.stack([e1, e1]),  # identical elements: 0
            torch.stack([e1, -e1]),  # opposite: 1
            torch.stack([e1, e2]),  # orthogonal: 1 - sqrt(2)/2
        ]
    )
    got = circular_variance(sets)
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 1 - math.sqrt(2) / 2]))


def test_circular_variance_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\(N,K,D\)"):
        circular_variance(torch.zeros(3, 4))
