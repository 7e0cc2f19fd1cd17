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


def dense_forward(x, R, weight, scale, bias=None, mask=None):
    """``y = ((x M) W^T) * s + bias`` for one adapter; ``mask`` [N, D] makes blocks identity."""
    Q = dense_cayley(R)
    if mask is not None:
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
        Q = torch.where(mask[..., None, None], eye, Q)
    y = (x @ dense_rotation(Q)) @ weight.T * scale.reshape(-1)
    return y if bias is None else y + bias
