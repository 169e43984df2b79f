"""Circular variance on hand-worked sets."""

from __future__ import annotations

import math

import pytest
import torch

from setdiv.eval.set_statistics import circular_variance


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


def test_slot_specialisation_hand_worked() -> None:
    from setdiv.eval.set_statistics import slot_specialisation

    # Image 0: 4 valid inputs; slot 0 puts all weight on one, slot 1 is uniform.
    # Image 1: 2 valid inputs of 4 (the last two padded); slot 0 0.75/0.25, slot 1 uniform.
    attn = torch.tensor(
        [
            [[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]],
            [[0.75, 0.25, 0.9, 0.9], [0.5, 0.5, 0.0, 0.0]],  # padded entries ignored
        ]
    )
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    peaks, uniform = slot_specialisation(attn, mask)
    assert peaks.tolist() == pytest.approx([(1.0 + 0.75) / 2, (0.25 + 0.5) / 2])
    assert uniform == pytest.approx((1 / 4 + 1 / 2) / 2)
