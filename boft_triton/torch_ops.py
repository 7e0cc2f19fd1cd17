"""The torch path of the functional ops: the same algorithm as the kernels, in plain torch ops.

Used on CPU tensors (and as the fallback when Triton is unavailable). Autograd differentiates
it directly; it is also what the kernels are tested against, beside the dense fp64 reference.
Permutations are index gathers and the block-diagonal products are batched matmuls, so no
n x n matrix is ever formed.
"""

from __future__ import annotations

import torch

from .geometry import butterfly_gathers


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


def _apply_factor(x: torch.Tensor, q: torch.Tensor, level: int) -> torch.Tensor:
    """``x B_level`` for rows x ``[T, n]``, with ``B = P blockdiag(q) P^T`` and q ``[D, b, b]``."""
    T, n = x.shape
    D, b, _ = q.shape
    if level:
        into, back = butterfly_gathers(n, b, level, x.device)
        x = x[:, into]  # x P
    y = torch.bmm(x.view(T, D, b).transpose(0, 1), q).transpose(0, 1).reshape(T, n)
    return y[:, back] if level else y  # y P^T


def butterfly(x: torch.Tensor, Q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x M`` (or ``x M^T``) over the last dim of x, ``M = B_{N-1} ... B_0``; Q is ``[N, D, b, b]``.

    Computes in fp32 and returns x's dtype.
    """
    shape, dtype = x.shape, x.dtype
    N = Q.shape[0]
    h = x.reshape(-1, shape[-1]).float()
    Q = Q.float()
    if transpose:  # x M^T = x B_0^T B_1^T ... B_{N-1}^T
        for level in range(N):
            h = _apply_factor(h, Q[level].transpose(-1, -2), level)
    else:  # x M = x B_{N-1} ... B_0
        for level in reversed(range(N)):
            h = _apply_factor(h, Q[level], level)
    return h.reshape(shape).to(dtype)
