"""Butterfly rotation of rows, ``y = x M`` (or ``x M^T``), as dense block products on tensor cores.

``M = B_{N-1} ... B_0`` is block-diagonal with coarse blocks of ``L = b 2^(N-1)`` columns, so
(as Monarch matrices and FlashFFTConv do with structured products) the rotation is applied as
dense ``L x L`` block products with ``tl.dot``:

1. **Blocks once per call.** ``torch_ops.group_blocks`` builds the blocks ``Mc`` (fp32) from Q
   with a few batched torch ops (cost O(n L N b), nothing next to the T n L of the product); their
   backward ``dMc -> dQ`` is that builder's autograd, and the Cayley backward runs as before.
2. **Residual form.** The kernels apply ``y_c = x_c + x_c Delta_c`` with ``Delta = Mc - I``, so the
   identity part of M is exact and only the (small) rotation is rounded to x's dtype for the dot.
   Operands are x's dtype (bf16/fp16) with fp32 accumulation; fp32 inputs use ``tf32x3`` (fp32
   accuracy on tensor cores). Programs are persistent over row tiles: each loads its Delta tile
   once, then streams rows, so x is read once and y written once.
3. **Backward.** ``dx = g Mc^T = g + g Delta^T`` and ``dDelta = sum_rows x_c^T g_c`` in one pass over
   (x, g). The row sum is deterministic: fixed row *splits* (set by T and the device) each write a
   partial that torch sums, and inside a split rows are reduced in chunks of a fixed ``RC`` rows
   (not a tuned parameter). No float atomics; the bits do not depend on the tile config. When x
   needs no gradient the dx half is compiled out; when Q needs none, dx is the forward kernel with
   the transpose flipped.
4. **Every (b, N).**
   - small coarse blocks (below tl.dot's 16): several consecutive blocks are packed into one
     block-diagonal block of at least 16 columns (``pack``), so every product is a 16-wide dot;
   - large coarse blocks (``L > MAX_BLOCK``): the factors are applied in groups of consecutive
     levels, each group with its own dense blocks of at most MAX_BLOCK columns (a group of high
     levels acts on interleaved columns; the kernels gather them with a column map).

Widths that are not a power of two are padded to one (masked lanes, zero Delta).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.library import wrap_triton

from boft_triton import torch_ops

from ._common import LAST_LAUNCH, cached_config, interpreting, kernel_op, new_empty, next_pow2, num_sms, tl, triton

# Widest dense block a program holds (its Delta tile and, backward, its dDelta accumulator).
MAX_BLOCK = 128
# tl.dot needs every dim >= 16: narrower blocks are packed (or padded) to this width.
MIN_BLOCK = 16
# Rows per step of the backward's dDelta reduction: fixed (never tuned) so the bits of dQ do not
# depend on the tile config.
RC = 64


# ---------------------------------------------------------------------------------------------
# plan: groups of factors, their block layout


@functools.lru_cache(maxsize=1024)
def plan(n: int, b: int, N: int) -> tuple[dict, ...]:
    """The groups of factors of an (n, b, N) butterfly, in the order they act on ``x M``.

    Each group: levels ``[k0, k1)``, block width W, column interleave S and chunk H (see
    ``torch_ops.group_blocks``), pack (consecutive blocks merged block-diagonally), and the
    padded power-of-two width WP the kernels tile. ``x M^T`` runs the groups in reverse."""
    if N > 1 and b % 2:
        raise ValueError(f"butterfly: block size {b} must be even with {N} factors")
    chunk = b // 2 if N > 1 else b
    L = chunk << N if N > 1 else b
    if n % L:
        raise ValueError(f"butterfly: width {n} is not a multiple of the coarse block {L} (b={b}, N={N})")
    groups, k0 = [], 0
    while k0 < N:  # greedy: as many levels per group as fit MAX_BLOCK (at least one)
        k1 = k0 + 1
        while k1 < N and (chunk << (k1 + 1 - k0)) <= MAX_BLOCK:
            k1 += 1
        groups.append((k0, k1))
        k0 = k1
    out = []
    for k0, k1 in groups:
        W = chunk << (k1 - k0) if N > 1 else b
        S = 1 << k0
        NB = n // W
        pack = 1
        if S == 1 and W < MIN_BLOCK:  # merge consecutive blocks up to a 16-wide dot
            pack = next((p for p in range(-(-MIN_BLOCK // W), 2 * MIN_BLOCK) if NB % p == 0 and p * W <= 2 * MIN_BLOCK), 1)
        Wp = W * pack
        out.append(dict(k0=k0, k1=k1, W=W, S=S, H=chunk if S > 1 else Wp, pack=pack, WB=Wp, NB=NB // pack,
                        WP=max(MIN_BLOCK, next_pow2(Wp))))
    return tuple(reversed(out))  # x M = x B_{N-1} ... B_0: the highest levels act first


def path_name(n: int, b: int, N: int) -> str:
    groups = plan(n, b, N)
    widths = "+".join(str(g["WP"]) for g in reversed(groups))
    return f"dot{widths}" + (f"-pack{groups[-1]['pack']}" if groups[-1]["pack"] > 1 else "")


def deltas(Q: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``Delta = blocks - I`` of every group (fp32, differentiable in Q), in ``plan`` order."""
    N, D, b, _ = Q.shape
    out = []
    for g in plan(n, b, N):
        blocks = torch_ops.group_blocks(Q.float(), g["k0"], g["k1"])
        if g["pack"] > 1:
            blocks = _packed(blocks, g["pack"])
        if g["pack"] > 1 or (N > 1 and g["k1"] - g["k0"] > 1):  # a fresh tensor: Delta in place
            blocks.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        else:  # a view of Q itself
            blocks = blocks - torch.eye(g["WB"], device=Q.device, dtype=blocks.dtype)
        out.append(blocks)
    return out


def _packed(blocks: torch.Tensor, p: int) -> torch.Tensor:
    """``[C, W, W]`` -> ``[C/p, pW, pW]``: each p consecutive blocks as one block-diagonal block."""
    C, W, _ = blocks.shape
    eye = torch.eye(p, device=blocks.device, dtype=blocks.dtype)
    return torch.einsum("cpij,pq->cpiqj", blocks.view(C // p, p, W, W), eye).reshape(C // p, p * W, p * W)


# ---------------------------------------------------------------------------------------------
# configs


def candidates(n: int, b: int, N: int, kind: str) -> list[dict]:
    """Configs worth trying: forward rows per tile BT, programs per SM (persistence), warps,
    stages; the backward's row chunk is fixed (RC), so it tunes programs per SM, warps, stages."""
    WP = max(g["WP"] for g in plan(n, b, N))
    out = []
    for warps in (4, 8):
        for stages in (2, 3):
            for pps in (2, 4, 8):
                if kind == "fwd":
                    for BT in (32, 64, 128):
                        if BT * WP <= 128 * 128:
                            out.append({"BT": BT, "PPS": pps, "num_warps": warps, "num_stages": stages})
                else:
                    out.append({"PPS": pps, "num_warps": warps, "num_stages": stages})
    return out


def default_config(n: int, b: int, N: int, kind: str, T: int = 0) -> dict:
    """The untuned config: 64-row tiles (128 for narrow blocks), 4 programs per SM, 8 warps where
    the tiles need the registers (forward at 128-wide blocks; backward from 64-wide ones, whose
    dDelta accumulator takes 201 registers a thread on sm_80 with 4 warps, 175 with 8; 113 / 67 on
    sm_90), else 4."""
    WP = max(g["WP"] for g in plan(n, b, N))
    if kind == "fwd":
        return {"BT": 128 if WP <= 32 else 64, "PPS": 4, "num_warps": 8 if WP >= 128 else 4, "num_stages": 3}
    return {"PPS": 4, "num_warps": 8 if WP >= 64 else 4, "num_stages": 2}


_REQUIRED = {"fwd": ("BT", "PPS", "num_warps"), "bwd": ("PPS", "num_warps")}
_FORCED: dict[str, dict] = {}


@contextlib.contextmanager
def forced_config(kind: str, cfg: dict):
    """Launch ``kind`` ("fwd"/"bwd") kernels with ``cfg`` inside the block (used by tuning)."""
    _FORCED[kind] = cfg
    try:
        yield
    finally:
        _FORCED.pop(kind, None)


def pick_config(kind: str, n: int, b: int, N: int, dtype: torch.dtype, device: torch.device) -> tuple[str, dict]:
    """(source, config): forced, else the tuning cache's entry, else the default."""
    if kind in _FORCED:
        return "forced", _FORCED[kind]
    cfg = cached_config(kind, n, b, N, dtype, device)
    if cfg is not None and all(k in cfg for k in _REQUIRED[kind]):
        return "cache", cfg
    return "default", default_config(n, b, N, kind)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _columns(i_b, WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, H: tl.constexpr):
    """Columns [WP] of block i_b (see torch_ops.group_blocks) and their mask."""
    o_w = tl.arange(0, WP)
    if S == 1:
        o_col = i_b * WB + o_w
    else:
        o_col = (i_b // S) * (S * WB) + (o_w // H) * (S * H) + (i_b % S) * H + o_w % H
    return o_col, o_w < WB


@triton.jit
def _load_delta(d_ptr, i_b, TRANS: tl.constexpr, WB: tl.constexpr, WP: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Block i_b of Delta as a [WP, WP] dot operand (Delta^T with TRANS), zero padded."""
    o_w = tl.arange(0, WP)
    m_w = o_w < WB
    if TRANS:
        o_d = o_w[None, :] * WB + o_w[:, None]
    else:
        o_d = o_w[:, None] * WB + o_w[None, :]
    b_d = tl.load(d_ptr + i_b * (WB * WB) + o_d, mask=m_w[:, None] & m_w[None, :], other=0.0)
    return b_d.to(DOT_DTYPE)


@triton.jit
def _apply_kernel(
    x_ptr, d_ptr, y_ptr, T, n,
    WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, H: tl.constexpr, TRANS: tl.constexpr,
    BT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """``y = x + x Delta`` (``x + x Delta^T`` with TRANS) on block i_b's columns, for row tiles
    i_p, i_p + P, ... (persistent: the Delta tile is loaded once per program)."""
    i_p = tl.program_id(0).to(tl.int64)  # int64 row offsets for large T*n
    i_b = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(0)
    o_col, m_col = _columns(i_b, WB, WP, S, H)  # [WP]
    b_d = _load_delta(d_ptr, i_b, TRANS, WB, WP, DOT_DTYPE)  # [WP, WP]
    for i_t in range(i_p, tl.cdiv(T, BT), n_p):
        o_t = i_t * BT + tl.arange(0, BT)
        o_x = o_t[:, None] * n + o_col[None, :]  # [BT, WP]
        m_x = (o_t < T)[:, None] & m_col[None, :]
        b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0)
        b_y = b_x.to(tl.float32) + tl.dot(b_x.to(DOT_DTYPE), b_d, input_precision=PRECISION)
        tl.store(y_ptr + o_x, b_y.to(y_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _grad_kernel(
    x_ptr, g_ptr, d_ptr, dx_ptr, dd_ptr, T, n, ROWS, NB,
    WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, H: tl.constexpr, TRANS: tl.constexpr,
    WRITE_DX: tl.constexpr, RC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows [i_s ROWS, (i_s+1) ROWS) of block i_b: ``dx = g + g Delta^T`` (``g + g Delta`` with
    TRANS) and this split's partial ``dDelta = x^T g`` (``g^T x``), reduced RC rows at a time."""
    i_s = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_col, m_col = _columns(i_b, WB, WP, S, H)
    if WRITE_DX:
        b_dt = _load_delta(d_ptr, i_b, not TRANS, WB, WP, DOT_DTYPE)  # [WP, WP]
    b_dd = tl.zeros([WP, WP], dtype=tl.float32)
    row_lo = i_s * ROWS
    row_hi = tl.minimum(row_lo + ROWS, T)
    for t0 in range(row_lo, row_hi, RC):
        o_t = t0 + tl.arange(0, RC)
        o_x = o_t[:, None] * n + o_col[None, :]  # [RC, WP]
        m_x = (o_t < row_hi)[:, None] & m_col[None, :]
        b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(DOT_DTYPE)
        b_g = tl.load(g_ptr + o_x, mask=m_x, other=0.0)
        b_gd = b_g.to(DOT_DTYPE)
        if WRITE_DX:
            b_dx = b_g.to(tl.float32) + tl.dot(b_gd, b_dt, input_precision=PRECISION)
            tl.store(dx_ptr + o_x, b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)
        if TRANS:
            b_dd = tl.dot(tl.trans(b_gd), b_x, b_dd, input_precision=PRECISION)
        else:
            b_dd = tl.dot(tl.trans(b_x), b_gd, b_dd, input_precision=PRECISION)
    o_w = tl.arange(0, WP)
    m_w = o_w < WB
    o_dd = (i_s * NB + i_b) * (WB * WB) + o_w[:, None] * WB + o_w[None, :]
    tl.store(dd_ptr + o_dd, b_dd, mask=m_w[:, None] & m_w[None, :])


# ---------------------------------------------------------------------------------------------
# launchers


def _dot_meta(dtype: torch.dtype) -> dict:
    """Dot operands in x's dtype (fp32 inputs: tf32x3, fp32-accurate on tensor cores). The
    interpreter computes bf16 dots wrongly, so there the operands are upcast to fp32."""
    if dtype == torch.float32 or interpreting():
        return dict(DOT_DTYPE=tl.float32, PRECISION="tf32x3" if dtype == torch.float32 and not interpreting() else "ieee")
    return dict(DOT_DTYPE=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, PRECISION="ieee")


def _group_meta(group: dict) -> dict:
    return dict(WB=group["WB"], WP=group["WP"], S=group["S"], H=group["H"])


def _group_of(n: int, delta: torch.Tensor, interleave: int, chunk: int) -> dict:
    NB, WB, _ = delta.shape
    return dict(WB=WB, WP=max(MIN_BLOCK, next_pow2(WB)), S=interleave, H=chunk if interleave > 1 else WB, NB=NB)


def _splits(T: int, NB: int, WP: int, device: torch.device) -> tuple[int, int]:
    """Row splits of the backward, set by T, the shape and the device only (never the tile config,
    so the dDelta reduction order, hence its bits, do not change with tuning): (splits, rows per
    split). Each split covers at least 8 WP rows, so its Delta read and dDelta partial (WP^2
    values each) cost at most about 1/8 of the bytes its rows move."""
    if T == 0:  # an empty batch: one (zero) partial, as the launcher returns
        return 1, 0
    want = max(1, -(-4 * num_sms(device) // max(NB, 1)))
    splits = max(1, min(-(-T // (4 * RC)), want, T // (8 * WP)))
    rows = -(-T // splits)
    rows = -(-rows // RC) * RC
    return -(-T // rows), rows


def apply_into(x, delta, transpose, interleave, chunk, y, key) -> None:
    """``y = x + x Delta`` per block (``Delta^T`` with transpose), x and y contiguous ``[T, n]``."""
    T, n = x.shape
    if T == 0:
        return
    grp = _group_of(n, delta, interleave, chunk)
    source, cfg = pick_config("fwd", *key, x.dtype, x.device)
    LAST_LAUNCH["butterfly_fwd"] = (source, dict(cfg))
    BT = cfg["BT"]
    # enough programs to fill the device (PPS per SM), each with at least 4 WP rows, so that its
    # Delta tile (WP^2 values) costs at most 1/8 of the bytes its rows move
    programs = min(triton.cdiv(T, BT), max(1, triton.cdiv(cfg["PPS"] * num_sms(x.device), grp["NB"])),
                   max(1, T // (4 * grp["WP"])))
    wrap_triton(_apply_kernel)[(programs, grp["NB"])](
        x, delta, y, T, n, WB=grp["WB"], WP=grp["WP"], S=grp["S"], H=grp["H"], TRANS=transpose, BT=BT,
        **_dot_meta(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
    )


def grad(x, g, delta, transpose, interleave, chunk, need_dx, key):
    """``(dx or None, dDelta partials [splits, NB, W, W])`` of ``y = x + x Delta`` (``Delta^T``)
    for contiguous x, g; the caller sums the partials (fixed order: deterministic)."""
    T, n = x.shape
    grp = _group_of(n, delta, interleave, chunk)
    dx = new_empty(T, n, dtype=x.dtype, device=x.device) if need_dx else None
    if T == 0:
        return dx, torch.zeros((1, *delta.shape), dtype=torch.float32, device=x.device)
    source, cfg = pick_config("bwd", *key, x.dtype, x.device)
    LAST_LAUNCH["butterfly_bwd"] = (source, dict(cfg))
    splits, rows = _splits(T, grp["NB"], grp["WP"], x.device)
    partial = new_empty(splits, *delta.shape, dtype=torch.float32, device=x.device)
    wrap_triton(_grad_kernel)[(splits, grp["NB"])](
        x, g, delta, dx if need_dx else x, partial, T, n, rows, grp["NB"],
        WB=grp["WB"], WP=grp["WP"], S=grp["S"], H=grp["H"], TRANS=transpose, WRITE_DX=need_dx, RC=RC,
        **_dot_meta(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2),
    )
    return dx, partial


# ---------------------------------------------------------------------------------------------
# ops and autograd


def _block_apply_fake(x, delta, delta_op, transpose, interleave, chunk, n, b, N):
    return x.new_empty(x.shape)


def _block_grad_fake(x, g, delta_op, transpose, interleave, chunk, need_dx, n, b, N):
    splits, _ = _splits(x.shape[0], delta_op.shape[0], max(MIN_BLOCK, next_pow2(delta_op.shape[-1])), x.device)
    return x.new_empty(x.shape), delta_op.new_empty((splits, *delta_op.shape), dtype=torch.float32)


@kernel_op("boft_triton::block_apply", _block_apply_fake)
def block_apply(x: torch.Tensor, delta: torch.Tensor, delta_op: torch.Tensor, transpose: bool, interleave: int,
                chunk: int, n: int, b: int, N: int) -> torch.Tensor:
    """``x + x Delta`` on each block of columns (``Delta^T`` with transpose); x ``[T, n]``.

    delta (fp32) is what autograd differentiates; the kernel reads delta_op, the same values in
    the dot's storage dtype (x's 16-bit dtype: the dot rounds to it anyway, and it is half the
    bytes). (n, b, N) name the layer shape for the tuning cache."""
    x = x.contiguous()
    y = new_empty(*x.shape, dtype=x.dtype, device=x.device)
    apply_into(x, delta_op.contiguous(), transpose, interleave, chunk, y, (n, b, N))
    return y


@kernel_op("boft_triton::block_grad", _block_grad_fake)
def block_grad(x: torch.Tensor, g: torch.Tensor, delta_op: torch.Tensor, transpose: bool, interleave: int, chunk: int,
               need_dx: bool, n: int, b: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dl/dx, dl/dDelta partials)`` of ``block_apply``; dl/dx is unwritten when not need_dx."""
    dx, partial = grad(x.contiguous(), g.contiguous(), delta_op.contiguous(), transpose, interleave, chunk, need_dx,
                       (n, b, N))
    return (dx if dx is not None else torch.empty_like(x)), partial


def _setup_context(ctx, inputs, output):
    x, delta, delta_op, transpose, interleave, chunk, n, b, N = inputs
    ctx.save_for_backward(x, delta_op)
    ctx.args = (transpose, interleave, chunk)
    ctx.key = (n, b, N)


def _backward(ctx, g):
    """``y = x (I + Delta)``: ``dl/dx = g (I + Delta)^T``, ``dl/dDelta = x^T g``; with transpose
    (``y = x (I + Delta)^T``): ``dl/dx = g (I + Delta)``, ``dl/dDelta = g^T x``; per block of
    columns. (``dl/dQ`` follows through the block builder's autograd.)"""
    x, delta_op = ctx.saved_tensors
    transpose, interleave, chunk = ctx.args
    none = (None,) * 7
    if g is None:
        return None, None, *none
    if not ctx.needs_input_grad[1]:  # blocks frozen: dl/dx alone is the transposed product
        return block_apply(g, delta_op, delta_op, not transpose, interleave, chunk, *ctx.key), None, *none
    need_dx = ctx.needs_input_grad[0]
    dx, partial = block_grad(x, g, delta_op, transpose, interleave, chunk, need_dx, *ctx.key)
    return (dx if need_dx else None), (partial[0] if partial.shape[0] == 1 else partial.sum(0)), *none


block_apply.register_autograd(_backward, setup_context=_setup_context)


def butterfly(x: torch.Tensor, Q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x M`` (``x M^T``) over x's last dim; same contract as ``torch_ops.butterfly``."""
    shape, n = x.shape, x.shape[-1]
    N, D, b, _ = Q.shape
    groups = plan(n, b, N)
    pairs = list(zip(groups, deltas(Q, n)))
    if transpose:  # x M^T = x M_lo^T ... M_hi^T
        pairs.reverse()
    h = x.reshape(-1, n)
    store = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    for grp, delta in pairs:
        h = block_apply(h, delta, delta.detach().to(store), transpose, grp["S"], grp["H"], n, b, N)
    return h.reshape(shape)


# ---------------------------------------------------------------------------------------------
# what a launch compiles (for the compile report: bench/kernel_profile.py)


def launch_specs(n: int, b: int, N: int, T: int, dtype_name: str = "bf16") -> list[dict]:
    """Every kernel the launchers run for this layer shape, at the default config, as
    (kernel, signature, constexprs, options): apply (forward), apply_T (``dx`` when Q is frozen,
    and merges), grad (the fused backward). Pointers are 16-byte aligned and n, ROWS divisible
    by 16 at launch, as the compile report assumes."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    ptr = "*" + dtype_name
    fwd, bwd = default_config(n, b, N, "fwd"), default_config(n, b, N, "bwd")
    specs = []
    with _compiling():
        dot = _dot_meta(dtype)
    for k, grp in enumerate(plan(n, b, N)):
        meta = {**_group_meta(grp), **dot}
        tag = f"[g{k}]" if len(plan(n, b, N)) > 1 else ""
        sig = {"x_ptr": ptr, "d_ptr": ptr, "y_ptr": ptr, "T": "i32", "n": "i32"}
        for name, trans in (("apply", False), ("apply_T", True)):
            specs.append(dict(name=name + tag, fn=_apply_kernel, signature=sig, divisible=("n",),
                              constexprs={**meta, "TRANS": trans, "BT": fwd["BT"]}, config=fwd,
                              num_warps=fwd["num_warps"], num_stages=fwd["num_stages"]))
        gsig = {"x_ptr": ptr, "g_ptr": ptr, "d_ptr": ptr, "dx_ptr": ptr, "dd_ptr": "*fp32", "T": "i32", "n": "i32",
                "ROWS": "i32", "NB": "i32"}
        specs.append(dict(name="grad" + tag, fn=_grad_kernel, signature=gsig, divisible=("n", "ROWS"),
                          constexprs={**meta, "TRANS": False, "WRITE_DX": True, "RC": RC}, config=bwd,
                          num_warps=bwd["num_warps"], num_stages=bwd["num_stages"]))
    return specs


@contextlib.contextmanager
def _compiling():
    """Pretend not to interpret while choosing dot operands for an ahead-of-time compile."""
    global interpreting
    saved = interpreting
    interpreting = lambda: False  # noqa: E731
    try:
        yield
    finally:
        interpreting = saved
