"""The torch path of the functional ops: the same algorithm as the kernels, in plain torch ops.

Used on CPU tensors (and as the fallback when Triton is unavailable); the kernels are tested
against it and against the dense fp64 reference. The block-diagonal products are batched
matmuls and the permutations reshapes and permutes of the activations (as in the kernels'
registers), so no n x n matrix and no index tensor is ever formed, and the path compiles with
``torch.compile`` as it is.
"""

from __future__ import annotations

import torch

from .inference_memo import memoised



def cayley(R: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Q = (I - S)(I + S)^-1`` with ``S = (R - R^T)/2`` for every block, in fp32.

    R is ``[..., b, b]``; mask (bool, R's leading shape) makes the masked blocks the identity.
    The solve is the one PEFT uses, so results agree with PEFT to the last bits.
    """
    R = R.float()
    b = R.shape[-1]
    S = 0.5 * (R - R.transpose(-1, -2))
    eye = torch.eye(b, device=R.device, dtype=R.dtype).expand_as(S)
    Q = torch.linalg.solve(eye + S, eye - S, left=False)
    if mask is not None:
        Q = torch.where(mask[..., None, None], eye, Q)
    return Q


def _factor_order(n_factors: int, transpose: bool) -> list[int]:
    """Levels in the order they act on row vectors: ``x M = x B_{N-1} ... B_0``,
    ``x M^T = x B_0^T ... B_{N-1}^T``."""
    return list(range(n_factors)) if transpose else list(reversed(range(n_factors)))


def _to_blocks(h: torch.Tensor, level: int, D: int, b: int) -> torch.Tensor:
    """``(h P_level)`` viewed as ``[D, T, b]`` (block-major, for bmm).

    Inside a group of ``b 2^level`` columns, block y of ``h P`` is half-block y of the group's
    first half followed by half-block y of its second half: a reshape and a permute, no index.
    """
    T, n = h.shape
    if level == 0:
        return h.view(T, D, b).transpose(0, 1)
    y = 2**level  # blocks per group
    h = h.view(T, n // (b * y), 2, y, b // 2).permute(0, 1, 3, 2, 4)  # [T, group, block, half, b/2]
    return h.reshape(T, D, b).transpose(0, 1)


def _from_blocks(blocks: torch.Tensor, level: int) -> torch.Tensor:
    """Inverse of ``_to_blocks``: ``[D, T, b]`` -> ``(.) P_level^T`` as ``[T, n]``."""
    D, T, b = blocks.shape
    h = blocks.transpose(0, 1)
    if level == 0:
        return h.reshape(T, D * b)
    y = 2**level
    h = h.reshape(T, D // y, y, 2, b // 2).permute(0, 1, 3, 2, 4)  # [T, group, half, block, b/2]
    return h.reshape(T, D * b)


def _apply(h: torch.Tensor, Q: torch.Tensor, level: int, transpose: bool) -> torch.Tensor:
    """``h B_level`` (or ``h B_level^T``), ``B = P blockdiag(Q_level) P^T``."""
    D, b = Q.shape[1], Q.shape[2]
    q = Q[level].transpose(-1, -2) if transpose else Q[level]
    return _from_blocks(torch.bmm(_to_blocks(h, level, D, b), q), level)


class _Butterfly(torch.autograd.Function):
    """``y = x M`` (or ``x M^T``) saving only x and Q; backward recomputes the factor inputs.

    For a factor ``y_i = u_i B_i`` with ``B_i = P_i blockdiag(Q_i) P_i^T`` and upstream ``g_i``:
    ``dl/du_i = g_i B_i^T`` and ``dl/dQ_i[j] = sum_rows (u_i P_i)[:, j]^T (g_i P_i)[:, j]``
    (block j of width b). For the transposed factor ``u B_i^T`` the block gradient is transposed.
    Factors are visited in reverse order of application, so ``dl/dx = g M^T`` (or ``g M``).
    """

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, Q: torch.Tensor, transpose: bool) -> torch.Tensor:
        h = x2d.float()
        for level in _factor_order(Q.shape[0], transpose):
            h = _apply(h, Q, level, transpose)
        ctx.save_for_backward(x2d, Q)
        ctx.transpose = transpose
        return h.to(x2d.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2d, Q = ctx.saved_tensors
        transpose = ctx.transpose
        D, b = Q.shape[1], Q.shape[2]
        order = _factor_order(Q.shape[0], transpose)
        inputs, h = [], x2d.float()
        for level in order:  # recompute the input of every factor
            inputs.append(h)
            h = _apply(h, Q, level, transpose)
        g = grad_out.float()
        grad_q = torch.zeros_like(Q) if ctx.needs_input_grad[1] else None
        for level, u in zip(reversed(order), reversed(inputs)):
            g_blocks = _to_blocks(g, level, D, b)
            if grad_q is not None:
                dq = torch.bmm(_to_blocks(u, level, D, b).transpose(1, 2), g_blocks)  # [D, b, b]
                grad_q[level] += dq.transpose(-1, -2) if transpose else dq
            q = Q[level] if transpose else Q[level].transpose(-1, -2)  # B^T for xM, B for xM^T
            g = _from_blocks(torch.bmm(g_blocks, q), level)
        grad_x = g.to(x2d.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_q, None


def coarse_blocks(Q: torch.Tensor) -> torch.Tensor:
    """M's diagonal blocks ``[n/L, L, L]``, ``L = b 2^(N-1)`` (M is block-diagonal at that size).

    Rows of ``H = [I_L I_L ... I_L]`` times M are exactly those blocks side by side, so the factor
    path builds them from an L-row input: cheap, differentiable, and never n x n.
    """
    N, D, b, _ = Q.shape
    if N == 1:
        return Q[0]
    L, n = b * 2 ** (N - 1), D * b
    eye_rows = torch.eye(L, device=Q.device, dtype=Q.dtype).repeat(1, n // L)  # [L, n]
    return _Butterfly.apply(eye_rows, Q, False).view(L, n // L, L).transpose(0, 1)


# Matmuls narrower than this waste most of a CPU's vector units; pack blocks up to it.
MIN_MATMUL_WIDTH = 32


def _packed(blocks: torch.Tensor) -> torch.Tensor:
    """Group g consecutive ``L x L`` blocks into one block-diagonal ``gL x gL`` block, so the
    batched matmul runs on at least ``MIN_MATMUL_WIDTH`` columns (still O(n L), never n x n)."""
    C, L, _ = blocks.shape
    g = 1
    while g * L < MIN_MATMUL_WIDTH and C % (2 * g) == 0:
        g *= 2
    if g == 1:
        return blocks
    eye = torch.eye(g, device=blocks.device, dtype=blocks.dtype)
    grouped = torch.einsum("cgij,gh->cgihj", blocks.view(C // g, g, L, L), eye)
    return grouped.reshape(C // g, g * L, g * L)


def _blocks_of(Q: torch.Tensor) -> torch.Tensor:
    """Q's packed coarse blocks; in inference built once per value of Q (decoding)."""
    return memoised("coarse_blocks", (Q,), lambda: _packed(coarse_blocks(Q.float())))


def butterfly(x: torch.Tensor, Q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x M`` (or ``x M^T``) over the last dim of x, ``M = B_{N-1} ... B_0``; Q is ``[N, D, b, b]``.

    Computes in fp32 and returns x's dtype. The rows are multiplied by M's coarse blocks in one
    batched matmul, which on CPUs beats N passes of small strided copies; the factor-by-factor
    ``_Butterfly`` (the kernels' algorithm) builds those blocks. Saved for backward: x and the
    ``n x L`` coarse blocks.
    """
    shape, n = x.shape, x.shape[-1]
    blocks = _blocks_of(Q)
    if transpose:
        blocks = blocks.transpose(-1, -2)
    L = blocks.shape[-1]
    rows = x.reshape(-1, n // L, L).float().transpose(0, 1)  # [n/L, T, L]
    y = torch.bmm(rows, blocks).transpose(0, 1)
    return y.reshape(shape).to(x.dtype)
