"""Set-to-set similarities: (N,K,D) x (M,L,D) -> (N,M), computed block by block.

Shape legend: N, M sets on each side; K, L elements per set; D element width. Inputs are
L2-normalised, so an element similarity s(a, b) = <a, b> is a cosine.

Every similarity is an element matmul followed by a reduction over the two element axes.
The (N,K,M,L) element tensor is never built whole: the driver walks blocks of at most
`block_size` sets per side, so peak extra memory is O(block_size^2 * K * L) whatever N and M
are. Under autograd each block is checkpointed (recomputed in backward), which keeps that bound
for training too. Reductions run in float32 (or float64 for float64 inputs) with max-shifted
log-sum-exp, so fp16/bf16 inputs are safe at any alpha.

Smooth-Chamfer has a second implementation, a fused Triton kernel (`setdiv.kernels`,
docs/kernels.md): chosen by `kernel="auto"` on CUDA, forced with "triton" or "torch".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from setdiv.registry import Registry

if TYPE_CHECKING:  # setdiv.config reads the registry's names: type hints only, no cycle
    from setdiv.config import SimilarityConfig

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "KERNELS",
    "REDUCERS",
    "SIMILARITIES",
    "build_similarity",
    "chamfer",
    "chamfer_reduce",
    "get",
    "match_prob",
    "match_prob_reduce",
    "mil",
    "mil_reduce",
    "smooth_chamfer",
    "smooth_chamfer_reduce",
]

DEFAULT_BLOCK_SIZE = 512
SetSimilarity = Callable[..., Tensor]


# --- reductions of one block of element similarities s_nKmL -> (n, m) ---------------------------


def smooth_chamfer_reduce(s_nKmL: Tensor, alpha: float = 16.0) -> Tensor:
    """Smooth-Chamfer from element similarities (n,K,m,L) -> (n,m).

    `1/(2 alpha K) sum_a LSE_b(alpha s) + 1/(2 alpha L) sum_b LSE_a(alpha s)`.
    """
    a_nKmL = alpha * s_nKmL
    img_to_txt = torch.logsumexp(a_nKmL, dim=3).mean(dim=1)  # (n, m): each a softly picks a b
    txt_to_img = torch.logsumexp(a_nKmL, dim=1).mean(dim=2)  # (n, m): each b softly picks an a
    return (img_to_txt + txt_to_img) / (2.0 * alpha)


def chamfer_reduce(s_nKmL: Tensor) -> Tensor:
    """Chamfer from element similarities (n,K,m,L) -> (n,m): mean of the two directed max-means."""
    return 0.5 * (s_nKmL.amax(dim=3).mean(dim=1) + s_nKmL.amax(dim=1).mean(dim=2))


def mil_reduce(s_nKmL: Tensor) -> Tensor:
    """Multiple-instance (PVSE) similarity (n,K,m,L) -> (n,m): the best element pair."""
    return s_nKmL.amax(dim=(1, 3))


def match_prob_reduce(s_nKmL: Tensor, a: float = 1.0, b: float = 0.0) -> Tensor:
    """Match probability (PCME) (n,K,m,L) -> (n,m): mean over pairs of sigmoid(a s + b)."""
    return torch.sigmoid(a * s_nKmL + b).mean(dim=(1, 3))


REDUCERS: Registry[Callable[..., Tensor]] = Registry(
    "similarity reduction",
    {
        "smooth_chamfer": smooth_chamfer_reduce,
        "chamfer": chamfer_reduce,
        "mil": mil_reduce,
        "match_prob": match_prob_reduce,
    },
)


# --- the block driver -------------------------------------------------------------------------


def _reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(reduce: Callable[[Tensor], Tensor], x_nKD: Tensor, y_mLD: Tensor) -> Tensor:
    n, K, D = x_nKD.shape
    m, L, _ = y_mLD.shape
    # (n*K, D) @ (D, m*L): one GEMM in the input dtype, then reduce in float32/64.
    s = x_nKD.reshape(n * K, D) @ y_mLD.reshape(m * L, D).T
    s_nKmL = s.view(n, K, m, L).to(_reduce_dtype(s.dtype))
    return reduce(s_nKmL)


def _needs_grad(x: Tensor, y: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)


def _check_sets(x: Tensor, y: Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(
            f"sets must be (N,K,D) and (M,L,D), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[2] != y.shape[2]:
        raise ValueError(f"element widths differ: D={x.shape[2]} vs D={y.shape[2]}")
    if x.dtype != y.dtype:
        raise ValueError(f"dtypes differ: {x.dtype} vs {y.dtype}")


def blockwise(
    reduce: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    block_size: int | None = None,
    inference_block: Callable[[Tensor, Tensor], Tensor] | None = None,
    grad_block: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Apply an element reduction to all set pairs, `block_size` sets per side at a time.

    x: (N,K,D), y: (M,L,D) -> (N,M) in float32 (float64 for float64 inputs).
    `inference_block(x_nKD, y_mLD) -> (n,m)`, if given, replaces GEMM + `reduce` when no
    gradient is needed (a fused, in-place variant of the same function); `grad_block`, if
    given, replaces the checkpointed GEMM + `reduce` under autograd (a differentiable fused
    variant that keeps what its backward needs itself).
    """
    _check_sets(x, y)
    bs = block_size or DEFAULT_BLOCK_SIZE
    N, M = x.shape[0], y.shape[0]
    if not _needs_grad(x, y):
        out = x.new_empty(N, M, dtype=_reduce_dtype(x.dtype))
        block = inference_block or functools.partial(_block, reduce)
        for i in range(0, N, bs):
            for j in range(0, M, bs):
                out[i : i + bs, j : j + bs] = block(x[i : i + bs], y[j : j + bs])
        return out
    if grad_block is None:
        # Saves only the two input views; the block's elements are recomputed in backward.
        grad_block = functools.partial(checkpoint, _block, reduce, use_reentrant=False)
    rows = []
    for i in range(0, N, bs):
        cols = [grad_block(x[i : i + bs], y[j : j + bs]) for j in range(0, M, bs)]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


# --- public similarities ----------------------------------------------------------------------


def _smooth_chamfer_fixed_shift(x_nKD: Tensor, y_mLD: Tensor, alpha: float) -> Tensor:
    """Inference block for unit vectors (s <= 1): LSE(alpha s) = alpha + log sum exp(alpha (s-1)).

    One exp pass shared by both directions, computed in place after a GEMM whose epilogue
    already applies alpha * s - alpha; exp(alpha (s-1)) >= exp(-2 alpha) cannot underflow for
    alpha <= FIXED_SHIFT_MAX_ALPHA.
    """
    n, K, D = x_nKD.shape
    m, L, _ = y_mLD.shape
    shift = x_nKD.new_full((1, 1), -alpha)
    e = torch.addmm(shift, x_nKD.reshape(n * K, D), y_mLD.reshape(m * L, D).T, alpha=alpha)
    e_nKmL = e.exp_().view(n, K, m, L)
    img_to_txt = e_nKmL.sum(dim=3).log_().mean(dim=1)  # (n, m)
    txt_to_img = e_nKmL.sum(dim=1).log_().mean(dim=2)  # (n, m)
    return (img_to_txt + txt_to_img) / (2.0 * alpha) + 1.0


FIXED_SHIFT_MAX_ALPHA = 40.0
"""Above this alpha the fused inference path could underflow in float32: max-shift instead."""


def _is_unit(x: Tensor) -> bool:
    return bool(x.norm(dim=-1).max() <= 1.0 + 1e-3)


KERNELS = ("auto", "triton", "torch")
"""`smooth_chamfer(kernel=...)`: auto = the Triton kernel on CUDA for float32 / bfloat16 /
float16 sets where Triton is installed, the torch path elsewhere."""


def _use_triton(x: Tensor, kernel: str) -> bool:
    if kernel not in KERNELS:
        raise ValueError(f"unknown smooth-Chamfer kernel {kernel!r}; choices: {list(KERNELS)}")
    if kernel == "torch" or (kernel == "auto" and x.device.type != "cuda"):
        return False
    supported = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    try:
        from setdiv.kernels.smooth_chamfer import available_on
    except ImportError as e:  # a torch build without Triton
        if kernel == "triton":
            raise RuntimeError(f"similarity.kernel=triton: Triton is not importable: {e}") from e
        return False
    if kernel == "auto":
        return supported
    if not supported:
        raise ValueError(f"the Triton smooth-Chamfer kernel takes float32/bf16/fp16, not {x.dtype}")
    if not available_on(x.device):
        raise RuntimeError(
            "similarity.kernel=triton needs a CUDA device, or TRITON_INTERPRET=1 set before "
            f"setdiv.kernels is imported (the sets are on {x.device.type})"
        )
    return True


def smooth_chamfer(
    x: Tensor,
    y: Tensor,
    alpha: float = 16.0,
    block_size: int | None = None,
    kernel: str = "auto",
) -> Tensor:
    """Smooth-Chamfer similarity of sets x (N,K,D) and y (M,L,D) -> (N,M), docs/method.md §1.

    kernel: auto | triton | torch (`KERNELS`). The Triton kernel computes the whole matrix in
    one launch when no gradient is needed; under autograd it runs per block, keeping a
    (block*K, block*L) float32 weight matrix for its backward.
    """
    if _use_triton(x, kernel):
        from setdiv.kernels.smooth_chamfer import smooth_chamfer_triton

        fn = functools.partial(smooth_chamfer_triton, alpha=alpha)
        if not _needs_grad(x, y):  # (one launch: `blockwise`, which checks the sets, not used)
            _check_sets(x, y)
            return fn(x, y)
        return blockwise(smooth_chamfer_reduce, x, y, block_size, grad_block=fn)
    fused = None
    if (
        not _needs_grad(x, y)
        and alpha <= FIXED_SHIFT_MAX_ALPHA
        and x.dtype in (torch.float32, torch.float64)
        and _is_unit(x)
        and _is_unit(y)
    ):
        fused = functools.partial(_smooth_chamfer_fixed_shift, alpha=alpha)
    reduce = functools.partial(smooth_chamfer_reduce, alpha=alpha)
    return blockwise(reduce, x, y, block_size, inference_block=fused)


def chamfer(x: Tensor, y: Tensor, block_size: int | None = None) -> Tensor:
    """Chamfer similarity of sets x (N,K,D) and y (M,L,D) -> (N,M), docs/method.md §1."""
    return blockwise(chamfer_reduce, x, y, block_size)


def mil(x: Tensor, y: Tensor, block_size: int | None = None) -> Tensor:
    """Max over element pairs (PVSE's MIL) of sets x (N,K,D) and y (M,L,D) -> (N,M)."""
    return blockwise(mil_reduce, x, y, block_size)


def match_prob(
    x: Tensor, y: Tensor, a: float = 1.0, b: float = 0.0, block_size: int | None = None
) -> Tensor:
    """Match probability (PCME) of sets x (N,K,D) and y (M,L,D) -> (N,M), docs/method.md §1."""
    return blockwise(functools.partial(match_prob_reduce, a=a, b=b), x, y, block_size)


SIMILARITIES: Registry[SetSimilarity] = Registry(
    "similarity",
    {
        "smooth_chamfer": smooth_chamfer,
        "chamfer": chamfer,
        "mil": mil,
        "match_prob": match_prob,
    },
)
"""The names `similarity.name` accepts."""


def get(name: str) -> SetSimilarity:
    """The similarity function registered as `name` (ValueError naming the registered ones)."""
    return SIMILARITIES[name]


def build_similarity(cfg: SimilarityConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The configured similarity with its parameters bound: f(x (N,K,D), y (M,L,D)) -> (N,M)."""
    fn = get(cfg.name)
    params: dict[str, float | str] = {}
    if cfg.name == "smooth_chamfer":
        params = {"alpha": cfg.alpha, "kernel": cfg.kernel}
    elif cfg.name == "match_prob":
        params = {"a": cfg.mp_a, "b": cfg.mp_b}
    return functools.partial(fn, block_size=cfg.block_size, **params)
