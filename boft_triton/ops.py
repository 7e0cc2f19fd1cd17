"""The functional ops every adapter layer calls, and the choice of backend behind them.

``cayley(R, mask)`` and ``butterfly(x, Q, transpose)`` are differentiable. CUDA tensors go to the
Triton kernels (``boft_triton.kernels``), CPU tensors to the torch path (``torch_ops``); the
environment variable ``BOFT_TRITON_BACKEND=auto|triton|torch`` forces one (``triton`` together
with ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors, which is how CI tests them). Both
backends compute the same maths; a missing Triton on a GPU falls back to the torch path with one
warning, never to different maths.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import torch

from . import torch_ops
from .inference_memo import memoised

BACKENDS = ("auto", "triton", "torch")


@lru_cache(maxsize=1)
def _kernels():
    """The kernel modules, or the reason they cannot be used here."""
    try:
        from .kernels import butterfly as butterfly_kernels
        from .kernels import cayley as cayley_kernels
    except ImportError as err:  # triton missing or too old
        return None, f"{type(err).__name__}: {err}"
    return (cayley_kernels, butterfly_kernels), None


def requested_backend() -> str:
    backend = os.environ.get("BOFT_TRITON_BACKEND", "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"BOFT_TRITON_BACKEND must be one of {BACKENDS}, got {backend!r}.")
    return backend


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op on tensor ``t``."""
    backend = requested_backend()
    if backend == "torch":
        return "torch"
    if backend == "auto" and not t.is_cuda:
        return "torch"
    if backend == "triton" and not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "BOFT_TRITON_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
            "unset it (auto) to use the torch path on the CPU."
        )
    kernels, why = _kernels()
    if kernels is None:
        if backend == "triton":
            raise RuntimeError(f"BOFT_TRITON_BACKEND=triton but the Triton kernels cannot load ({why}).")
        _warn_fallback(why)
        return "torch"
    return "triton"


@lru_cache(maxsize=1)
def _warn_fallback(why: str) -> None:
    warnings.warn(
        f"boft_triton: Triton kernels unavailable ({why}); using the torch path (same maths, slower). "
        "Install triton>=3.6 to get the kernels.",
        RuntimeWarning,
        stacklevel=3,
    )


def cayley(R: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonal blocks ``Q = (I - S)(I + S)^-1``, ``S = (R - R^T)/2``, in fp32.

    R: ``[N, D, b, b]`` (any float dtype). mask: optional bool ``[N, D]``; True blocks give I.
    """
    if backend_for(R) == "triton":
        return _kernels()[0][0].cayley(R, mask)
    return torch_ops.cayley(R, mask)


def butterfly(x: torch.Tensor, Q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x M`` (``x M^T`` with transpose) over x's last dim, ``M = B_{N-1} ... B_0``.

    x: ``[..., n]`` in fp32/bf16/fp16; Q: ``[N, D, b, b]`` with ``n = D*b``. Returns x's dtype,
    accumulating in fp32. On a GPU every bf16/fp16/fp32 shape runs the kernels, however wide
    its blocks (``kernels.butterfly.runs_on_gpu``); fp64 takes the torch path.
    """
    if x.shape[-1] != Q.shape[1] * Q.shape[2]:
        raise ValueError(
            f"butterfly: input width {x.shape[-1]} does not match Q of shape {tuple(Q.shape)} (D*b = {Q.shape[1] * Q.shape[2]})."
        )
    if backend_for(x) == "triton":
        kernels = _kernels()[0][1]
        if not x.is_cuda or kernels.runs_on_gpu(x.shape[-1], Q.shape[2], Q.shape[0], x.dtype):
            return kernels.butterfly(x, Q, transpose)
    return torch_ops.butterfly(x, Q, transpose)


def segmented_butterfly(x: torch.Tensor, Qs: list[torch.Tensor], offsets: list[int]) -> torch.Tensor:
    """A mixed-adapter batch: rows ``[offsets[k], offsets[k+1])`` of x ``[T, n]`` times adapter
    k's ``M`` (``Qs[k]``, all of one shape ``[N, D, b, b]``). On the Triton backend one segmented
    launch per factor group covers every adapter (inference: no gradient); the torch path, and
    any call that needs gradients, runs one batched product per segment."""
    n = x.shape[-1]
    N, D, b, _ = Qs[0].shape
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(Q.requires_grad for Q in Qs))
    if not needs_grad and backend_for(x) == "triton":
        kernels = _kernels()[0][1]
        if not x.is_cuda or kernels.runs_on_gpu(n, b, N, x.dtype):
            stacked = memoised("stacked_q", tuple(Qs), lambda: torch.stack([Q.float() for Q in Qs]))  # once per decode, not per token
            return kernels.segmented_butterfly(x, stacked, offsets)
    parts = [butterfly(x[offsets[k]:offsets[k + 1]], Q) for k, Q in enumerate(Qs)]
    return torch.cat(parts) if parts else x
