"""Dense reference of DESIGN.md section 1, for tests and benchmarks only.

It builds the permutation matrices, the block-diagonal factors and the full rotation M, exactly
as the formulas read, in whatever dtype it is given (tests use fp64). Never use it for training:
it is quadratic in the layer width.
"""

from __future__ import annotations

import torch

from .geometry import butterfly_perm


def dense_cayley(R: torch.Tensor) -> torch.Tensor:
    b = R.shape[-1]
    S = (R - R.transpose(-1, -2)) / 2
    eye = torch.eye(b, dtype=R.dtype, device=R.device)
    return (eye - S) @ torch.linalg.inv(eye + S)


def dense_permutation(n: int, block_size: int, level: int, dtype=torch.float64) -> torch.Tensor:
    perm = butterfly_perm(n, block_size, level)
    P = torch.zeros(n, n, dtype=dtype)
    P[torch.arange(n), perm] = 1
    return P


def dense_rotation(Q: torch.Tensor) -> torch.Tensor:
    """``M = B_{N-1} ... B_0`` with ``B_i = P_i blockdiag(Q_i) P_i^T``; Q is ``[N, D, b, b]``."""
    N, D, b, _ = Q.shape
    n = D * b
    M = torch.eye(n, dtype=Q.dtype, device=Q.device)
    for i in range(N):
        P = dense_permutation(n, b, i, Q.dtype).to(Q.device)
        B = P @ torch.block_diag(*Q[i].unbind(0)) @ P.T
        M = B @ M
    return M


def group_blocks(Q: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """The dense blocks ``[n/W, W, W]`` of ``B_{k1-1} ... B_{k0}`` (one group of factors), in Q's
    dtype: the block layout the Triton kernels build in registers (``kernels/butterfly.py``), as a
    specification the tests hold them to.

    Layout: factor i mixes, inside a coarse block of ``L = 2^N h`` columns (``h = b/2``), an
    h-chunk's offset with bit i of its chunk index. So factors ``k0..k1-1`` act on blocks of
    ``W = 2^(k1-k0) h`` columns with fixed outer bits and fixed low bits ``j < S = 2^k0``: block
    ``o*S + j`` holds columns ``o*(S*W) + m*(S*h) + j*h + off`` (``m < 2^(k1-k0)``, ``off < h``),
    rows and columns in that (m, off) order. With k0 = 0 the blocks are contiguous.

    Built level by level, ``P_k = B_k P_{k-1}``: the first level's blocks are its Q blocks (block
    ``o*S + j`` of the group is Q block ``o*S + j`` of that level); then factor k mixes the h-offset
    with bit k of the chunk index, so a block of ``P_k`` is two blocks of ``P_{k-1}`` (bit k = 0, 1)
    multiplied by the h x h quadrants of the Q blocks that pair them: one einsum per level.
    """
    N, D, b, _ = Q.shape
    if N == 1:
        return Q[0]
    h, S = b // 2, 1 << k0
    levels = Q.unbind(0)  # (its backward stacks the level gradients: one pass, not one per level)
    blocks = levels[k0]  # [D, b, b]
    for k in range(k0 + 1, k1):
        Y, W = 1 << (k - k0), blocks.shape[-1]  # chunks below bit k in the group, width of P_{k-1}
        outer = D >> k
        A = blocks.reshape(outer, 2, S, Y, h, W)  # [outer, bit k, low bits, y, row offset, col]
        q = levels[k].reshape(outer, Y, S, 2, h, 2, h)  # [outer, y, low bits, row half, o, col half, o']
        blocks = torch.einsum("nyjaobp,nbjypc->njayobc", q, A).reshape(outer * S, 2 * W, 2 * W)
    return blocks


def dense_group(Q: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """``B_{k1-1} ... B_{k0}`` as an ``n x n`` matrix: ``group_blocks`` scattered to the columns its
    layout names."""
    N, D, b, _ = Q.shape
    blocks = group_blocks(Q, k0, k1)
    h, S, W, n = (b // 2 if N > 1 else b), 1 << k0, blocks.shape[-1], D * b
    out = torch.zeros(n, n, dtype=blocks.dtype, device=blocks.device)
    t = torch.arange(W, device=blocks.device)
    for blk in range(n // W):
        cols = (blk // S) * (S * W) + (t // h) * (S * h) + (blk % S) * h + t % h
        out[cols[:, None], cols[None, :]] = blocks[blk]
    return out


def dense_forward(x, R, weight, scale, bias=None, mask=None):
    """``y = ((x M) W^T) * s + bias`` for one adapter; ``mask`` [N, D] makes blocks identity."""
    Q = dense_cayley(R)
    if mask is not None:
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        Q = torch.where(mask[..., None, None], eye, Q)
    y = (x @ dense_rotation(Q)) @ weight.T * scale.reshape(-1)
    return y if bias is None else y + bias
