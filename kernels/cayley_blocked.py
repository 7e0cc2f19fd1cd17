"""The Cayley transform of blocks wider than a program holds (``b > cayley.MAX_REGISTER_BLOCK``), blocked.

``cayley``'s kernel runs Gauss-Jordan on a register tile of the whole block. Past 64 that tile
does not fit an SM (the compile report: 1.1-7.4 KB of spills a thread at b = 96-128, 39 KB at
160; from 256 it asks for 256 KB of shared memory, more than an H100 has, so the launch fails),
and PEFT's examples reach b = 160-512 (``boft_block_num=8``). Here a block lives in global memory as ``P x P`` tiles
(padded to a multiple of P with the identity) and Gauss-Jordan runs a block column at a time
(blocked in-place inversion). Step k updates every tile, reading one buffer and writing the
other (``_step_kernel``; on a GPU each program inverts the diagonal tile in registers, the
register kernel's elimination on ``P x P``)::

    A_kk <- A_kk^-1,  A_kj <- A_kk^-1 A_kj,  A_ik <- -A_ik A_kk^-1,  A_ij <- A_ij - A_ik A_kk^-1 A_kj

No pivoting, as in the register kernel: ``A = I + S`` has symmetric part I, and every Schur
complement of such a matrix has a positive definite symmetric part, so no pivot vanishes. The
backward is tiled products: ``W = G A^-T``, ``U = A^-T W``, ``dl/dR = U^T - U`` (``_w_kernel``,
``_dr_kernel``; the register kernel's maths). ``ceil(b/P) + 2`` launches forward, 2 backward, all
parameter-sized work; products fp32-exact (tf32x3 on a GPU).
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from ._common import interpreting, new_empty, tl, triton

# Tile of the blocked solve: 32 x 32 on 4 warps compiles without spills on sm_90 and sm_80 (the
# compile report); 64 x 64 tf32x3 products spill 0.7-9.7 KB on sm_80 (16 warps: on both).
GPU_TILE = 32
WARPS = 4
# The interpreter runs 128 x 128 tiles (its cost is per program and per operation, and it has no
# registers to run out of: at b = 320 the solve and its backward took 23 s at 64 x 64, 7 s here)
# and the diagonal tile's inverse as a launch of its own, INVERSE_BLOCKS blocks a program (its
# eliminations are a loop of P small operations); on a GPU each step's programs invert the
# diagonal tile themselves, one launch a step. Tests set TILE and INVERT_IN_STEP to run the GPU's
# way at small sizes.
INTERPRETER_TILE = 128
INVERSE_BLOCKS = 16
TILE: int | None = None
INVERT_IN_STEP: bool | None = None


def tile() -> int:
    """P, the side of the tiles this run uses."""
    return TILE or (INTERPRETER_TILE if interpreting() else GPU_TILE)


@triton.jit
def _gauss_jordan(b_a, b_inv, o_r, B: tl.constexpr):
    """``A^-1`` of each ``[BP, BP]`` tile of b_a ``[BN, BP, BP]`` (b_inv the identity on entry;
    lanes past B are the identity in both): Gauss-Jordan on ``[A | I]``. Step k scales row k by
    ``1/A[k,k]`` and removes column k from the other rows; with ``f = A[:, k] - e_k`` one rank-1
    update does both: ``A[k] - (A[k,k]-1) A[k]/A[k,k] = A[k]/A[k,k]``. Rows and columns are
    extracted with masked sums (no dynamic register indexing)."""
    for k in range(B):
        m_k = o_r == k  # [BP]
        b_row_a = tl.sum(tl.where(m_k[None, :, None], b_a, 0.0), axis=1)  # [BN, BP] row k
        b_row_i = tl.sum(tl.where(m_k[None, :, None], b_inv, 0.0), axis=1)
        b_col = tl.sum(tl.where(m_k[None, None, :], b_a, 0.0), axis=2)  # [BN, BP] column k
        b_piv = tl.sum(tl.where(m_k[None, :], b_col, 0.0), axis=1)  # [BN]
        b_row_a = b_row_a / b_piv[:, None]
        b_row_i = b_row_i / b_piv[:, None]
        b_f = b_col - m_k[None, :].to(tl.float32)
        b_a = b_a - b_f[:, :, None] * b_row_a[:, None, :]
        b_inv = b_inv - b_f[:, :, None] * b_row_i[:, None, :]
    return b_inv


@triton.jit
def _tile(i_t, NT: tl.constexpr, P: tl.constexpr):
    """Rows and columns of tile i_t of an ``NT x NT`` grid of ``P x P`` tiles."""
    return (i_t // NT) * P + tl.arange(0, P), (i_t % NT) * P + tl.arange(0, P)


@triton.jit
def _build_kernel(r_ptr, mask_ptr, a_ptr, B: tl.constexpr, BPAD: tl.constexpr, P: tl.constexpr,
                  NT: tl.constexpr, HAS_MASK: tl.constexpr):
    """``A = I + (R - R^T) / 2``, padded with the identity (the identity for masked blocks)."""
    i_n = tl.program_id(0).to(tl.int64)
    o_i, o_j = _tile(tl.program_id(1), NT, P)
    m = (o_i < B)[:, None] & (o_j < B)[None, :]
    base = r_ptr + i_n * (B * B)
    b_r = tl.load(base + o_i[:, None] * B + o_j[None, :], mask=m, other=0.0).to(tl.float32)
    b_rt = tl.load(base + o_j[None, :] * B + o_i[:, None], mask=m, other=0.0).to(tl.float32)
    b_eye = (o_i[:, None] == o_j[None, :]).to(tl.float32)
    b_a = b_eye + 0.5 * (b_r - b_rt)
    if HAS_MASK:
        b_a = tl.where(tl.load(mask_ptr + i_n) != 0, b_eye, b_a)
    tl.store(a_ptr + i_n * (BPAD * BPAD) + o_i[:, None] * BPAD + o_j[None, :], b_a)


@triton.jit
def _diagonal_inverse(a_in, o_n, k, BPAD: tl.constexpr, P: tl.constexpr):
    """``A_kk^-1`` of the blocks o_n ``[BN]``, ``[BN, P, P]``, by the register kernel's elimination."""
    o_p = tl.arange(0, P)
    o_k = k * P + o_p
    b_akk = tl.load(a_in + o_n[:, None, None] * (BPAD * BPAD) + (o_k[:, None] * BPAD + o_k[None, :])[None, :, :])
    return _gauss_jordan(b_akk, (o_p[:, None] == o_p[None, :]).to(tl.float32)[None, :, :], o_p, P)


@triton.jit
def _diagonal_inverse_kernel(a_in, kinv_ptr, k, n_blocks, BPAD: tl.constexpr, P: tl.constexpr, BN: tl.constexpr):
    """``A_kk^-1`` of BN blocks into ``kinv_ptr`` (``_step_kernel`` without INVERT_HERE). The
    interpreter's cost is per operation, so one program eliminates every block at once (blocks
    past n_blocks repeat the last one and are not stored)."""
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m_n = o_n < n_blocks
    o_n = tl.minimum(o_n, n_blocks - 1)
    o_p = tl.arange(0, P)
    tl.store(kinv_ptr + o_n[:, None, None] * (P * P) + (o_p[:, None] * P + o_p[None, :])[None, :, :],
             _diagonal_inverse(a_in, o_n, k, BPAD, P), mask=m_n[:, None, None])


@triton.jit
def _step_kernel(a_in, a_out, kinv_ptr, k, BPAD: tl.constexpr, P: tl.constexpr, NT: tl.constexpr,
                 INVERT_HERE: tl.constexpr, PRECISION: tl.constexpr):
    """Step k of the blocked inversion on tile (i, j) of block i_n (the module docstring's update).
    With INVERT_HERE (on a GPU) every program inverts ``A_kk`` itself, in registers: a ``P x P``
    elimination costs less than a launch of its own; otherwise (the interpreter, where each
    program's elimination is slow) ``_diagonal_inverse_kernel`` has left it at kinv_ptr."""
    i_n = tl.program_id(0).to(tl.int64)
    i_t = tl.program_id(1)
    o_i, o_j = _tile(i_t, NT, P)
    o_p = tl.arange(0, P)
    o_k = k * P + o_p
    base = a_in + i_n * (BPAD * BPAD)
    if INVERT_HERE:
        b_kinv = tl.reshape(_diagonal_inverse(a_in, i_n + tl.zeros([1], tl.int64), k, BPAD, P), (P, P))
    else:
        b_kinv = tl.load(kinv_ptr + i_n * (P * P) + o_p[:, None] * P + o_p[None, :])
    b_aij = tl.load(base + o_i[:, None] * BPAD + o_j[None, :])
    b_aik = tl.load(base + o_i[:, None] * BPAD + o_k[None, :])
    b_akj = tl.load(base + o_k[:, None] * BPAD + o_j[None, :])
    row_k = (i_t // NT) == k
    col_k = (i_t % NT) == k
    b_c = tl.dot(b_aik, b_kinv, input_precision=PRECISION)  # A_ik A_kk^-1
    # row k: A_kk^-1 A_kj; elsewhere A_ij - (A_ik A_kk^-1) A_kj
    b_left = tl.where(row_k, b_kinv, -b_c)
    b_out = tl.dot(b_left, b_akj, tl.where(row_k, 0.0, b_aij), input_precision=PRECISION)
    b_out = tl.where(col_k, tl.where(row_k, b_kinv, -b_c), b_out)  # column k: A_kk^-1, -A_ik A_kk^-1
    tl.store(a_out + i_n * (BPAD * BPAD) + o_i[:, None] * BPAD + o_j[None, :], b_out)


@triton.jit
def _finish_kernel(a_ptr, q_ptr, ainv_ptr, B: tl.constexpr, BPAD: tl.constexpr, P: tl.constexpr,
                   NT: tl.constexpr):
    """``Q = 2 A^-1 - I`` and ``A^-1``, unpadded."""
    i_n = tl.program_id(0).to(tl.int64)
    o_i, o_j = _tile(tl.program_id(1), NT, P)
    m = (o_i < B)[:, None] & (o_j < B)[None, :]
    b_inv = tl.load(a_ptr + i_n * (BPAD * BPAD) + o_i[:, None] * BPAD + o_j[None, :])
    off = i_n * (B * B) + o_i[:, None] * B + o_j[None, :]
    tl.store(ainv_ptr + off, b_inv, mask=m)
    tl.store(q_ptr + off, 2.0 * b_inv - (o_i[:, None] == o_j[None, :]).to(tl.float32), mask=m)


@triton.jit
def _w_kernel(dq_ptr, ainv_ptr, w_ptr, B: tl.constexpr, P: tl.constexpr, NT: tl.constexpr,
              PRECISION: tl.constexpr):
    """``W = G A^-T`` on tile (i, j): ``sum_k G[i, k] A^-1[j, k]``."""
    i_n = tl.program_id(0).to(tl.int64)
    o_i, o_j = _tile(tl.program_id(1), NT, P)
    base = i_n * (B * B)
    acc = tl.zeros([P, P], dtype=tl.float32)
    for k0 in range(0, B, P):
        o_k = k0 + tl.arange(0, P)
        b_g = tl.load(dq_ptr + base + o_i[:, None] * B + o_k[None, :],
                      mask=(o_i < B)[:, None] & (o_k < B)[None, :], other=0.0)
        b_at = tl.load(ainv_ptr + base + o_j[None, :] * B + o_k[:, None],
                       mask=(o_k < B)[:, None] & (o_j < B)[None, :], other=0.0)  # [k, j] = A^-1[j, k]
        acc = tl.dot(b_g, b_at, acc, input_precision=PRECISION)
    tl.store(w_ptr + base + o_i[:, None] * B + o_j[None, :], acc, mask=(o_i < B)[:, None] & (o_j < B)[None, :])


@triton.jit
def _dr_kernel(w_ptr, ainv_ptr, mask_ptr, dr_ptr, B: tl.constexpr, P: tl.constexpr, NT: tl.constexpr,
               HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """``dl/dR = U^T - U`` on tile (i, j), ``U = A^-T W``: ``U[i, j] = sum_k A^-1[k, i] W[k, j]``
    and ``U^T[i, j] = sum_k W[k, i] A^-1[k, j]``; zero for masked blocks."""
    i_n = tl.program_id(0).to(tl.int64)
    o_i, o_j = _tile(tl.program_id(1), NT, P)
    base = i_n * (B * B)
    m_i = o_i < B
    m_j = o_j < B
    b_u = tl.zeros([P, P], dtype=tl.float32)
    b_ut = tl.zeros([P, P], dtype=tl.float32)
    for k0 in range(0, B, P):
        o_k = k0 + tl.arange(0, P)
        m_k = o_k < B
        ai_t = tl.load(ainv_ptr + base + o_k[None, :] * B + o_i[:, None], mask=m_i[:, None] & m_k[None, :], other=0.0)
        w_kj = tl.load(w_ptr + base + o_k[:, None] * B + o_j[None, :], mask=m_k[:, None] & m_j[None, :], other=0.0)
        w_t = tl.load(w_ptr + base + o_k[None, :] * B + o_i[:, None], mask=m_i[:, None] & m_k[None, :], other=0.0)
        a_kj = tl.load(ainv_ptr + base + o_k[:, None] * B + o_j[None, :], mask=m_k[:, None] & m_j[None, :], other=0.0)
        b_u = tl.dot(ai_t, w_kj, b_u, input_precision=PRECISION)
        b_ut = tl.dot(w_t, a_kj, b_ut, input_precision=PRECISION)
    b_dr = b_ut - b_u
    if HAS_MASK:
        b_dr = tl.where(tl.load(mask_ptr + i_n) != 0, 0.0, b_dr)
    tl.store(dr_ptr + base + o_i[:, None] * B + o_j[None, :], b_dr.to(dr_ptr.dtype.element_ty),
             mask=m_i[:, None] & m_j[None, :])


# ---------------------------------------------------------------------------------------------
# launchers (called by ``cayley``'s ops for blocks past its register kernel)


def _precision() -> str:
    """fp32-exact products: tf32x3 on a GPU; the interpreter's dots are fp32 already."""
    return "ieee" if interpreting() else "tf32x3"


def _grid(b: int, p: int) -> tuple[int, int]:
    """(NT, BPAD): tiles per side and the padded block width, for P = p."""
    nt = triton.cdiv(b, p)
    return nt, nt * p


def forward_into(R: torch.Tensor, mask: torch.Tensor | None, Q: torch.Tensor, ainv: torch.Tensor, n_blocks: int) -> None:
    """Q and ``(I + S)^-1`` of the ``n_blocks`` contiguous ``b x b`` blocks of R."""
    b = R.shape[-1]
    p = tile()
    nt, bpad = _grid(b, p)
    bufs = [new_empty(n_blocks, bpad, bpad, dtype=torch.float32, device=R.device) for _ in range(2)]
    invert_here = INVERT_IN_STEP if INVERT_IN_STEP is not None else not interpreting()
    kinv = bufs[0] if invert_here else new_empty(n_blocks, p, p, dtype=torch.float32, device=R.device)
    bn = min(triton.next_power_of_2(n_blocks), INVERSE_BLOCKS)
    tiles = (n_blocks, nt * nt)
    wrap_triton(_build_kernel)[tiles](R, mask if mask is not None else R, bufs[0], B=b, BPAD=bpad, P=p, NT=nt,
                                      HAS_MASK=mask is not None, num_warps=WARPS)
    for k in range(nt):
        if not invert_here:
            wrap_triton(_diagonal_inverse_kernel)[(triton.cdiv(n_blocks, bn),)](bufs[0], kinv, k, n_blocks, BPAD=bpad, P=p,
                                                                                BN=bn, num_warps=WARPS)
        wrap_triton(_step_kernel)[tiles](bufs[0], bufs[1], kinv, k, BPAD=bpad, P=p, NT=nt, INVERT_HERE=invert_here,
                                         PRECISION=_precision(), num_warps=WARPS)
        bufs.reverse()
    wrap_triton(_finish_kernel)[tiles](bufs[0], Q, ainv, B=b, BPAD=bpad, P=p, NT=nt, num_warps=WARPS)


def backward_into(dQ: torch.Tensor, ainv: torch.Tensor, mask: torch.Tensor | None, dR: torch.Tensor, n_blocks: int) -> None:
    """dl/dR of the blocked forward (the register kernel's maths, tiled)."""
    b = ainv.shape[-1]
    p = tile()
    nt, _ = _grid(b, p)
    w = new_empty(n_blocks, b, b, dtype=torch.float32, device=ainv.device)
    tiles = (n_blocks, nt * nt)
    wrap_triton(_w_kernel)[tiles](dQ, ainv, w, B=b, P=p, NT=nt, PRECISION=_precision(), num_warps=WARPS)
    wrap_triton(_dr_kernel)[tiles](w, ainv, mask if mask is not None else ainv, dR, B=b, P=p, NT=nt,
                                   HAS_MASK=mask is not None, PRECISION=_precision(), num_warps=WARPS)


# ---------------------------------------------------------------------------------------------
# what a launch compiles (for the compile report: bench/kernel_profile.py)


def launch_specs(b: int, r_type: str = "bf16") -> list[dict]:
    """Every kernel the blocked solve of a b-wide block runs, as ``butterfly.launch_specs``' dicts
    (R and dl/dR in ``r_type``)."""
    nt, bpad = _grid(b, GPU_TILE)
    prec = "tf32x3"
    fp32, mask = "*fp32", "*i8"
    kernels = [
        ("build", _build_kernel, {"r_ptr": "*" + r_type, "mask_ptr": mask, "a_ptr": fp32},
         dict(B=b, BPAD=bpad, P=GPU_TILE, NT=nt, HAS_MASK=True)),
        ("step", _step_kernel, {"a_in": fp32, "a_out": fp32, "kinv_ptr": fp32, "k": "i32"},
         dict(BPAD=bpad, P=GPU_TILE, NT=nt, INVERT_HERE=True, PRECISION=prec)),
        ("finish", _finish_kernel, {"a_ptr": fp32, "q_ptr": fp32, "ainv_ptr": fp32}, dict(B=b, BPAD=bpad, P=GPU_TILE, NT=nt)),
        ("w", _w_kernel, {"dq_ptr": fp32, "ainv_ptr": fp32, "w_ptr": fp32}, dict(B=b, P=GPU_TILE, NT=nt, PRECISION=prec)),
        ("dr", _dr_kernel, {"w_ptr": fp32, "ainv_ptr": fp32, "mask_ptr": mask, "dr_ptr": "*" + r_type},
         dict(B=b, P=GPU_TILE, NT=nt, HAS_MASK=True, PRECISION=prec)),
    ]
    return [dict(name=f"cayley_blocked_{name}", fn=fn, signature=sig, constexprs=cst, divisible=(),
                 config={"P": GPU_TILE, "num_warps": WARPS}, num_warps=WARPS, num_stages=2)
            for name, fn, sig, cst in kernels]
