"""Set similarities against the golden values of docs/method.md §1 and naive per-pair loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from setdiv import similarity as sim

NAMES = sorted(sim.SIMILARITIES)


def naive(name: str, x: np.ndarray, y: np.ndarray, alpha: float = 16.0) -> np.ndarray:
    """Per-pair, per-element Python loops straight from the docs/method.md §1 formulas (float64)."""
    N, K, _ = x.shape
    M, L, _ = y.shape
    out = np.zeros((N, M))
    for n in range(N):
        for m in range(M):
            s = [[float(np.dot(x[n, a], y[m, b])) for b in range(L)] for a in range(K)]
            if name == "smooth_chamfer":
                t1 = sum(
                    math.log(sum(math.exp(alpha * s[a][b]) for b in range(L))) for a in range(K)
                )
                t2 = sum(
                    math.log(sum(math.exp(alpha * s[a][b]) for a in range(K))) for b in range(L)
                )
                out[n, m] = t1 / (2 * alpha * K) + t2 / (2 * alpha * L)
            elif name == "chamfer":
                t1 = sum(max(s[a]) for a in range(K)) / (2 * K)
                t2 = sum(max(s[a][b] for a in range(K)) for b in range(L)) / (2 * L)
                out[n, m] = t1 + t2
            elif name == "mil":
                out[n, m] = max(max(row) for row in s)
            else:
                out[n, m] = np.mean([[1 / (1 + math.exp(-v)) for v in row] for row in s])
    return out


def random_sets(n: int, k: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def test_golden_values() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    A = torch.stack([e1, e2])[None].double()
    B = torch.stack([e1, e1])[None].double()
    golden = {"smooth_chamfer": 0.771661, "chamfer": 0.75, "mil": 1.0, "match_prob": 0.615529}
    for name, value in golden.items():
        assert sim.get(name)(A, B).item() == pytest.approx(value, abs=1e-6), name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-6)])
def test_matches_naive_loop(name: str, dtype: torch.dtype, tol: float) -> None:
    x, y = random_sets(5, 3, 8, dtype, seed=1), random_sets(7, 4, 8, dtype, seed=2)
    got = sim.get(name)(x, y, block_size=3)
    ref = naive(name, x.double().numpy(), y.double().numpy())
    assert got.shape == (5, 7)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [16.0, 128.0])
def test_half_precision_is_finite_and_close(name: str, dtype: torch.dtype, alpha: float) -> None:
    x, y = random_sets(6, 4, 32, seed=3), random_sets(9, 4, 32, seed=4)
    kw = {"alpha": alpha} if name == "smooth_chamfer" else {}
    got = sim.get(name)(x.to(dtype), y.to(dtype), **kw)
    assert torch.isfinite(got).all()
    ref = sim.get(name)(x, y, **kw)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3  # input rounding only
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)


def test_half_precision_gradient_is_finite_at_high_alpha() -> None:
    x = random_sets(4, 4, 16, seed=5).to(torch.bfloat16).requires_grad_()
    y = random_sets(6, 4, 16, seed=6).to(torch.bfloat16).requires_grad_()
    sim.smooth_chamfer(x, y, alpha=128.0).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_block_size_does_not_change_result(name: str) -> None:
    x, y = (
        random_sets(23, 4, 16, torch.float32, seed=7),
        random_sets(31, 3, 16, torch.float32, seed=8),
    )
    full = sim.get(name)(x, y, block_size=1024)
    for bs in (1, 2, 5, 16, 30):
        torch.testing.assert_close(sim.get(name)(x, y, block_size=bs), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name,block_fn", [("chamfer", "_block"), ("smooth_chamfer", "_smooth_chamfer_fixed_shift")]
)
def test_blocks_never_exceed_block_size(
    name: str, block_fn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    real = getattr(sim, block_fn)

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        x, y = [a for a in args if isinstance(a, torch.Tensor)][:2]
        seen.append((x.shape[0], y.shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, block_fn, spy)
    x, y = random_sets(40, 4, 8, torch.float32), random_sets(70, 4, 8, torch.float32)
    sim.get(name)(x, y, block_size=16)
    assert max(n for n, _ in seen) <= 16 and max(m for _, m in seen) <= 16
    assert sum(n * m for n, m in seen) == 40 * 70  # every pair exactly once


def test_backward_saves_only_inputs_not_element_tensor() -> None:
    """Under autograd, memory kept for backward is the inputs' storage, not O(N*K*M*L)."""
    N, M, K, D, bs = 64, 96, 4, 8, 16
    x = random_sets(N, K, D, torch.float32).requires_grad_()
    y = random_sets(M, K, D, torch.float32).requires_grad_()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sim.smooth_chamfer(x, y, block_size=bs)
    out.sum().backward()
    element_bytes = N * K * M * K * 4
    assert sum(storages.values()) <= (N + M) * K * D * 4  # views of x and y only
    assert sum(storages.values()) < element_bytes / 10


def test_smooth_chamfer_gradient_is_two_softmaxes() -> None:
    """d SC / d s(a,b) = softmax_b(alpha s)[a,b] / (2K) + softmax_a(alpha s)[a,b] / (2L)."""
    alpha, K, L = 16.0, 3, 5
    s = (torch.rand(1, K, 1, L, dtype=torch.float64) * 2 - 1).requires_grad_()
    sim.smooth_chamfer_reduce(s, alpha).sum().backward()
    a = alpha * s.detach()[0, :, 0, :].numpy()
    row = np.exp(a - a.max(1, keepdims=True))
    row /= row.sum(1, keepdims=True)
    col = np.exp(a - a.max(0, keepdims=True))
    col /= col.sum(0, keepdims=True)
    closed = row / (2 * K) + col / (2 * L)
    np.testing.assert_allclose(s.grad[0, :, 0, :].numpy(), closed, atol=1e-12)


def test_blockwise_gradient_matches_closed_form_through_inputs() -> None:
    """Gradient w.r.t. x through the checkpointed blocks equals the closed-form chain rule."""
    alpha = 16.0
    x = random_sets(5, 3, 6, seed=9).requires_grad_()
    y = random_sets(7, 2, 6, seed=10)
    g = torch.randn(5, 7, dtype=torch.float64)
    (sim.smooth_chamfer(x, y, alpha=alpha, block_size=2) * g).sum().backward()
    s = torch.einsum("nkd,mld->nkml", x.detach(), y)
    w = torch.softmax(alpha * s, dim=3) / (2 * 3) + torch.softmax(alpha * s, dim=1) / (2 * 2)
    expected = torch.einsum("nm,nkml,mld->nkd", g, w, y)
    torch.testing.assert_close(x.grad, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_naive_autograd(name: str) -> None:
    x1 = random_sets(4, 3, 5, seed=11).requires_grad_()
    y1 = random_sets(6, 2, 5, seed=12).requires_grad_()
    x2, y2 = x1.detach().clone().requires_grad_(), y1.detach().clone().requires_grad_()
    sim.get(name)(x1, y1, block_size=2).square().sum().backward()
    # Reference: the whole (N,K,M,L) tensor in one go, no blocks, no checkpointing.
    s = torch.einsum("nkd,mld->nkml", x2, y2)
    sim.REDUCERS[name](s).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(y1.grad, y2.grad)


@pytest.mark.parametrize("name", NAMES)
def test_single_element_sets_rank_like_cosine(name: str) -> None:
    x, y = random_sets(20, 1, 16, seed=13), random_sets(30, 1, 16, seed=14)
    cosine = (x[:, 0] @ y[:, 0].T).numpy()
    got = sim.get(name)(x, y).numpy()
    np.testing.assert_array_equal(np.argsort(-got, axis=1), np.argsort(-cosine, axis=1))
    np.testing.assert_array_equal(np.argsort(-got, axis=0), np.argsort(-cosine, axis=0))


def test_registry_and_errors() -> None:
    assert sim.get("smooth_chamfer") is sim.smooth_chamfer
    with pytest.raises(ValueError, match="unknown similarity 'cosine'"):
        sim.get("cosine")
    with pytest.raises(ValueError, match="element widths differ"):
        sim.chamfer(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="sets must be"):
        sim.mil(torch.zeros(2, 4), torch.zeros(2, 3, 4))


def test_build_similarity_binds_config() -> None:
    from setdiv.config import SimilarityConfig

    x, y = random_sets(3, 2, 4), random_sets(4, 2, 4)
    f = sim.build_similarity(SimilarityConfig(name="smooth_chamfer", alpha=4.0, block_size=2))
    torch.testing.assert_close(
        f(x, y), torch.from_numpy(naive("smooth_chamfer", x.numpy(), y.numpy(), 4.0))
    )
    g = sim.build_similarity(SimilarityConfig(name="match_prob", mp_a=2.0, mp_b=-1.0))
    s = torch.einsum("nkd,mld->nkml", x, y)
    torch.testing.assert_close(g(x, y), torch.sigmoid(2 * s - 1).mean(dim=(1, 3)))


@pytest.mark.parametrize("alpha", [4.0, 16.0, 40.0, 128.0])
def test_fused_inference_path_matches_naive_loop(alpha: float) -> None:
    """No-grad fp32 runs take the fused fixed-shift path for alpha <= 40, max-shift above."""
    x, y = (
        random_sets(6, 4, 8, torch.float32, seed=15),
        random_sets(9, 3, 8, torch.float32, seed=16),
    )
    with torch.no_grad():
        got = sim.smooth_chamfer(x, y, alpha=alpha, block_size=4)
    ref = naive("smooth_chamfer", x.double().numpy(), y.double().numpy(), alpha)
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-6, rtol=0)


def test_non_unit_inputs_fall_back_to_max_shift() -> None:
    x, y = 3 * random_sets(2, 2, 4, seed=17), 3 * random_sets(3, 2, 4, seed=18)
    ref = naive("smooth_chamfer", x.numpy(), y.numpy())
    np.testing.assert_allclose(sim.smooth_chamfer(x, y).numpy(), ref, atol=1e-9, rtol=0)
