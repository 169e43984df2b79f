"""A fused smooth-Chamfer kernel (Triton): the element GEMM and both log-sum-exp reductions in
one pass over a tile of set pairs, forward and backward (docs/method.md §1, docs/kernels.md).

One program owns `BN` sets of x and `BM` sets of y: a (BN*KP, BM*LP) tile of element
similarities, accumulated in float32 over D in `BD`-wide chunks with `tl.dot`, then scaled by
alpha, reduced along L (each element of x softly picks one of y) and along K (the other way),
max-shifted, and written out as the (BN, BM) block of scores. The tile never leaves registers:
the (N,K,M,L) element tensor exists nowhere, and HBM traffic is the inputs once per tile row /
column plus the (N, M) output. K and L are padded to powers of two (KP, LP); padded elements
and sets are masked out of every reduction.

Backward: dS = g (1/(2K) softmax_L(alpha S) + 1/(2L) softmax_K(alpha S)), so the forward that
runs under autograd also stores W = 1/(2K) softmax_L + 1/(2L) softmax_K (the tile's weights,
float32, (N*K, M*L)); the backward scales W by the incoming gradient and runs two GEMMs,
dx = dS @ y and dy = dS^T @ x: three GEMMs in all, as the unfused formulation under autograd.

Importing this module decorates the kernels: on a CPU they run only under Triton's
interpreter, which must be switched on (`TRITON_INTERPRET=1`) before the import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["available_on", "smooth_chamfer_triton"]

_TILE = 64
"""Element rows (and columns) per program: BN = _TILE // KP sets of x, BM = _TILE // LP of y."""
_BD = 32
"""Width of one D chunk of the GEMM."""


@triton.jit
def _smooth_chamfer_tile(
    x_ptr, y_ptr, out_ptr, w_ptr,
    N, M, D, K, L,
    sxn, sxk, sxd, syn, syl, syd, son, som,
    alpha,
    KP: tl.constexpr, LP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    BD: tl.constexpr, STORE_W: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    r = tl.arange(0, BN * KP)  # tile row -> (set of x, element)
    c = tl.arange(0, BM * LP)  # tile column -> (set of y, element)
    xs = tl.program_id(0) * BN + r // KP
    xk = r % KP
    ys = tl.program_id(1) * BM + c // LP
    yl = c % LP
    row_ok = (xs < N) & (xk < K)
    col_ok = (ys < M) & (yl < L)

    acc = tl.zeros((BN * KP, BM * LP), dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        xt = tl.load(
            x_ptr + xs[:, None] * sxn + xk[:, None] * sxk + d[None, :] * sxd,
            mask=row_ok[:, None] & (d[None, :] < D), other=0.0,
        )  # fmt: skip
        yt = tl.load(
            y_ptr + ys[:, None] * syn + yl[:, None] * syl + d[None, :] * syd,
            mask=col_ok[:, None] & (d[None, :] < D), other=0.0,
        )  # fmt: skip
        if UPCAST:  # the interpreter multiplies bf16 tiles as their raw bits: widen them first
            xt = xt.to(tl.float32)
            yt = yt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=PRECISION)

    ok = row_ok[:, None] & col_ok[None, :]
    a = tl.where(ok, acc * alpha, float("-inf"))

    # Along L: each element of x softly picks one of y.  (BN*KP, BM, LP) -> (BN*KP, BM)
    a_r = tl.reshape(a, (BN * KP, BM, LP))
    mx_r = tl.max(a_r, axis=2)
    mx_r = tl.where(mx_r == float("-inf"), 0.0, mx_r)
    e_r = tl.exp(a_r - mx_r[:, :, None])
    sum_r = tl.sum(e_r, axis=2)
    lse_r = tl.where(xk[:, None] < K, tl.log(tl.maximum(sum_r, 1e-30)) + mx_r, 0.0)
    to_y = tl.sum(tl.reshape(lse_r, (BN, KP, BM)), axis=1)  # (BN, BM): sum over x's elements

    # Along K: each element of y softly picks one of x.  (BN, KP, BM*LP) -> (BN, BM*LP)
    a_c = tl.reshape(a, (BN, KP, BM * LP))
    mx_c = tl.max(a_c, axis=1)
    mx_c = tl.where(mx_c == float("-inf"), 0.0, mx_c)
    e_c = tl.exp(a_c - mx_c[:, None, :])
    sum_c = tl.sum(e_c, axis=1)
    lse_c = tl.where(yl[None, :] < L, tl.log(tl.maximum(sum_c, 1e-30)) + mx_c, 0.0)
    to_x = tl.sum(tl.reshape(lse_c, (BN, BM, LP)), axis=2)  # (BN, BM): sum over y's elements

    score = (to_y / K + to_x / L) / (2.0 * alpha)
    on = tl.program_id(0) * BN + tl.arange(0, BN)
    om = tl.program_id(1) * BM + tl.arange(0, BM)
    tl.store(
        out_ptr + on[:, None] * son + om[None, :] * som, score,
        mask=(on[:, None] < N) & (om[None, :] < M),
    )  # fmt: skip

    if STORE_W:
        # W = 1/(2K) softmax over L + 1/(2L) softmax over K, the tile's d score / d s.
        p_r = tl.reshape(e_r / tl.maximum(sum_r, 1e-30)[:, :, None], (BN * KP, BM * LP))
        p_c = tl.reshape(e_c / tl.maximum(sum_c, 1e-30)[:, None, :], (BN * KP, BM * LP))
        w = p_r / (2.0 * K) + p_c / (2.0 * L)
        row = xs * K + xk
        col = ys * L + yl
        tl.store(w_ptr + row[:, None] * (M * L) + col[None, :], w, mask=ok)


def available_on(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: CUDA, or any device under the interpreter."""
    return device.type == "cuda" or bool(triton.knobs.runtime.interpret)


def _launch(x: Tensor, y: Tensor, alpha: float, store_w: bool) -> tuple[Tensor, Tensor | None]:
    N, K, D = x.shape
    M, L, _ = y.shape
    KP, LP = triton.next_power_of_2(K), triton.next_power_of_2(L)
    BN, BM = max(1, _TILE // KP), max(1, _TILE // LP)
    out = torch.empty(N, M, device=x.device, dtype=torch.float32)
    w = torch.empty(N * K, M * L, device=x.device, dtype=torch.float32) if store_w else out
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    exact = x.dtype in (torch.float32, torch.float64) and not tf32
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    _smooth_chamfer_tile[grid](
        x, y, out, w, N, M, D, K, L, *x.stride(), *y.stride(), *out.stride(), float(alpha),
        KP=KP, LP=LP, BN=BN, BM=BM, BD=_BD, STORE_W=store_w,
        PRECISION="ieee" if exact else "tf32",
        UPCAST=bool(triton.knobs.runtime.interpret) and x.dtype == torch.bfloat16,
    )  # fmt: skip
    return out, (w if store_w else None)


class _SmoothChamfer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, alpha: float) -> Tensor:  # noqa: ANN001
        needs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        out, w = _launch(x, y, alpha, store_w=needs)
        if needs:
            ctx.save_for_backward(x, y, w)
        return out

    @staticmethod
    def backward(ctx, g_NM: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001
        x, y, w = ctx.saved_tensors
        N, K, D = x.shape
        M, L, _ = y.shape
        ds = (w.view(N, K, M, L) * g_NM[:, None, :, None]).view(N * K, M * L).to(x.dtype)
        dx = (ds @ y.reshape(M * L, D)).view(N, K, D) if ctx.needs_input_grad[0] else None
        dy = (ds.T @ x.reshape(N * K, D)).view(M, L, D) if ctx.needs_input_grad[1] else None
        return dx, dy, None


def smooth_chamfer_triton(x_NKD: Tensor, y_MLD: Tensor, alpha: float) -> Tensor:
    """Smooth-Chamfer of sets x (N,K,D) and y (M,L,D) -> (N,M) float32, fused; differentiable.

    Inputs of any float dtype (float32 / bfloat16 / float16), accumulated in float32. Under
    autograd the forward keeps a float32 (N*K, M*L) weight matrix for the backward: call it on
    blocks (`setdiv.similarity.blockwise` does) to bound that memory.
    """
    if not available_on(x_NKD.device):
        raise RuntimeError(
            "the Triton smooth-Chamfer kernel needs a CUDA device, or TRITON_INTERPRET=1 set "
            f"before setdiv.kernels is imported (got a {x_NKD.device.type} tensor)"
        )
    return _SmoothChamfer.apply(x_NKD, y_MLD, alpha)
