"""Cayley transform of every b x b block of a layer in one launch: ``Q = 2 (I + S)^-1 - I``.

``S = (R - R^T) / 2``. ``I + S`` has symmetric part I, so Gauss-Jordan without pivoting is stable;
it runs on a ``[BN, BP, BP]`` register tile (BN blocks, b padded to the power of two BP with the
identity, which the elimination leaves untouched). ``(I + S)^-1`` is saved for the backward.
Maths in fp32 whatever R's dtype; Q is fp32 (as in ``torch_ops.cayley``). Blocks wider than
``MAX_REGISTER_BLOCK`` go to ``cayley_blocked`` (tiles in global memory, a launch per block column).
"""

import functools
from typing import Optional

import torch
from torch.library import wrap_triton

from . import cayley_blocked
from ._common import LAST_LAUNCH, interpreting, kernel_op, new_empty, next_pow2, tl, triton
from .cayley_blocked import _gauss_jordan

# The widest block the register kernels hold (Gauss-Jordan on a register tile of the whole block;
# the compile report: none spills up to 64): wider, ``cayley_blocked`` solves it as 32 x 32 tiles in
# global memory. The register tile spills 1.1-7.4 KB a thread at 96-128 on 4 warps (0.07-0.3 KB on
# 8), 39 KB at 160, and from 256 asks for more shared memory than an SM has.
MAX_REGISTER_BLOCK = 64


def candidates(b: int) -> list[dict]:
    """Tiles worth trying: 256..8192 values per program (one block when b is 64), warps growing
    with the tile."""
    bp = next_pow2(b)
    out = []
    for bn in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        size = bn * bp * bp
        if 256 <= size <= 8192 or (bn == 1 and size > 8192):
            out += [{"BN": bn, "num_warps": w} for w in (1, 2, 4, 8) if w <= max(1, size // 512)]
    return out or [{"BN": 1, "num_warps": 1}]


def default_config(b: int, n_blocks: int) -> dict:
    bp = next_pow2(b)
    bn = min(max(1, 4096 // (bp * bp)), next_pow2(n_blocks))
    return {"BN": bn, "num_warps": 4 if bn * bp * bp >= 2048 else 2}


@triton.jit
def _cayley_fwd_kernel(
    r_ptr, mask_ptr, q_ptr, ainv_ptr, NBLK,
    B: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)  # [BN] block ids
    o_r = tl.arange(0, BP)  # [BP] rows / columns
    m_n = o_n < NBLK
    m = m_n[:, None, None] & (o_r[:, None] < B)[None] & (o_r[None, :] < B)[None]  # [BN, BP, BP]
    o_base = o_n[:, None, None] * (B * B)
    o_blk = o_base + o_r[None, :, None] * B + o_r[None, None, :]  # [BN, BP, BP] R[i, j]
    o_blk_t = o_base + o_r[None, None, :] * B + o_r[None, :, None]  # R[j, i]
    b_r = tl.load(r_ptr + o_blk, mask=m, other=0.0).to(tl.float32)  # [BN, BP, BP]
    b_rt = tl.load(r_ptr + o_blk_t, mask=m, other=0.0).to(tl.float32)  # R^T
    b_eye = (o_r[:, None] == o_r[None, :]).to(tl.float32)[None, :, :]  # [1, BP, BP]
    # A = I + S; the padding (and out-of-range blocks) is the identity.
    b_a = b_eye + 0.5 * (b_r - b_rt)
    b_inv = b_eye + tl.zeros([BN, BP, BP], dtype=tl.float32)
    b_inv = _gauss_jordan(b_a, b_inv, o_r, B)
    b_q = 2.0 * b_inv - b_eye
    if HAS_MASK:
        b_drop = tl.load(mask_ptr + o_n, mask=m_n, other=0) != 0  # [BN]
        b_q = tl.where(b_drop[:, None, None], b_eye, b_q)
    tl.store(q_ptr + o_blk, b_q, mask=m)
    tl.store(ainv_ptr + o_blk, b_inv, mask=m)


@triton.jit
def _cayley_bwd_kernel(
    dq_ptr, ainv_ptr, mask_ptr, dr_ptr, NBLK,
    B: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_r = tl.arange(0, BP)
    m_n = o_n < NBLK
    m = m_n[:, None, None] & (o_r[:, None] < B)[None] & (o_r[None, :] < B)[None]  # [BN, BP, BP]
    o_blk = o_n[:, None, None] * (B * B) + o_r[None, :, None] * B + o_r[None, None, :]
    b_g = tl.load(dq_ptr + o_blk, mask=m, other=0.0).to(tl.float32)  # [BN, BP, BP] dl/dQ
    b_ai = tl.load(ainv_ptr + o_blk, mask=m, other=0.0).to(tl.float32)  # A^-1
    # W = G A^-T as a sum of rank-1 terms: W += G[:, k] (x) A^-1[:, k].
    b_w = tl.zeros([BN, BP, BP], dtype=tl.float32)
    for k in range(B):
        m_k = o_r == k
        b_gk = tl.sum(tl.where(m_k[None, None, :], b_g, 0.0), axis=2)  # [BN, BP] column k of G
        b_ak = tl.sum(tl.where(m_k[None, None, :], b_ai, 0.0), axis=2)  # column k of A^-1
        b_w += b_gk[:, :, None] * b_ak[:, None, :]
    # U = A^-T W = sum_k A^-1[k, :] (x) W[k, :], and U^T alongside (no register transpose).
    b_u = tl.zeros([BN, BP, BP], dtype=tl.float32)
    b_ut = tl.zeros([BN, BP, BP], dtype=tl.float32)
    for k in range(B):
        m_k = o_r == k
        b_ak = tl.sum(tl.where(m_k[None, :, None], b_ai, 0.0), axis=1)  # [BN, BP] row k of A^-1
        b_wk = tl.sum(tl.where(m_k[None, :, None], b_w, 0.0), axis=1)  # row k of W
        b_u += b_ak[:, :, None] * b_wk[:, None, :]
        b_ut += b_wk[:, :, None] * b_ak[:, None, :]
    # dl/dS = -2 U, dl/dR = (dl/dS - dl/dS^T) / 2 = U^T - U.
    b_dr = b_ut - b_u
    if HAS_MASK:
        b_drop = tl.load(mask_ptr + o_n, mask=m_n, other=0) != 0
        b_dr = tl.where(b_drop[:, None, None], 0.0, b_dr)
    tl.store(dr_ptr + o_blk, b_dr.to(dr_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=64)
def _autotuner(name: str, b: int):
    """triton.autotune over this block size's candidates (pre-pruned here rather than through a
    prune_configs_by hook, which torch.compile's support for user kernels handles poorly)."""
    configs = [triton.Config({"BN": c["BN"]}, num_warps=c["num_warps"]) for c in candidates(b)]
    return triton.autotune(configs, key=["B"])(_KERNELS[name])


def _flat_mask(mask: Optional[torch.Tensor], n_blocks: int) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    return mask.reshape(n_blocks).to(torch.int8).contiguous()


def _cayley_fwd_fake(R, mask):
    return R.new_empty(R.shape, dtype=torch.float32), R.new_empty(R.shape, dtype=torch.float32)


def _cayley_bwd_fake(dQ, ainv, mask, r_dtype):
    return ainv.new_empty(ainv.shape, dtype=r_dtype)


@kernel_op("boft_triton::cayley_fwd", _cayley_fwd_fake)
def cayley_fwd(R: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, (I + S)^-1)`` in fp32 for R ``[..., b, b]``; masked blocks give ``Q = I``."""
    b = R.shape[-1]
    R = R.contiguous()
    n_blocks = R.numel() // (b * b) if b else 0
    Q = new_empty(*R.shape, dtype=torch.float32, device=R.device)
    ainv = new_empty(*R.shape, dtype=torch.float32, device=R.device)
    m = _flat_mask(mask, n_blocks)
    if b > MAX_REGISTER_BLOCK and n_blocks:
        LAST_LAUNCH["cayley_fwd"] = ("blocked", {"P": cayley_blocked.tile()})
        cayley_blocked.forward_into(R, m, Q, ainv, n_blocks)
    else:
        _launch("cayley_fwd", n_blocks, b, (R, m, Q, ainv), m)
    return Q, ainv


@kernel_op("boft_triton::cayley_bwd", _cayley_bwd_fake)
def cayley_bwd(dQ: torch.Tensor, ainv: torch.Tensor, mask: Optional[torch.Tensor], r_dtype: torch.dtype) -> torch.Tensor:
    """``dl/dR`` from ``dl/dQ`` and the saved ``(I + S)^-1``; zero for masked blocks."""
    b = ainv.shape[-1]
    n_blocks = ainv.numel() // (b * b) if b else 0
    dR = new_empty(*ainv.shape, dtype=r_dtype, device=ainv.device)
    m = _flat_mask(mask, n_blocks)
    if b > MAX_REGISTER_BLOCK and n_blocks:
        LAST_LAUNCH["cayley_bwd"] = ("blocked", {"P": cayley_blocked.tile()})
        cayley_blocked.backward_into(dQ.contiguous(), ainv, m, dR, n_blocks)
    else:
        _launch("cayley_bwd", n_blocks, b, (dQ.contiguous(), ainv, m, dR), m)
    return dR


def _launch(name, n_blocks, b, args, mask):
    """Autotune on CUDA; under the interpreter (no GPU timer) use the default tile."""
    if n_blocks == 0:
        return
    bp = next_pow2(b)
    meta = {"B": b, "BP": bp, "HAS_MASK": mask is not None}
    if not interpreting():
        LAST_LAUNCH[name] = ("autotune", {})
        grid = lambda m: (triton.cdiv(n_blocks, m["BN"]),)  # noqa: E731
        wrap_triton(_autotuner(name, b))[grid](*args, n_blocks, **meta)
        return
    cfg = default_config(b, n_blocks)
    LAST_LAUNCH[name] = ("default", dict(cfg))
    grid = (triton.cdiv(n_blocks, cfg["BN"]),)
    wrap_triton(_KERNELS[name])[grid](*args, n_blocks, **meta, BN=cfg["BN"], num_warps=cfg["num_warps"])


_KERNELS = {"cayley_fwd": _cayley_fwd_kernel, "cayley_bwd": _cayley_bwd_kernel}


def _setup_context(ctx, inputs, output):
    R, mask = inputs
    _, ainv = output
    ctx.save_for_backward(ainv, mask)
    ctx.r_dtype = R.dtype
    ctx.mark_non_differentiable(ainv)


def _backward(ctx, grad_q, _grad_ainv):
    """Gradient of the Cayley transform, per block.

    With ``A = I + S`` and ``Q = 2 A^-1 - I``: ``dQ = -2 A^-1 dA A^-1`` and ``dA = dS``, so
    ``dl = <G, dQ> = -2 tr(G^T A^-1 dS A^-1) = <-2 A^-T G A^-T, dS>``, i.e.
    ``dl/dS = -2 A^-T G A^-T``. ``S = (R - R^T)/2`` gives ``dl/dR = (dl/dS - dl/dS^T)/2``.
    Masked blocks are the constant I, so their dl/dR is zero. The mask gets no gradient.
    """
    ainv, mask = ctx.saved_tensors
    if grad_q is None:
        return None, None
    return cayley_bwd(grad_q.float(), ainv, mask, ctx.r_dtype), None


cayley_fwd.register_autograd(_backward, setup_context=_setup_context)


def cayley(R: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Q = (I - S)(I + S)^-1`` in fp32 for R ``[..., b, b]``; same contract as ``torch_ops.cayley``."""
    return cayley_fwd(R, mask)[0]
