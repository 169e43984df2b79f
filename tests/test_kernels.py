"""The fused Triton smooth-Chamfer kernel (setdiv/kernels/smooth_chamfer.py, docs/kernels.md)
against the torch implementation, the official DivE formulation and float64 references:
values and gradients, ragged tiles, K != L, alpha in {4, 16, 40}, fp32 / bf16 / fp16 inputs.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before anything imports Triton), so every CI run checks the kernel's
logic; on a GPU (tools/gpu_check.sh) the same tests run the compiled kernel.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", "see conftest.py"
pytest.importorskip("triton", reason="a torch build without Triton has no fused kernel")

from setdiv import similarity as sim  # noqa: E402
from setdiv.config import ConfigError, load  # noqa: E402
from setdiv.kernels.smooth_chamfer import smooth_chamfer_triton  # noqa: E402
from setdiv.losses.triplet import triplet_loss  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (N, K, M, L, D): N, M not multiples of the tile's sets (64 // KP), K != L, D not a multiple
# of the 32-wide D chunk, K and L not powers of two.
SHAPES = [(5, 4, 7, 3, 40), (37, 1, 19, 2, 33), (3, 5, 70, 4, 16), (18, 4, 18, 4, 64)]


def sets(n: int, k: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1)
    return x.to(device=DEVICE, dtype=dtype)


def official(x_NKD: torch.Tensor, y_MLD: torch.Tensor, alpha: float) -> torch.Tensor:
    """The official DivE formulation: the whole element matrix, raw exp / sum / log."""
    N, K, D = x_NKD.shape
    M, L, _ = y_MLD.shape
    s = (x_NKD.reshape(N * K, D) @ y_MLD.reshape(M * L, D).T).view(N, K, M, L)
    e = torch.exp(alpha * s)
    right = torch.log(e.sum(dim=3)).sum(dim=1) / (2 * alpha * K)
    left = torch.log(e.sum(dim=1)).sum(dim=2) / (2 * alpha * L)
    return right + left


def value_and_grads(fn, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor):  # noqa: ANN001, ANN201
    x, y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    out = fn(x, y)
    (out * g.to(out.dtype)).sum().backward()
    return out.detach().double(), x.grad.double(), y.grad.double()


def assert_close(got, want, rel: float) -> None:  # noqa: ANN001
    for a, b, what in zip(got, want, ("value", "dx", "dy"), strict=True):
        scale = b.abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= rel * max(scale, 1e-12), f"{what}: max error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("alpha", [4.0, 16.0, 40.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_values_and_gradients_equal_torch_and_float64(shape, alpha: float) -> None:  # noqa: ANN001
    N, K, M, L, D = shape
    x, y = sets(N, K, D, 1), sets(M, L, D, 2)
    g = torch.randn(N, M, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    fused = value_and_grads(lambda a, b: smooth_chamfer_triton(a, b, alpha), x, y, g)
    torch_path = value_and_grads(
        lambda a, b: sim.smooth_chamfer(a, b, alpha, kernel="torch"), x, y, g
    )
    f64 = value_and_grads(
        lambda a, b: sim.smooth_chamfer(a, b, alpha, kernel="torch"), x.double(), y.double(), g
    )
    ref = value_and_grads(lambda a, b: official(a, b, alpha), x.double(), y.double(), g)
    assert_close(fused, torch_path, 1e-5)
    assert_close(fused, f64, 1e-5)
    assert_close(fused, ref, 1e-5)
    assert_close(f64, ref, 1e-10)  # (the torch path itself against the official formulation)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("alpha", [4.0, 16.0, 40.0])
def test_half_inputs_accumulate_in_float32(dtype: torch.dtype, rel: float, alpha: float) -> None:
    N, K, M, L, D = 21, 4, 13, 3, 48
    x, y = sets(N, K, D, 4, dtype), sets(M, L, D, 5, dtype)
    g = torch.randn(N, M, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    fused = value_and_grads(lambda a, b: smooth_chamfer_triton(a, b, alpha), x, y, g)
    assert fused[0].dtype == torch.float64 and x.dtype == dtype
    # float64 on the same (rounded) inputs: the score differs only by float32 accumulation
    exact = value_and_grads(
        lambda a, b: sim.smooth_chamfer(a, b, alpha, kernel="torch"), x.double(), y.double(), g
    )
    assert (fused[0] - exact[0]).abs().max().item() < 1e-5
    # the gradients pass through the input dtype (as torch's own matmul backward does)
    torch_path = value_and_grads(
        lambda a, b: sim.smooth_chamfer(a, b, alpha, kernel="torch"), x, y, g
    )
    assert_close(fused, torch_path, rel)


def test_blocked_training_path_and_a_loss_gradient_equal_the_torch_path() -> None:
    """`smooth_chamfer(kernel="triton")` under autograd runs the kernel per block (block_size
    smaller than N and M: several ragged blocks) and a loss on top sees the same gradients."""
    N, K, D = 45, 4, 32
    x, y = sets(N, K, D, 7), sets(N, 3, D, 8)

    def loss(kernel: str):  # noqa: ANN202
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        s = sim.smooth_chamfer(a, b, 16.0, block_size=16, kernel=kernel)
        terms = triplet_loss(s, torch.eye(N, dtype=torch.bool, device=DEVICE), 0.2, "selective")
        (terms["i2t_loss"] + terms["t2i_loss"]).backward()
        return s.detach(), a.grad, b.grad

    for got, want in zip(loss("triton"), loss("torch"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inference_computes_the_whole_matrix_in_one_launch() -> None:
    x, y = sets(70, 4, 24, 9), sets(130, 4, 24, 10)
    with torch.no_grad():
        got = sim.smooth_chamfer(x, y, 16.0, block_size=32, kernel="triton")
        want = sim.smooth_chamfer(x.double(), y.double(), 16.0, kernel="torch")
    assert got.dtype == torch.float32 and got.shape == (70, 130)
    assert (got.double() - want).abs().max().item() < 1e-6


def test_kernel_choice_errors_and_config() -> None:
    cpu = torch.zeros(2, 2, 4)
    assert sim._use_triton(cpu, "auto") is False  # auto: CUDA only
    assert sim._use_triton(cpu, "torch") is False
    with pytest.raises(ValueError, match="choices"):
        sim.smooth_chamfer(cpu, cpu, kernel="cuda")
    with pytest.raises(ValueError, match="float32/bf16/fp16"):
        sim.smooth_chamfer(cpu.double(), cpu.double(), kernel="triton")
    with pytest.raises(ConfigError, match="similarity.kernel.*smooth_chamfer only"):
        load([], ["similarity.name=chamfer", "similarity.kernel=triton"])
    cfg = load([], ["similarity.kernel=torch"])
    assert sim.build_similarity(cfg.similarity).keywords["kernel"] == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter case: CPU only")
def test_triton_on_cpu_without_the_interpreter_says_what_to_set(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(2, 2, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sim.smooth_chamfer(x, x, kernel="triton")
