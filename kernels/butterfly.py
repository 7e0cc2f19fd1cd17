"""Butterfly rotation of rows: ``y = x M`` (or ``x M^T``), ``M = B_{N-1} ... B_0``.

``B_i = P_i blockdiag(Q_i) P_i^T``. Factor i acts inside contiguous groups of ``b 2^i`` columns,
so M is block-diagonal with coarse blocks of ``L = b 2^(N-1)`` columns.

Fused path (L small enough for registers): one program holds a ``[BT, G*L]`` tile (BT rows, G
coarse blocks) as ``[BT, G*C, HP]`` *chunks*: each block of b columns is NP = 2 halves of
``H = b/2`` columns (NP = 1, ``H = b`` when N = 1, so odd b works), each half padded to the power
of two HP. ``x P_i`` then is a pure reshape/permute of the tile: within a group of ``b 2^i``
columns, block y pairs chunk y of the first half with chunk y of the second half, i.e.

    [BT, G*C, HP] -> [BT*X, 2, Y, HP] -> permute(0, 2, 1, 3) -> [BT, NBLK, 2*HP]

with ``Y = 2^i`` blocks per group and ``X = G L / (b 2^i)`` groups. The block products are
broadcast-multiply-and-sum (b is 2..64 and padded, below tl.dot's 16 minimum for small b). All N
factors are applied in registers: one read and one write of x.

Passes path (large L): one launch per factor; each program gathers ``[BT, NBP, BB]`` blocks straight
from memory with the permuted column indices, so no register permutation is needed. Intermediates
are fp32 buffers.

Backward: ``dl/dx = g M^T`` fused with ``dl/dQ``; the per-factor inputs are recomputed from x in
registers. The sum over rows is deterministic: each program loops over a fixed row range (a
*split*, independent of the tile config) and writes its partial dQ to ``[splits, N, D, b, b]``,
which torch sums. No float atomics.
"""

import contextlib
import functools

import torch
from torch.library import wrap_triton

from ._common import LAST_LAUNCH, cached_config, interpreting, kernel_op, new_empty, next_pow2, num_sms, tl, triton

# Fused when the per-row register footprint N * L * BB (the backward's dQ accumulators, also the
# forward's product at BT = 1) stays under this many fp32 values; otherwise passes.
FUSED_MAX_ELEMENTS = 16384
FUSED_MAX_L = 1024
# Largest broadcast product [BT, NBLK, BB, BB] a program may hold (fp32 values).
TILE_BUDGET = 16384


# ---------------------------------------------------------------------------------------------
# geometry of a launch


@functools.lru_cache(maxsize=1024)
def geometry(n: int, b: int, N: int) -> dict:
    if N > 1 and b % 2:
        raise ValueError(f"butterfly: block size {b} must be even with {N} factors")
    L = b << (N - 1)
    if n % L:
        raise ValueError(f"butterfly: width {n} is not a multiple of the coarse block {L} (b={b}, N={N})")
    NP = 2 if N > 1 else 1
    H = b // NP
    HP = next_pow2(H)
    BB = NP * HP
    return dict(n=n, b=b, N=N, L=L, NP=NP, H=H, HP=HP, BB=BB, NCB=n // L, D=n // b)


def use_fused(n: int, b: int, N: int) -> bool:
    g = geometry(n, b, N)
    return g["L"] <= FUSED_MAX_L and N * g["L"] * g["BB"] <= FUSED_MAX_ELEMENTS


def candidates(n: int, b: int, N: int, kind: str) -> list[dict]:
    """Tile configs worth trying for this shape; the same list serves kind "fwd" and "bwd"
    (the backward's dQ accumulators are bounded by use_fused)."""
    g = geometry(n, b, N)
    out = []
    if use_fused(n, b, N):
        per_row = g["L"] * g["BB"]  # product elements per row and coarse block
        for G in (1, 2, 4, 8):
            if G > next_pow2(g["NCB"]):
                continue
            for BT in (1, 2, 4, 8, 16, 32, 64):
                size = BT * G * per_row
                if size > TILE_BUDGET or (size < 1024 and BT < 64 and G * BT * per_row * 2 <= TILE_BUDGET):
                    continue
                for w in (2, 4, 8):
                    if w <= max(2, size // 1024):
                        out.append({"BT": BT, "G": G, "num_warps": w})
    else:
        blk = g["BB"] * g["BB"]
        for NBP in (1, 2, 4, 8, 16, 32):
            if NBP > next_pow2(g["D"]):
                continue
            for BT in (1, 2, 4, 8, 16, 32, 64):
                size = BT * NBP * blk
                if size > TILE_BUDGET or (size < 1024 and BT < 64 and size * 2 <= TILE_BUDGET):
                    continue
                for w in (2, 4, 8):
                    if w <= max(2, size // 1024):
                        out.append({"BT": BT, "NBP": NBP, "num_warps": w})
    return out


def _floor_pow2(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def default_config(n: int, b: int, N: int, kind: str, T: int) -> dict:
    """The untuned tile: the biggest that fits half the budget, no taller than the input."""
    g = geometry(n, b, N)
    rows = min(64, next_pow2(max(T, 1)))
    if use_fused(n, b, N):
        per_row = g["L"] * g["BB"]
        G = min(next_pow2(g["NCB"]), _floor_pow2(TILE_BUDGET // 2 // per_row), 8)
        BT = min(rows, _floor_pow2(TILE_BUDGET // 2 // (G * per_row)))
        return {"BT": BT, "G": G, "num_warps": 4}
    blk = g["BB"] * g["BB"]
    NBP = min(next_pow2(g["D"]), _floor_pow2(4096 // blk), 32)
    BT = min(rows, _floor_pow2(TILE_BUDGET // 2 // (NBP * blk)))
    return {"BT": BT, "NBP": NBP, "num_warps": 4}


# ---------------------------------------------------------------------------------------------
# register-tile helpers (fused path)


@triton.jit
def _to_blocks(b_x, LEVEL: tl.constexpr, BT: tl.constexpr, G: tl.constexpr, NF: tl.constexpr,
               NP: tl.constexpr, HP: tl.constexpr):
    """``x P_LEVEL`` cut into its blocks: [BT, G*C, HP] chunks -> [BT, NBLK, NP*HP]."""
    NBLK: tl.constexpr = G * (1 << (NF - 1))
    if LEVEL == 0:  # blocks are consecutive chunk pairs (or single chunks when NP == 1)
        b_out = tl.reshape(b_x, (BT, NBLK, NP * HP))
    else:
        X: tl.constexpr = G * (1 << (NF - 1 - LEVEL))  # groups of b 2^LEVEL columns
        Y: tl.constexpr = 1 << LEVEL  # blocks per group
        b_out = tl.reshape(b_x, (BT * X, 2, Y, HP))  # [BT*X, half, block, HP]
        b_out = tl.permute(b_out, (0, 2, 1, 3))  # [BT*X, block, half, HP]
        b_out = tl.reshape(b_out, (BT, NBLK, 2 * HP))
    return b_out


@triton.jit
def _from_blocks(b_y, LEVEL: tl.constexpr, BT: tl.constexpr, G: tl.constexpr, NF: tl.constexpr,
                 NP: tl.constexpr, HP: tl.constexpr):
    """Inverse of _to_blocks (``y P_LEVEL^T``): [BT, NBLK, NP*HP] -> [BT, G*C, HP]."""
    C: tl.constexpr = NP * (1 << (NF - 1))
    if LEVEL == 0:
        b_out = tl.reshape(b_y, (BT, G * C, HP))
    else:
        X: tl.constexpr = G * (1 << (NF - 1 - LEVEL))
        Y: tl.constexpr = 1 << LEVEL
        b_out = tl.reshape(b_y, (BT * X, Y, 2, HP))
        b_out = tl.permute(b_out, (0, 2, 1, 3))
        b_out = tl.reshape(b_out, (BT, G * C, HP))
    return b_out


@triton.jit
def _load_q(q_ptr, LEVEL, o_j, D, B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
            NP: tl.constexpr, TRANS: tl.constexpr):
    """Padded blocks ``Q[LEVEL, o_j]`` as [NBLK, BB, BB] (``Q^T`` with TRANS), zero padding."""
    o_k = tl.arange(0, NP * HP)
    o_kr = (o_k // HP) * H + o_k % HP  # padded index -> index inside the b x b block
    m_k = (o_k % HP) < H
    o_base = (LEVEL * D + o_j)[:, None, None] * (B * B)  # o_j is int64: no i32 overflow
    if TRANS:
        o_q = o_base + o_kr[None, None, :] * B + o_kr[None, :, None]
    else:
        o_q = o_base + o_kr[None, :, None] * B + o_kr[None, None, :]
    m_q = (o_j < D)[:, None, None] & m_k[None, :, None] & m_k[None, None, :]
    return tl.load(q_ptr + o_q, mask=m_q, other=0.0).to(tl.float32)


@triton.jit
def _bmm(b_xb, b_q):
    """Per block row-vector times matrix: [BT, NBLK, BB] x [NBLK, BB, BB] -> [BT, NBLK, BB]."""
    return tl.sum(b_xb[:, :, :, None] * b_q[None, :, :, :], axis=2)


@triton.jit
def _apply_step(b_x, q_ptr, o_j, D, STEP: tl.constexpr, TRANSPOSE: tl.constexpr, BT: tl.constexpr,
                G: tl.constexpr, NF: tl.constexpr, B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                NP: tl.constexpr):
    """Step STEP of ``x M`` (factor N-1-STEP with Q) or of ``x M^T`` (factor STEP with Q^T)."""
    LEVEL: tl.constexpr = STEP if TRANSPOSE else NF - 1 - STEP
    b_xb = _to_blocks(b_x, LEVEL, BT, G, NF, NP, HP)
    b_q = _load_q(q_ptr, LEVEL, o_j, D, B, H, HP, NP, TRANSPOSE)
    return _from_blocks(_bmm(b_xb, b_q), LEVEL, BT, G, NF, NP, HP)


@triton.jit
def _tile_offsets(i_c, NCB, B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NP: tl.constexpr,
                  NF: tl.constexpr, G: tl.constexpr):
    """Columns of this program's chunks [G*C, HP], their mask, and its block ids [NBLK]."""
    L: tl.constexpr = B * (1 << (NF - 1))
    C: tl.constexpr = NP * (1 << (NF - 1))
    o_gc = tl.arange(0, G * C)
    o_g = i_c * G + o_gc // C  # coarse block of each chunk
    o_h = tl.arange(0, HP)
    o_col = o_g[:, None] * L + (o_gc % C)[:, None] * H + o_h[None, :]  # [G*C, HP]
    m_col = (o_g < NCB)[:, None] & (o_h < H)[None, :]
    o_j = i_c * (G * (1 << (NF - 1))) + tl.arange(0, G * (1 << (NF - 1)))  # [NBLK]
    return o_col, m_col, o_j


# ---------------------------------------------------------------------------------------------
# fused kernels


@triton.jit
def _butterfly_fwd_kernel(
    x_ptr, q_ptr, y_ptr, T, NCB, D,
    B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NP: tl.constexpr, NF: tl.constexpr,
    TRANSPOSE: tl.constexpr, BT: tl.constexpr, G: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    n = NCB * (B * (1 << (NF - 1)))
    o_col, m_col, o_j = _tile_offsets(i_c, NCB, B, H, HP, NP, NF, G)
    o_t = i_t * BT + tl.arange(0, BT)
    o_x = o_t[:, None, None] * n + o_col[None, :, :]  # [BT, G*C, HP]
    m_x = (o_t < T)[:, None, None] & m_col[None, :, :]
    b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    for s in tl.static_range(NF):
        b_x = _apply_step(b_x, q_ptr, o_j, D, s, TRANSPOSE, BT, G, NF, B, H, HP, NP)
    tl.store(y_ptr + o_x, b_x.to(y_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _bwd_step(b_x, b_h, b_dq, q_ptr, o_j, o_lvl, D, S: tl.constexpr, TRANSPOSE: tl.constexpr,
              BT: tl.constexpr, G: tl.constexpr, NF: tl.constexpr, B: tl.constexpr, H: tl.constexpr,
              HP: tl.constexpr, NP: tl.constexpr):
    """Step S backwards: add its dQ into slice LEVEL of b_dq, return dl/d(input of step S)."""
    LEVEL: tl.constexpr = S if TRANSPOSE else NF - 1 - S
    # recompute the input of step S from x (no stored intermediates)
    b_u = b_x
    for p in tl.static_range(S):
        b_u = _apply_step(b_u, q_ptr, o_j, D, p, TRANSPOSE, BT, G, NF, B, H, HP, NP)
    b_ub = _to_blocks(b_u, LEVEL, BT, G, NF, NP, HP)  # [BT, NBLK, BB]
    b_hb = _to_blocks(b_h, LEVEL, BT, G, NF, NP, HP)
    if TRANSPOSE:  # out = u Q^T: dl/dQ = h^T u
        b_c = tl.sum(b_hb[:, :, :, None] * b_ub[:, :, None, :], axis=0)  # [NBLK, BB, BB]
    else:  # out = u Q: dl/dQ = u^T h
        b_c = tl.sum(b_ub[:, :, :, None] * b_hb[:, :, None, :], axis=0)
    # dQ of every level lives in one register block; this level adds into its slice only (a list
    # of accumulators cannot be carried through the runtime row loop)
    b_dq += tl.where((o_lvl == LEVEL)[:, None, None, None], b_c[None, :, :, :], 0.0)
    # dl/du = h (Q or Q^T)^T
    b_q = _load_q(q_ptr, LEVEL, o_j, D, B, H, HP, NP, not TRANSPOSE)
    b_h = _from_blocks(_bmm(b_hb, b_q), LEVEL, BT, G, NF, NP, HP)
    return b_h, b_dq


@triton.jit
def _butterfly_bwd_kernel(
    x_ptr, g_ptr, q_ptr, dx_ptr, dqp_ptr, T, ROWS, NCB, D,
    B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NP: tl.constexpr, NF: tl.constexpr,
    NFP: tl.constexpr, TRANSPOSE: tl.constexpr, BT: tl.constexpr, G: tl.constexpr,
):
    """Rows [i_s*ROWS, (i_s+1)*ROWS) of g M^T (M^T -> M with TRANSPOSE) and their partial dQ."""
    i_s = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    NBLK: tl.constexpr = G * (1 << (NF - 1))
    BB: tl.constexpr = NP * HP
    n = NCB * (B * (1 << (NF - 1)))
    o_col, m_col, o_j = _tile_offsets(i_c, NCB, B, H, HP, NP, NF, G)
    o_lvl = tl.arange(0, NFP)
    b_dq = tl.zeros([NFP, NBLK, BB, BB], dtype=tl.float32)
    row_lo = i_s * ROWS
    row_hi = tl.minimum(row_lo + ROWS, T)
    for t0 in range(row_lo, row_hi, BT):
        o_t = t0 + tl.arange(0, BT)
        o_x = o_t[:, None, None] * n + o_col[None, :, :]  # [BT, G*C, HP]
        m_x = (o_t < row_hi)[:, None, None] & m_col[None, :, :]
        b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_h = tl.load(g_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)  # dl/d(output of step s)
        # walk the steps backwards; (no named constexprs in static loops: they cannot be rebound)
        for r in tl.static_range(NF):
            b_h, b_dq = _bwd_step(b_x, b_h, b_dq, q_ptr, o_j, o_lvl, D, NF - 1 - r, TRANSPOSE, BT, G, NF,
                                  B, H, HP, NP)
        tl.store(dx_ptr + o_x, b_h.to(dx_ptr.dtype.element_ty), mask=m_x)
    o_k = tl.arange(0, BB)
    o_kr = (o_k // HP) * H + o_k % HP
    m_k = (o_k % HP) < H
    o_dq = (
        ((i_s * NF + o_lvl) * D)[:, None, None, None] * (B * B)  # int64 (i_s)
        + o_j[None, :, None, None] * (B * B)
        + o_kr[None, None, :, None] * B
        + o_kr[None, None, None, :]
    )
    m_dq = (
        (o_lvl < NF)[:, None, None, None]
        & (o_j < D)[None, :, None, None]
        & m_k[None, None, :, None]
        & m_k[None, None, None, :]
    )
    tl.store(dqp_ptr + o_dq, b_dq, mask=m_dq)


# ---------------------------------------------------------------------------------------------
# one-factor kernels (passes path): blocks gathered straight from memory


@triton.jit
def _factor_offsets(i_j, D, LEVEL: tl.constexpr, B: tl.constexpr, H: tl.constexpr,
                    HP: tl.constexpr, NP: tl.constexpr, NBP: tl.constexpr):
    """Columns [NBP, BB] of blocks i_j*NBP.. of factor LEVEL (the columns ``x P`` puts there)."""
    GS: tl.constexpr = B * (1 << LEVEL)  # group width
    Y: tl.constexpr = 1 << LEVEL  # blocks per group
    o_j = i_j * NBP + tl.arange(0, NBP)
    o_k = tl.arange(0, NP * HP)
    o_half = o_k // HP
    o_in = o_k % HP
    o_col = (o_j // Y)[:, None] * GS + o_half[None, :] * (GS // NP) + (o_j % Y)[:, None] * H + o_in[None, :]
    m_col = (o_j < D)[:, None] & (o_in < H)[None, :]
    return o_col, m_col, o_j


@triton.jit
def _factor_fwd_kernel(
    x_ptr, q_ptr, y_ptr, T, D,
    LEVEL: tl.constexpr, B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NP: tl.constexpr,
    TRANS: tl.constexpr, BT: tl.constexpr, NBP: tl.constexpr,
):
    """``y = x B_LEVEL`` (``x B_LEVEL^T`` with TRANS) for a [BT, NBP blocks] tile."""
    i_t = tl.program_id(0).to(tl.int64)
    i_j = tl.program_id(1).to(tl.int64)
    n = D * B
    o_col, m_col, o_j = _factor_offsets(i_j, D, LEVEL, B, H, HP, NP, NBP)
    o_t = i_t * BT + tl.arange(0, BT)
    o_x = o_t[:, None, None] * n + o_col[None, :, :]  # [BT, NBP, BB]
    m_x = (o_t < T)[:, None, None] & m_col[None, :, :]
    b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_q = _load_q(q_ptr, LEVEL, o_j, D, B, H, HP, NP, TRANS)
    tl.store(y_ptr + o_x, _bmm(b_x, b_q).to(y_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _factor_bwd_kernel(
    u_ptr, h_ptr, q_ptr, du_ptr, dqp_ptr, T, ROWS, D, NF,
    LEVEL: tl.constexpr, B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NP: tl.constexpr,
    TRANS: tl.constexpr, BT: tl.constexpr, NBP: tl.constexpr,
):
    """For ``out = u B`` (``u B^T`` with TRANS): ``du = h B^T`` (``h B``) and this split's dQ_LEVEL."""
    i_s = tl.program_id(0).to(tl.int64)
    i_j = tl.program_id(1).to(tl.int64)
    BB: tl.constexpr = NP * HP
    n = D * B
    o_col, m_col, o_j = _factor_offsets(i_j, D, LEVEL, B, H, HP, NP, NBP)
    b_q = _load_q(q_ptr, LEVEL, o_j, D, B, H, HP, NP, not TRANS)
    b_dq = tl.zeros([NBP, BB, BB], dtype=tl.float32)
    row_lo = i_s * ROWS
    row_hi = tl.minimum(row_lo + ROWS, T)
    for t0 in range(row_lo, row_hi, BT):
        o_t = t0 + tl.arange(0, BT)
        o_x = o_t[:, None, None] * n + o_col[None, :, :]  # [BT, NBP, BB]
        m_x = (o_t < row_hi)[:, None, None] & m_col[None, :, :]
        b_u = tl.load(u_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_h = tl.load(h_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        if TRANS:
            b_dq += tl.sum(b_h[:, :, :, None] * b_u[:, :, None, :], axis=0)
        else:
            b_dq += tl.sum(b_u[:, :, :, None] * b_h[:, :, None, :], axis=0)
        tl.store(du_ptr + o_x, _bmm(b_h, b_q).to(du_ptr.dtype.element_ty), mask=m_x)
    o_k = tl.arange(0, BB)
    o_kr = (o_k // HP) * H + o_k % HP
    m_k = (o_k % HP) < H
    o_dq = (i_s * NF + LEVEL) * D * B * B + o_j[:, None, None] * (B * B) + o_kr[None, :, None] * B + o_kr[None, None, :]
    m_dq = (o_j < D)[:, None, None] & m_k[None, :, None] & m_k[None, None, :]
    tl.store(dqp_ptr + o_dq, b_dq, mask=m_dq)


# ---------------------------------------------------------------------------------------------
# launchers


@functools.lru_cache(maxsize=256)
def _autotuner(kernel_name: str, n: int, b: int, N: int, kind: str):
    """triton.autotune over this shape's candidate tiles (pre-pruned here rather than through a
    prune_configs_by hook, which torch.compile's support for user kernels handles poorly). One
    autotuner per (n, b, N), keyed on D (plus the arg dtypes): never on the row count T."""
    kernel = _KERNELS[kernel_name]
    configs = []
    for c in candidates(n, b, N, kind):
        kw = {k: v for k, v in c.items() if k != "num_warps"}
        configs.append(triton.Config(kw, num_warps=c["num_warps"]))
    return triton.autotune(configs, key=["D"])(kernel)


_FORCED: dict[str, dict] = {}


@contextlib.contextmanager
def forced_config(kind: str, cfg: dict):
    """Launch ``kind`` ("fwd"/"bwd") kernels with ``cfg`` inside the block (used by tuning)."""
    _FORCED[kind] = cfg
    try:
        yield
    finally:
        _FORCED.pop(kind, None)


def _pick(kind: str, n: int, b: int, N: int, dtype: torch.dtype, device: torch.device, T: int):
    """(source, config): the tuning cache's winner, else autotune on CUDA, else the default tile."""
    if kind in _FORCED:
        return "forced", _FORCED[kind]
    cfg = cached_config(kind, n, b, N, dtype, device)
    if cfg is not None and all(k in cfg for k in (("BT", "G") if use_fused(n, b, N) else ("BT", "NBP"))):
        return "cache", cfg
    if not interpreting() and device.type == "cuda":
        return "autotune", None
    return "default", default_config(n, b, N, kind, T)


def _launch(name, kind, grid, args, meta, shape_key, dtype, device, T):
    """Launch ``name`` with a fixed config, or through its autotuner."""
    n, b, N = shape_key
    source, cfg = _pick(kind, n, b, N, dtype, device, T)
    LAST_LAUNCH[name] = (source, dict(cfg or {}))
    if cfg is None:
        wrap_triton(_autotuner(name, n, b, N, kind))[grid](*args, **meta)
    else:
        tile = {k: v for k, v in cfg.items() if k in ("BT", "G", "NBP")}
        wrap_triton(_KERNELS[name])[grid(tile)](*args, **meta, **tile, num_warps=cfg.get("num_warps", 4))


def _splits(T: int, n_col: int, device: torch.device) -> tuple[int, int]:
    """Row splits of the backward (fixed by T and the device, never by the tile config, so the
    dQ reduction order and hence its bits do not change with tuning): (splits, rows per split)."""
    want = max(1, -(-4 * num_sms(device) // max(n_col, 1)))
    splits = max(1, min(-(-T // 64), want))
    rows = -(-T // splits)
    return -(-T // rows), rows


def fwd_into(x: torch.Tensor, Q: torch.Tensor, transpose: bool, y: torch.Tensor) -> None:
    """``y = x M`` (``x M^T``) for contiguous x, y ``[T, n]`` and Q ``[N, D, b, b]``."""
    T, n = x.shape
    N, D, b, _ = Q.shape
    g = geometry(n, b, N)
    if T == 0:
        return
    if use_fused(n, b, N):
        meta = dict(B=b, H=g["H"], HP=g["HP"], NP=g["NP"], NF=N, TRANSPOSE=transpose)
        grid = lambda c: (triton.cdiv(T, c["BT"]), triton.cdiv(g["NCB"], c["G"]))  # noqa: E731
        _launch("butterfly_fwd", "fwd", grid, (x, Q, y, T, g["NCB"], D), meta, (n, b, N), x.dtype, x.device, T)
        return
    # passes: x M = x B_{N-1} ... B_0; x M^T = x B_0^T ... B_{N-1}^T; fp32 in between
    levels = list(range(N)) if transpose else list(reversed(range(N)))
    cur = x
    for k, level in enumerate(levels):
        out = y if k == N - 1 else new_empty(T, n, dtype=torch.float32, device=x.device)
        _factor_fwd(cur, Q, level, transpose, out)
        cur = out


def _factor_fwd(x, Q, level, trans, out):
    T, n = x.shape
    N, D, b, _ = Q.shape
    g = geometry(n, b, N)
    meta = dict(LEVEL=level, B=b, H=g["H"], HP=g["HP"], NP=g["NP"], TRANS=trans)
    grid = lambda c: (triton.cdiv(T, c["BT"]), triton.cdiv(D, c["NBP"]))  # noqa: E731
    _launch("factor_fwd", "fwd", grid, (x, Q, out, T, D), meta, (n, b, N), x.dtype, x.device, T)


def bwd(x: torch.Tensor, grad: torch.Tensor, Q: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dl/dx, dl/dQ)`` of ``y = x M`` (``x M^T``) for contiguous ``[T, n]`` x and grad."""
    T, n = x.shape
    N, D, b, _ = Q.shape
    g = geometry(n, b, N)
    dx = new_empty(T, n, dtype=x.dtype, device=x.device)
    if T == 0:
        return dx, torch.zeros(Q.shape, dtype=torch.float32, device=Q.device)
    if use_fused(n, b, N):
        splits, rows = _splits(T, g["NCB"], x.device)
        dqp = new_empty(splits, N, D, b, b, dtype=torch.float32, device=x.device)
        meta = dict(B=b, H=g["H"], HP=g["HP"], NP=g["NP"], NF=N, NFP=next_pow2(N), TRANSPOSE=transpose)
        grid = lambda c: (splits, triton.cdiv(g["NCB"], c["G"]))  # noqa: E731
        args = (x, grad, Q, dx, dqp, T, rows, g["NCB"], D)
        _launch("butterfly_bwd", "bwd", grid, args, meta, (n, b, N), x.dtype, x.device, T)
        return dx, dqp.sum(0)
    # passes: recompute the inputs of every step (fp32), then walk back one factor at a time
    levels = list(range(N)) if transpose else list(reversed(range(N)))
    inputs = [x]
    for level in levels[:-1]:
        out = new_empty(T, n, dtype=torch.float32, device=x.device)
        _factor_fwd(inputs[-1], Q, level, transpose, out)
        inputs.append(out)
    splits, rows = _splits(T, D, x.device)
    dqp = new_empty(splits, N, D, b, b, dtype=torch.float32, device=x.device)
    h = grad
    for k in reversed(range(N)):
        du = dx if k == 0 else new_empty(T, n, dtype=torch.float32, device=x.device)
        meta = dict(LEVEL=levels[k], B=b, H=g["H"], HP=g["HP"], NP=g["NP"], TRANS=transpose)
        grid = lambda c: (splits, triton.cdiv(D, c["NBP"]))  # noqa: E731
        args = (inputs[k], h, Q, du, dqp, T, rows, D, N)
        _launch("factor_bwd", "bwd", grid, args, meta, (n, b, N), x.dtype, x.device, T)
        h = du
    return dx, dqp.sum(0)


_KERNELS = {
    "butterfly_fwd": _butterfly_fwd_kernel,
    "butterfly_bwd": _butterfly_bwd_kernel,
    "factor_fwd": _factor_fwd_kernel,
    "factor_bwd": _factor_bwd_kernel,
}


# ---------------------------------------------------------------------------------------------
# ops and autograd


def _butterfly_fwd_fake(x, Q, transpose):
    return x.new_empty(x.shape)


def _butterfly_bwd_fake(x, grad, Q, transpose):
    return x.new_empty(x.shape), Q.new_empty(Q.shape)


@kernel_op("boft_triton::butterfly_fwd", _butterfly_fwd_fake)
def butterfly_fwd(x: torch.Tensor, Q: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x M`` (``x M^T``) for x ``[T, n]``; returns x's dtype, fp32 inside."""
    x = x.contiguous()
    Q = Q.contiguous()
    y = new_empty(*x.shape, dtype=x.dtype, device=x.device)
    fwd_into(x, Q, transpose, y)
    return y


@kernel_op("boft_triton::butterfly_bwd", _butterfly_bwd_fake)
def butterfly_bwd(x: torch.Tensor, grad: torch.Tensor, Q: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dl/dx, dl/dQ)`` of ``butterfly_fwd``; dQ in Q's dtype."""
    dx, dq = bwd(x.contiguous(), grad.contiguous(), Q.contiguous(), transpose)
    return dx, dq.to(Q.dtype)


def _setup_context(ctx, inputs, output):
    x, Q, transpose = inputs
    ctx.save_for_backward(x, Q)
    ctx.transpose = transpose


def _backward(ctx, grad):
    """Gradient of ``y = x M``, ``M = B_{N-1} ... B_0`` (x M^T runs the same with Q -> Q^T).

    ``dl/dx = g M^T``: M is linear in x. For the factor applied at step s, with input u_s (rows)
    and ``out = u_s B``, ``B = P blockdiag(Q_j) P^T``: ``(u_s P)`` cut into blocks of b columns is
    multiplied block by block, so ``dl/dQ_j = sum_rows (u_s P)[:, j]^T (h_s P)[:, j]`` with
    ``h_s = dl/d out``, and ``dl/du_s = h_s B^T``. For ``out = u B^T`` the roles swap:
    ``dl/dQ_j = sum_rows (h_s P)[:, j]^T (u_s P)[:, j]`` and ``dl/du_s = h_s B``. The kernel walks
    the steps backwards from ``h = g``, recomputing each ``u_s`` from x in registers.
    """
    x, Q = ctx.saved_tensors
    if grad is None:
        return None, None, None
    if not ctx.needs_input_grad[1]:  # Q frozen: dl/dx alone is the transposed rotation
        return butterfly_fwd(grad, Q, not ctx.transpose), None, None
    dx, dq = butterfly_bwd(x, grad, Q, ctx.transpose)
    return (dx if ctx.needs_input_grad[0] else None), dq, None


butterfly_fwd.register_autograd(_backward, setup_context=_setup_context)


def butterfly(x: torch.Tensor, Q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x M`` (``x M^T``) over x's last dim; same contract as ``torch_ops.butterfly``."""
    shape = x.shape
    y = butterfly_fwd(x.reshape(-1, shape[-1]), Q, transpose)
    return y.reshape(shape)
