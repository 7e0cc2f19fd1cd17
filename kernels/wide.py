"""One factor level wider than a program holds (blocks of ``b > MAX_BLOCK`` columns), in column slabs.

PEFT's examples set ``boft_block_num``, so blocks grow with the layer: DreamBooth's block_num=8 on
Stable Diffusion's 1280-wide layers is b = 160, and on a 4096-wide LLM layer b = 512. Such a level
is always a group of its own in ``butterfly.plan`` (two levels would be at least 2b wide), with
``Delta = F - I`` one dense ``b x b`` Q block per block of columns (``reference.group_blocks``:
block i_b of the level is Q block i_b, rows = input columns). Its Delta, padded to ``KP`` (a power
of two), is 128 KB in bf16 at b = 256 and 512 KB at b = 512: more than a program holds next to
its row tiles. So each program owns a slab of ``BN`` output columns of one block:

- **Forward** ``y[:, slab] = x[:, slab] + x Delta[:, slab]``: the program builds its ``[KP, BN]``
  slice of Delta once and streams row tiles (persistent, as ``butterfly._apply_kernel``). Up to
  256 wide one slab covers the block (x read once); wider, each of the ``NS`` slabs reads the
  block's full row tile. At 257-384 the slab is held as two tiles, 256 rows and the rest padded
  (``held_tail``: 320 is 256 + 64 rows, not 512), so its 128 columns fit: 3 slabs, not 5-6. The
  slabs of a block are neighbours in the grid (axis 0), so they walk the same row tiles together
  and share them through L2 on a GPU; the interpreter's byte count, which has no cache, counts
  every read.
- **Backward** ``dx = g + g Delta^T`` (``g + g Delta`` with transpose) is the forward kernel on g
  with the transpose flipped (up to 256 wide, except 161-192 before Hopper: the dMc pass's, below). ``dMc = x^T
  g`` (``g^T x``) takes a second pass: a program accumulates a slab of dMc's rows (columns with
  transpose) in fp32, reading the full row tile of g and its slab of x; dQ of the level *is* dMc
  (one factor: no block products). Row splits and the split-ordered partial sums are
  ``butterfly._splits``'s, so dQ's bits do not depend on the tile config. Up to ``MAX_BLOCK +
  PAIR_REST`` (192) wide one program holds the block's whole dMc as four tiles instead
  (``_wide_grad_pair_kernel``), so that pass reads g once; up to ``MAX_BLOCK + PAIR_DX_REST_HOPPER``
  (192; ``PAIR_DX_REST``, 160, before Hopper, whose mma holds the tiles in registers) it also holds
  ``Delta^T`` as four tiles, made from Q, and writes dx on the same rows (``wide_grads``): one pass
  over (x, g) for both gradients. (Not at an odd number of column pairs, b = 2 mod 4, past 160 on
  Hopper, nor at unaligned 193-256 before it: rows not 16-byte aligned at a block spill there,
  whatever the stages. Other unaligned widths write dx on one stage: ``aligned``,
  ``backward_stages``.) At 193-256 (``takes_halves``) two programs hold half the dMc
  each as two 128 x 128 tiles (``_wide_grad_halves_kernel``: x read once, g twice, as the slabs)
  and write dx's half from the same rows of g, Delta^T's two tiles of it held, in 16-row steps:
  g is read twice for both gradients, not three times. (Wider, one pass holding both a
  ``Delta^T`` slab and a dMc slab spills at 512; with slabs narrow enough not to, it reads g more
  often than the two passes do.)
- **K-split** past what a slab holds (16-bit past 512 wide, fp32's forward past 256 and its dMc
  past 512; ``splits_k``): the same kernels stream KC-wide chunks of x and of the Delta slab per
  row tile (forward), or own a ``[BN, KC]`` tile of dMc (backward), so no width is too wide for
  them and no shape leaves the kernels on a GPU for its width.
"""

from __future__ import annotations

import functools

import torch
from torch.library import wrap_triton

from . import butterfly as kb
from ._common import (
    TRITON_VERSION,
    LAST_LAUNCH,
    _version_tuple,
    capability,
    kernel_op,
    new_empty,
    next_pow2,
    num_sms,
    prev_pow2,
    register_operand_mma,
    tl,
    triton,
)

# Values of the Delta slab a forward program holds next to its row tile, and of the dMc slab a
# backward program accumulates (fp32): the widest that compile without spills on sm_90 and sm_80
# (the compile report). Up to 256 wide the forward holds the whole block (256 x 256 bf16 with
# 32-row tiles); wider, 32K values with 16-row tiles (512: 128-wide slabs spill 16-92 bytes). One
# 512-wide dMc slab of 64 rows is 32K fp32 values too.
FWD_WHOLE = 256
FWD_SLAB = 32 * 1024
BWD_SLAB = 32 * 1024
# Levels of 257-384 columns (Stable Diffusion's block_num=4 on its 1280-wide layers is b = 320)
# hold their forward Delta slab as two tiles, the block's first 256 rows and the rest padded to a
# power of two (320: 256 + 64), rather than all b rows padded to 512 (``held_tail``). Slabs of 128
# columns then hold 36-48K values and compile without spills on sm_90 and sm_80 (288, 320, 384:
# 169-234 registers, 87-131 KB of shared memory at 16- and 32-row tiles; 256-column slabs spill
# 40-184 bytes), so each row tile of x is read by 3 slabs, not 5-6.
TAIL_SLAB = 48 * 1024
# Up to this many held values the forward pipelines two stages; past it (tails of 128 rows: 330-384
# wide), one: at two, 376's dx (the forward with the transpose flipped) spilled 4 bytes on sm_80
# at ptxas's 128-register pick; at one, 330-384 compile clean on both cards (64-225 registers).
TAIL_SLAB_TWO_STAGES = 40 * 1024
# fp32 inputs (tf32x3: three operand tiles per product): 32-column forward slabs in 16-row tiles up
# to 256 wide (512 spills kilobytes), dMc slabs of 4K values (16 x 256, 32 x 128; 16 x 512 too).
FP32_FWD_COLUMNS = 32
FP32_BWD_SLAB = 4 * 1024
# Wider than a program holds next to its row tile (16-bit Delta slabs past 512: a 1024-wide row tile
# alone spills; fp32 forward slabs past 256, fp32 dMc slabs past 512), a level runs K-split: a
# program owns a ``[BT, BN]`` tile of y (a ``[BN, KC]`` tile of dMc) and streams KC-wide chunks of
# x and Delta (RC-row steps of x and g) through it, a tiled GEMM per block, so no width is too
# wide. (BN, KC) per (kind, fp32) and the forward's rows per tile: tiles that compile without
# spills on sm_90 and sm_80 (the compile report; 16-bit 128 x 128 forward tiles spill 124-248
# bytes on sm_80, 4 warps kilobytes), the lowest register counts of those measured.
HELD_FWD, HELD_FP32_FWD, HELD_BWD = 512, 256, 512
SPLIT_TILES = {("fwd", False): (64, 64), ("fwd", True): (64, 32), ("bwd", False): (128, 128), ("bwd", True): (64, 64)}
# Rows of a K-split forward tile (16-bit, fp32): each Delta chunk a program loads serves that many.
SPLIT_ROWS = {False: 128, True: 64}
# Values of dQ the kernel adding the row splits' partials holds (fp32): 32K spill 8 bytes at
# b = 144 on sm_90.
DQ_SUM = 16 * 1024
# Rows per step of the dMc reduction: fixed (never tuned), so the bits of dQ do not depend on the
# tile config; a divisor of butterfly.RC, so butterfly._splits' row splits hold whole steps. Half
# that where a block's rows are not 16-byte aligned (``wide_rc``).
WIDE_RC = 32
# Blocks of MAX_BLOCK + up to PAIR_REST columns (b = 160: DreamBooth's block_num=8 on 1280; 192:
# block_num=4 on 768) hold their whole dMc as four tiles in one program (_wide_grad_pair_kernel),
# so the dMc pass reads g once instead of once per slab: no spills on sm_90 and sm_80 (triton 3.6
# and 3.7) in 16-row steps on 8 warps (past 160, one stage where dx is not fused: two spill 84
# bytes at b = 192 on sm_80; 16 warps, kilobytes). 16-bit inputs (fp32's tf32x3 operands would
# not fit).
PAIR_REST = 64
PAIR_RC = 16
# The four-tile kernel also writes dx (Delta's four tiles held next to dMc's) for blocks of
# MAX_BLOCK + up to PAIR_DX_REST columns, its second tile padded to at least that: 136-160 then
# compile without spills on sm_90 and sm_80 (8 warps, two stages), while a second tile of 16
# columns (144) spilled 444-500 bytes. Up to 192 (PAIR_DX_REST_HOPPER) on Hopper: wgmma reads the
# held tiles from shared memory, so 161-192 compile without spills there at two stages (16 bytes
# at one), while sm_80's mma holds them in registers and spills 24-148 bytes at 1-3 stages.
# Without dx the tile is padded the same, so dQ's bits do not depend on whether x needs a gradient.
PAIR_DX_REST = 32
PAIR_DX_REST_HOPPER = 64
# Blocks of 193-256 columns hold half their dMc per program as two [128, 128] tiles
# (_wide_grad_halves_kernel: the slab kernel's traffic) and write dx's half from the same rows of
# g, Delta's two tiles held: no spills on sm_90 or sm_80 (triton 3.7) with or without dx, 1 or 2
# stages, in 16-row steps (HALVES_RC); 32-row steps spill 268-572 bytes with dx, 60-140 without
# on sm_80.
HALVES_RC = 16


def pair_rest(b: int) -> int:
    """RP, the padded width of the four-tile kernel's second tile (columns [MAX_BLOCK, b))."""
    return max(PAIR_DX_REST, next_pow2(b - kb.MAX_BLOCK))


def is_wide(grp: dict) -> bool:
    """Whether a group of ``butterfly.plan`` is one level wider than the block kernels hold
    (packed groups of narrow blocks are up to ``2 MIN_BLOCK`` wide: never these)."""
    return grp["k1"] - grp["k0"] == 1 and grp["pack"] == 1 and grp["W"] > kb.MAX_BLOCK


@functools.lru_cache(maxsize=1024)
def level_group(n: int, b: int, N: int, k: int) -> dict:
    """Level k of an (n, b, N) butterfly as a group of its own, in ``butterfly.plan``'s terms:
    blocks of ``W = b`` columns (two chunks of b/2 when N > 1) interleaved with stride ``S = 2^k``;
    block i_b is Q block i_b of the level. (Where plan() already makes level k a group of its
    own, this is that group.)"""
    chunk = b // 2 if N > 1 else b
    width = 2 * chunk if N > 1 else b
    S = 1 << k
    return dict(k0=k, k1=k + 1, HC=chunk, W=width, S=S, H=chunk if S > 1 else width, pack=1, WB=width,
                NB=n // width, WP=max(kb.MIN_BLOCK, next_pow2(width)))


def fp32_too_wide(n: int, b: int, N: int, dtype: torch.dtype | None) -> bool:
    """Whether fp32 inputs have blocks wider than ``butterfly.MAX_FP32_BLOCK``: on a GPU the
    block kernels' tf32x3 tiles (three operand tiles per product) would not fit an SM, so these
    run level by level (``takes_levels``), and their tuning space and compiled kernels are the
    slab kernels'."""
    return dtype == torch.float32 and max(g["WP"] for g in kb.plan(n, b, N)) > kb.MAX_FP32_BLOCK


def takes_levels(n: int, b: int, N: int, dtype: torch.dtype) -> bool:
    """Whether ``butterfly`` runs the shape level by level through the slab kernels, each level
    fp32-exact: ``fp32_too_wide`` on a GPU. (The interpreter has no registers to run out of:
    there the block kernels take every shape.)"""
    return fp32_too_wide(n, b, N, dtype) and not kb.interpreting()


def splits_k(kind: str, b: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a b-wide level's ``kind`` ("fwd"/"bwd") kernel runs K-split (``SPLIT_TILES``)."""
    held = HELD_BWD if kind != "fwd" else HELD_FP32_FWD if dtype == torch.float32 else HELD_FWD
    return next_pow2(b) > held


def _split_tile(kind: str, dtype: torch.dtype) -> tuple[int, int]:
    """(BN, KC) of a K-split ``kind`` kernel."""
    return SPLIT_TILES[("fwd" if kind == "fwd" else "bwd", dtype == torch.float32)]


def held_tail(b: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """KT: where a b-wide 16-bit level's forward holds a Delta slab (wider than ``FWD_WHOLE``, not
    K-split) and ``b`` exceeds half its padded width by less than a half, the padded width of the
    slab's second tile (rows ``[KP/2, b)``; ``TAIL_SLAB``), else 0 (one tile of KP rows)."""
    kp = next_pow2(b)
    if dtype == torch.float32 or kp <= FWD_WHOLE or splits_k("fwd", b, dtype):
        return 0
    tail = max(kb.MIN_BLOCK, next_pow2(b - kp // 2))
    return tail if kp // 2 + tail < kp else 0


def held_values(b: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Values of the Delta slab a b-wide level's forward holds where it holds two tiles
    (``held_tail``), else 0."""
    tail = held_tail(b, dtype)
    return (next_pow2(b) // 2 + tail) * slab("fwd", b, dtype)[1] if tail else 0


def slab(kind: str, b: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """``(KP, BN, NS)``: the padded block width, the slab width and the slabs per block."""
    kp = max(kb.MIN_BLOCK, next_pow2(b))
    if splits_k(kind, b, dtype):
        bn = _split_tile(kind, dtype)[0]
        return kp, bn, triton.cdiv(b, bn)
    if dtype == torch.float32:
        bn = min(kp, FP32_FWD_COLUMNS) if kind == "fwd" else max(kb.MIN_BLOCK, min(kp, FP32_BWD_SLAB // kp))
        return kp, bn, triton.cdiv(b, bn)
    if kind == "fwd" and kp <= FWD_WHOLE:
        return kp, kp, 1
    tail = held_tail(b, dtype) if kind == "fwd" else 0
    if tail:  # two held tiles, kp/2 + tail rows
        bn = min(kp // 2, prev_pow2(TAIL_SLAB // (kp // 2 + tail)))
        return kp, bn, triton.cdiv(b, bn)
    bn = max(kb.MIN_BLOCK, min(kp, (FWD_SLAB if kind == "fwd" else BWD_SLAB) // kp))
    return kp, bn, triton.cdiv(b, bn)


def k_chunk(kind: str, b: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """KC, the columns of x (forward) or of dMc (backward) a step covers: the whole padded block
    where the slab is held, else ``SPLIT_TILES``'."""
    return _split_tile(kind, dtype)[1] if splits_k(kind, b, dtype) else slab(kind, b, dtype)[0]


# Warps of the whole-block forward: the two Triton versions in use compile it without spills at
# opposite counts (sm_90 and sm_80, b = 160-256; the compile report): triton 3.7 on 4 warps (8
# spill 12-40 bytes at b = 256), triton 3.6 (the GPU image's) on 8 (4 spill 200-800 bytes).
WHOLE_BLOCK_WARPS = 4 if _version_tuple(TRITON_VERSION) >= (3, 7) else 8


def aligned(b: int, N: int = 1) -> bool:
    """Whether every level of a b-wide, N-level layer reads 16-byte aligned rows at its blocks
    (``butterfly.ROWS_ALIGNED``, the rule plan()'s groups follow too): b a multiple of it and, with
    N > 1, its chunks too (b/2 columns, the contiguous runs of the strided levels: 168x2's second
    level spilled 44 bytes in the dMc pass that writes dx at two stages on sm_90, 168x1 none).
    Unaligned (b = 130, 164, 196, 252, ...), on triton 3.7 the whole-block forward spilled 4-44
    bytes on 4 warps and none on 8 (sm_90 and sm_80, b = 129-256), and the dMc passes that write
    dx 8-80 bytes at two stages and none at one (the compile sweep in
    bench/results/sm90-compile-2026-12-01-misaligned.*)."""
    return b % kb.ROWS_ALIGNED == 0 and (N == 1 or kb.chunks_aligned(b))


def whole_block_warps(b: int, N: int = 1) -> int:
    """Warps of the whole-block forward of a b-wide level: WHOLE_BLOCK_WARPS where its rows'
    blocks are 16-byte aligned (``aligned``), else 8."""
    return WHOLE_BLOCK_WARPS if aligned(b, N) else 8


def wide_rc(b: int, N: int = 1) -> int:
    """Rows per step of the slab dMc pass of a b-wide level: WIDE_RC, or half where the rows are
    not 16-byte aligned at a block (330, 450, 510, and 260's strided level: 32-row steps spilled
    36-72 bytes in the row loop on sm_80, 16-row ones none on sm_90 or sm_80). A function of the
    shape alone, so dQ's bits still do not depend on the config or the GPU."""
    return WIDE_RC if aligned(b, N) else WIDE_RC // 2


def default_config(kind: str, b: int, dtype: torch.dtype = torch.bfloat16,
                   cap: tuple[int, int] | None = None, N: int = 1) -> dict:
    """The untuned config on a GPU of compute capability cap (None: the interpreter, as Hopper).
    Forward: the whole block (up to FWD_WHOLE) in 32-row tiles on ``whole_block_warps`` warps,
    else (and for fp32) 16-row tiles on 8. Backward: 8 warps, ``backward_stages`` stages (one for
    the four-tile dMc past ``takes_pair_dx``: 161-192 wide before Hopper, two spill 84 bytes at 192
    on sm_80; up to 160 at aligned widths, with or without dx, two spill nothing and one does at
    b = 144 with N = 2 on sm_80). N: the layer's levels (their alignment: ``aligned``)."""
    if kind == "fwd":
        if splits_k("fwd", b, dtype):  # a GEMM tile: rows enough that Delta's chunks are reused
            return {"BT": SPLIT_ROWS[dtype == torch.float32], "PPS": 2, "num_warps": 8, "num_stages": 2}
        whole = next_pow2(b) <= FWD_WHOLE and dtype != torch.float32
        stages = 1 if held_values(b, dtype) > TAIL_SLAB_TWO_STAGES else 2
        return {"BT": 32 if whole else 16, "PPS": 2, "num_warps": whole_block_warps(b, N) if whole else 8,
                "num_stages": stages}
    return {"num_warps": 8, "num_stages": backward_stages(b, dtype, cap, N)}


def backward_stages(b: int, dtype: torch.dtype, cap: tuple[int, int] | None = None, N: int = 1) -> int:
    """Stages of a b-wide level's dMc pass (the compile sweep, sm_90 and sm_80, triton 3.7): two
    where the block's rows are 16-byte aligned and the four-tile kernel writes dx too, or the slab
    kernels run; one for the four-tile kernel without dx, and for both dMc kernels that write dx
    at unaligned widths (two spilled 8-80 bytes at b = 130-188); one for the two-half kernel
    below 256 too (at two, 200-240 spilled 12-24 bytes on sm_80, 196-252 unaligned 8-16 on
    both), two at 256 (measured clean at one and two). The slab kernels take two, three for fp32
    up to 256 wide (their tf32x3 operands at 32-row steps: at two, ptxas's 128-register guess
    spilled 4-8 bytes on sm_80 at 144-192's strided levels; at three, 127-128 registers and none,
    on both cards, aligned or not, and two programs still share an SM)."""
    if takes_halves(b, dtype):
        return 2 if b == 2 * kb.MAX_BLOCK else 1
    if takes_pair(b, dtype):
        return 2 if takes_pair_dx(b, dtype, cap) and aligned(b, N) else 1
    return 3 if dtype == torch.float32 and b <= 2 * kb.MAX_BLOCK else 2


def candidates(kind: str, b: int, dtype: torch.dtype | None = None) -> list[dict]:
    """Configs worth tuning: forward rows per tile (16, and 32 where the whole block is held;
    32-128 K-split), programs per SM, warps (stages K-split); the dMc pass tunes warps and stages
    (its row steps are fixed)."""
    if kind != "fwd":
        return [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2)]
    if splits_k("fwd", b, dtype):  # 8 warps: on 4, 128-row 16-bit tiles spill on sm_80
        return [{"BT": bt, "PPS": pps, "num_warps": 8, "num_stages": s} for pps in (1, 2)
                for bt in (32, 64, 128) for s in (2, 3)]
    tiles = (16, 32) if next_pow2(b) <= FWD_WHOLE and dtype != torch.float32 else (16,)
    return [{"BT": bt, "PPS": pps, "num_warps": w, "num_stages": 2} for w in (4, 8) for pps in (1, 2, 4) for bt in tiles]


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _block_columns(i_b, o_w, WB: tl.constexpr, S: tl.constexpr, H: tl.constexpr):
    """The x columns of block-local indices o_w of block i_b (``butterfly._columns``' map)."""
    if S == 1:
        return i_b * WB + o_w
    return (i_b // S) * (S * WB) + (o_w // H) * (S * H) + (i_b % S) * H + o_w % H


@triton.jit
def _tile_columns(i_b, t0, o_t, TW: tl.constexpr, WB: tl.constexpr, S: tl.constexpr, H: tl.constexpr):
    """``_block_columns`` of the TW block-local indices ``t0 + o_t`` (t0 a multiple of TW); where a
    tile lies in one chunk (TW divides H), its chunk and offset are scalars, so the lanes' columns
    are one vector add (per lane, 256x2's strided halves on sm_80 spilled 4 bytes)."""
    if S == 1 or H % TW == 0:
        return (i_b // S) * (S * WB) + (t0 // H) * (S * H) + (i_b % S) * H + t0 % H + o_t
    return _block_columns(i_b, t0 + o_t, WB, S, H)


@triton.jit
def _slab(i_bs, B: tl.constexpr, S: tl.constexpr, H: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr,
          NS: tl.constexpr, KC: tl.constexpr):
    """Block i_b, slab i_n and K chunk i_k of grid index i_bs (axis 0: the slabs of a block are
    neighbours, so they walk the same rows together and share them in L2); the x columns of the
    chunk (KC lanes: the whole block when KC == KP) and of the slab (BN lanes), with their masks."""
    NK: tl.constexpr = KP // KC
    i_b = i_bs // (NS * NK)
    i_n = (i_bs // NK) % NS
    i_k = i_bs % NK
    o_k = i_k * KC + tl.arange(0, KC)
    o_c = i_n * BN + tl.arange(0, BN)
    return (i_b, i_n, i_k, _block_columns(i_b, o_k, B, S, H), o_k < B, _block_columns(i_b, o_c, B, S, H),
            o_c < B)


@triton.jit
def _delta_slab(q_ptr, i_b, i_n, k0, B: tl.constexpr, KC: tl.constexpr, BN: tl.constexpr, TRANS: tl.constexpr):
    """``[KC, BN]`` fp32: rows k0.. of block i_b's Delta, columns of slab i_n (``Delta^T`` with
    TRANS: element (k, c) is ``Delta[c, k]``), zero on padded lanes."""
    o_k = k0 + tl.arange(0, KC)
    o_c = i_n * BN + tl.arange(0, BN)
    m = (o_k < B)[:, None] & (o_c < B)[None, :]
    if TRANS:
        off = o_c[None, :] * B + o_k[:, None]
    else:
        off = o_k[:, None] * B + o_c[None, :]
    f = tl.load(q_ptr + i_b * (B * B) + off, mask=m, other=0.0)
    return tl.where((o_k[:, None] == o_c[None, :]) & m, f - 1.0, f)


@triton.jit
def _wide_apply_kernel(
    x_ptr, q_ptr, y_ptr, T, n,
    B: tl.constexpr, S: tl.constexpr, H: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
    KC: tl.constexpr, TRANS: tl.constexpr, BT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    KT: tl.constexpr,
):
    """``y = x + x Delta`` (``Delta^T`` with TRANS) on slab i_n of block i_b, for row tiles i_p,
    i_p + P, ... (persistent). With KC == KP the program builds its Delta slab once and holds it
    (KT > 0: the block's first KP rows, and its last ``B - KP`` padded to KT as a second held
    tile, rather than all B padded to a power of two: ``held_tail``); narrower, each row tile
    streams KC-wide chunks of x and of the Delta slab (K-split)."""
    i_b, i_n, _, col_k, m_k, col_c, m_c = _slab(tl.program_id(0).to(tl.int64), B, S, H, KP, BN, NS, KP)
    i_p = tl.program_id(1).to(tl.int64)
    if KC == KP:
        b_d = _delta_slab(q_ptr, i_b, i_n, 0, B, KP, BN, TRANS).to(DOT_DTYPE)
        if KT > 0:
            o_kt = KP + tl.arange(0, KT)
            col_kt, m_kt = _block_columns(i_b, o_kt, B, S, H), o_kt < B
            b_dt = _delta_slab(q_ptr, i_b, i_n, KP, B, KT, BN, TRANS).to(DOT_DTYPE)
    for i_t in range(i_p, tl.cdiv(T, BT), tl.num_programs(1)):
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        if KC == KP:
            b_x = tl.load(x_ptr + o_t[:, None] * n + col_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
            if NS == 1 and KT == 0:  # the slab is the block: its residual is the tile just read
                b_r = b_x
            else:
                b_r = tl.load(x_ptr + o_t[:, None] * n + col_c[None, :], mask=m_t[:, None] & m_c[None, :],
                              other=0.0)
            b_y = b_r.to(tl.float32) + tl.dot(b_x.to(DOT_DTYPE), b_d, input_precision=PRECISION)
            if KT > 0:
                b_xt = tl.load(x_ptr + o_t[:, None] * n + col_kt[None, :], mask=m_t[:, None] & m_kt[None, :],
                               other=0.0)
                b_y = tl.dot(b_xt.to(DOT_DTYPE), b_dt, b_y, input_precision=PRECISION)
        else:
            b_y = tl.load(x_ptr + o_t[:, None] * n + col_c[None, :], mask=m_t[:, None] & m_c[None, :],
                          other=0.0).to(tl.float32)
            for k0 in range(0, B, KC):
                o_k = k0 + tl.arange(0, KC)
                col = _block_columns(i_b, o_k, B, S, H)
                b_x = tl.load(x_ptr + o_t[:, None] * n + col[None, :], mask=m_t[:, None] & (o_k < B)[None, :],
                              other=0.0)
                b_dk = _delta_slab(q_ptr, i_b, i_n, k0, B, KC, BN, TRANS).to(DOT_DTYPE)
                b_y = tl.dot(b_x.to(DOT_DTYPE), b_dk, b_y, input_precision=PRECISION)
        tl.store(y_ptr + o_t[:, None] * n + col_c[None, :], b_y.to(y_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _store_dmc_slab(ptr, acc, i_n, i_k, B: tl.constexpr, KC: tl.constexpr, BN: tl.constexpr, TRANS: tl.constexpr):
    """Store a dMc slab (rows i_n BN.., columns i_k KC.. of the ``[B, B]`` block at ptr; the
    other way round with TRANS)."""
    o_k = i_k * KC + tl.arange(0, KC)
    o_c = i_n * BN + tl.arange(0, BN)
    if TRANS:  # acc [KC, BN]: dMc[k, c]
        tl.store(ptr + o_k[:, None] * B + o_c[None, :], acc, mask=(o_k < B)[:, None] & (o_c < B)[None, :])
    else:  # acc [BN, KC]: dMc[c, k]
        tl.store(ptr + o_c[:, None] * B + o_k[None, :], acc, mask=(o_c < B)[:, None] & (o_k < B)[None, :])


@triton.jit
def _wide_grad_kernel(
    x_ptr, g_ptr, dd_ptr, dq_ptr, T, n, ROWS, NB,
    B: tl.constexpr, S: tl.constexpr, H: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr, NS: tl.constexpr,
    KC: tl.constexpr, TRANS: tl.constexpr, FUSED_DQ: tl.constexpr, RC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Rows [i_s ROWS, (i_s+1) ROWS) of slab i_n, chunk i_k of block i_b: this split's ``[BN,
    KC]`` tile of dMc, rows ``x[:, slab]^T g[:, chunk]`` (``[KC, BN]``, ``g[:, chunk]^T x[:,
    slab]``, with TRANS), reduced RC rows at a time; then dQ (FUSED_DQ: the only split) or the
    split's partial."""
    i_b, i_n, i_k, col_k, m_k, col_c, m_c = _slab(tl.program_id(0).to(tl.int64), B, S, H, KP, BN, NS, KC)
    i_s = tl.program_id(1).to(tl.int64)
    if TRANS:
        acc = tl.zeros([KC, BN], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, KC], dtype=tl.float32)
    row_lo = i_s * ROWS
    row_hi = tl.minimum(row_lo + ROWS, T)
    for t0 in range(row_lo, row_hi, RC):
        o_t = t0 + tl.arange(0, RC)
        m_t = o_t < row_hi
        b_g = tl.load(g_ptr + o_t[:, None] * n + col_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_x = tl.load(x_ptr + o_t[:, None] * n + col_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0)
        if TRANS:
            acc = tl.dot(tl.trans(b_g.to(DOT_DTYPE)), b_x.to(DOT_DTYPE), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(b_x.to(DOT_DTYPE)), b_g.to(DOT_DTYPE), acc, input_precision=PRECISION)
    _store_dmc_slab(_dmc_base(dd_ptr, dq_ptr, i_s, i_b, NB, B, FUSED_DQ), acc, i_n, i_k, B, KC, BN, TRANS)


@triton.jit
def _store_tile(ptr, acc, o_r, o_c, B: tl.constexpr):
    tl.store(ptr + o_r[:, None] * B + o_c[None, :], acc, mask=(o_r < B)[:, None] & (o_c < B)[None, :])


@triton.jit
def _row_tile(ptr, o_t, n, cols, mask, DOT_DTYPE: tl.constexpr):
    """Rows o_t, columns cols of a row-major ``[T, n]`` activation, as a dot operand."""
    return tl.load(ptr + o_t[:, None] * n + cols[None, :], mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _dmc_base(dd_ptr, dq_ptr, i_s, i_b, NB, B: tl.constexpr, FUSED_DQ: tl.constexpr):
    """Where row split i_s stores block i_b's ``[B, B]`` dMc: dQ itself (FUSED_DQ, one split) or
    the split's partial."""
    if FUSED_DQ:
        base = dq_ptr + i_b * (B * B)
    else:
        base = dd_ptr + (i_s * NB + i_b) * (B * B)
    return base


@triton.jit
def _held_delta(d_base, o_r, o_c, B: tl.constexpr, FROM_Q: tl.constexpr, TRANS: tl.constexpr,
                DOT_DTYPE: tl.constexpr):
    """Tile (rows o_r, columns o_c) of the ``[B, B]`` Delta that dx is ``g + g Delta`` by: stored
    at d_base, or (FROM_Q) the level's Q block there, ``F^T - I`` (``F - I`` with TRANS)."""
    m = (o_r < B)[:, None] & (o_c < B)[None, :]
    if FROM_Q and not TRANS:
        t = tl.load(d_base + o_c[None, :] * B + o_r[:, None], mask=m, other=0.0)
    else:
        t = tl.load(d_base + o_r[:, None] * B + o_c[None, :], mask=m, other=0.0)
    if FROM_Q:
        t = tl.where((o_r[:, None] == o_c[None, :]) & m, t - 1.0, t)
    return t.to(DOT_DTYPE)


@triton.jit
def _wide_grad_pair_kernel(
    x_ptr, g_ptr, dd_ptr, dq_ptr, d_ptr, dx_ptr, T, n, ROWS, NB,
    B: tl.constexpr, S: tl.constexpr, H: tl.constexpr, A: tl.constexpr, RP: tl.constexpr,
    TRANS: tl.constexpr, FUSED_DQ: tl.constexpr, WRITE_DX: tl.constexpr, DELTA_FROM_Q: tl.constexpr,
    RC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows [i_s ROWS, (i_s+1) ROWS) of block i_b: this split's whole dMc, ``x^T g`` (``g^T x``
    with TRANS), for a block of ``A < B <= A + RP`` columns held as four tiles (columns [0, A) and
    [A, B), the second padded to RP) rather than one padded to a power of two: 160 columns are
    25K fp32 values this way, 64K padded to 256. So g and x are each read once.

    With WRITE_DX also ``dx = g + g Delta`` on the same row steps, Delta held as four tiles too,
    so g is read once for both gradients: ``[NB, B, B]`` at d_ptr, the block's ``F^T - I`` (``F -
    I`` with TRANS), built by the caller in x's dtype (``kernels/coarse.py``: F a coarse block) or,
    with DELTA_FROM_Q, made here from the level's Q (fp32; F a Q block)."""
    i_b = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_a = tl.arange(0, A)
    o_r = A + tl.arange(0, RP)
    col_a = _block_columns(i_b, o_a, B, S, H)
    col_r, m_r = _block_columns(i_b, o_r, B, S, H), o_r < B
    if WRITE_DX:
        d_base = d_ptr + i_b * (B * B)
        d_aa = _held_delta(d_base, o_a, o_a, B, DELTA_FROM_Q, TRANS, DOT_DTYPE)
        d_ar = _held_delta(d_base, o_a, o_r, B, DELTA_FROM_Q, TRANS, DOT_DTYPE)
        d_ra = _held_delta(d_base, o_r, o_a, B, DELTA_FROM_Q, TRANS, DOT_DTYPE)
        d_rr = _held_delta(d_base, o_r, o_r, B, DELTA_FROM_Q, TRANS, DOT_DTYPE)
    acc_aa = tl.zeros([A, A], dtype=tl.float32)
    acc_ar = tl.zeros([A, RP], dtype=tl.float32)
    acc_ra = tl.zeros([RP, A], dtype=tl.float32)
    acc_rr = tl.zeros([RP, RP], dtype=tl.float32)
    row_lo = i_s * ROWS
    row_hi = tl.minimum(row_lo + ROWS, T)
    for t0 in range(row_lo, row_hi, RC):
        o_t = t0 + tl.arange(0, RC)
        m_t = (o_t < row_hi)[:, None]
        x_a = _row_tile(x_ptr, o_t, n, col_a, m_t, DOT_DTYPE)
        x_r = _row_tile(x_ptr, o_t, n, col_r, m_t & m_r[None, :], DOT_DTYPE)
        g_a = _row_tile(g_ptr, o_t, n, col_a, m_t, DOT_DTYPE)
        g_r = _row_tile(g_ptr, o_t, n, col_r, m_t & m_r[None, :], DOT_DTYPE)
        if TRANS:  # dMc rows come from g
            u_a, u_r, v_a, v_r = g_a, g_r, x_a, x_r
        else:
            u_a, u_r, v_a, v_r = x_a, x_r, g_a, g_r
        acc_aa = tl.dot(tl.trans(u_a), v_a, acc_aa, input_precision=PRECISION)
        acc_ar = tl.dot(tl.trans(u_a), v_r, acc_ar, input_precision=PRECISION)
        acc_ra = tl.dot(tl.trans(u_r), v_a, acc_ra, input_precision=PRECISION)
        acc_rr = tl.dot(tl.trans(u_r), v_r, acc_rr, input_precision=PRECISION)
        if WRITE_DX:
            dx_a = tl.dot(g_a, d_aa, g_a.to(tl.float32), input_precision=PRECISION)
            dx_a = tl.dot(g_r, d_ra, dx_a, input_precision=PRECISION)
            dx_r = tl.dot(g_a, d_ar, g_r.to(tl.float32), input_precision=PRECISION)
            dx_r = tl.dot(g_r, d_rr, dx_r, input_precision=PRECISION)
            tl.store(dx_ptr + o_t[:, None] * n + col_a[None, :], dx_a.to(dx_ptr.dtype.element_ty), mask=m_t)
            tl.store(dx_ptr + o_t[:, None] * n + col_r[None, :], dx_r.to(dx_ptr.dtype.element_ty),
                     mask=m_t & m_r[None, :])
    base = _dmc_base(dd_ptr, dq_ptr, i_s, i_b, NB, B, FUSED_DQ)
    _store_tile(base, acc_aa, o_a, o_a, B)
    _store_tile(base, acc_ar, o_a, o_r, B)
    _store_tile(base, acc_ra, o_r, o_a, B)
    _store_tile(base, acc_rr, o_r, o_r, B)


@triton.jit
def _wide_grad_halves_kernel(
    x_ptr, g_ptr, dd_ptr, dq_ptr, d_ptr, dx_ptr, T, n, ROWS, NB,
    B: tl.constexpr, S: tl.constexpr, H: tl.constexpr, A: tl.constexpr,
    TRANS: tl.constexpr, FUSED_DQ: tl.constexpr, WRITE_DX: tl.constexpr, DELTA_FROM_Q: tl.constexpr,
    RC: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows [i_s ROWS, (i_s+1) ROWS) of block i_b, ``A + PAIR_REST < B <= 2 A`` columns (193-256):
    program (i_b, i_h) holds half i_h of this split's dMc, ``x[:, half]^T g`` (the columns
    ``g^T x[:, half]`` with TRANS), as two ``[A, A]`` tiles (g's columns [0, A) and [A, B)),
    reading g's whole rows and x's half: the slab kernel's traffic (x once, g twice), its dMc
    held in two tiles rather than one ``[A, 2A]`` one.

    With WRITE_DX also dx's columns of that half from the same rows of g, ``dx[:, h] = g[:, h] +
    g[:, :A] Dt[:A, h] + g[:, A:] Dt[A:, h]``, the two tiles of Dt (the Delta dx is ``g + g Dt``
    by, as ``_wide_grad_pair_kernel``'s d_ptr) held: g is read twice for both gradients rather
    than three times (dx's own pass)."""
    i_b = tl.program_id(0).to(tl.int64) // 2
    i_h = tl.program_id(0) % 2
    i_s = tl.program_id(1).to(tl.int64)
    o_a = tl.arange(0, A)
    o_r = A + o_a
    o_h = i_h * A + o_a
    col_a, col_r, col_h = _tile_columns(i_b, 0, o_a, A, B, S, H), _tile_columns(i_b, A, o_a, A, B, S, H), \
        _tile_columns(i_b, i_h * A, o_a, A, B, S, H)
    m_r, m_h = o_r < B, o_h < B
    if WRITE_DX:
        d_base = d_ptr + i_b * (B * B)
        d_ah = _held_delta(d_base, o_a, o_h, B, DELTA_FROM_Q, TRANS, DOT_DTYPE)
        d_rh = _held_delta(d_base, o_r, o_h, B, DELTA_FROM_Q, TRANS, DOT_DTYPE)
    acc_a = tl.zeros([A, A], dtype=tl.float32)
    acc_r = tl.zeros([A, A], dtype=tl.float32)
    row_lo = i_s * ROWS
    row_hi = tl.minimum(row_lo + ROWS, T)
    for t0 in range(row_lo, row_hi, RC):
        o_t = t0 + tl.arange(0, RC)
        m_t = (o_t < row_hi)[:, None]
        x_h = _row_tile(x_ptr, o_t, n, col_h, m_t & m_h[None, :], DOT_DTYPE)
        g_a = _row_tile(g_ptr, o_t, n, col_a, m_t, DOT_DTYPE)
        g_r = _row_tile(g_ptr, o_t, n, col_r, m_t & m_r[None, :], DOT_DTYPE)
        if TRANS:  # dMc[:A, h] and dMc[A:, h]
            acc_a = tl.dot(tl.trans(g_a), x_h, acc_a, input_precision=PRECISION)
            acc_r = tl.dot(tl.trans(g_r), x_h, acc_r, input_precision=PRECISION)
        else:  # dMc[h, :A] and dMc[h, A:]
            acc_a = tl.dot(tl.trans(x_h), g_a, acc_a, input_precision=PRECISION)
            acc_r = tl.dot(tl.trans(x_h), g_r, acc_r, input_precision=PRECISION)
        if WRITE_DX:
            g_h = tl.where(i_h == 0, g_a, g_r)  # g's own columns of the half, already loaded
            dx_h = tl.dot(g_a, d_ah, g_h.to(tl.float32), input_precision=PRECISION)
            dx_h = tl.dot(g_r, d_rh, dx_h, input_precision=PRECISION)
            tl.store(dx_ptr + o_t[:, None] * n + col_h[None, :], dx_h.to(dx_ptr.dtype.element_ty),
                     mask=m_t & m_h[None, :])
    base = _dmc_base(dd_ptr, dq_ptr, i_s, i_b, NB, B, FUSED_DQ)
    if TRANS:
        _store_tile(base, acc_a, o_a, o_h, B)
        _store_tile(base, acc_r, o_r, o_h, B)
    else:
        _store_tile(base, acc_a, o_h, o_a, B)
        _store_tile(base, acc_r, o_h, o_r, B)


@triton.jit
def _wide_dq_kernel(dd_ptr, dq_ptr, SPLITS, NB, B: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr):
    """dQ of rows ``[i_r BR, (i_r+1) BR)`` of block i_b: its SPLITS partial dMc added in split
    order (deterministic)."""
    i_b = tl.program_id(0).to(tl.int64)
    i_r = tl.program_id(1).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR)
    o_k = tl.arange(0, KP)
    off = o_r[:, None] * B + o_k[None, :]
    m = (o_r < B)[:, None] & (o_k < B)[None, :]
    acc = tl.zeros([BR, KP], dtype=tl.float32)
    for i_s in range(0, SPLITS):
        acc += tl.load(dd_ptr + (i_s * NB + i_b) * (B * B) + off, mask=m, other=0.0)
    tl.store(dq_ptr + i_b * (B * B) + off, acc, mask=m)


# ---------------------------------------------------------------------------------------------
# launchers


def _dot_meta(dtype: torch.dtype) -> dict:
    """Row products in x's dtype with fp32 accumulation (tf32x3 for fp32 x; fp32 in the
    interpreter, whose bf16 dots are wrong); no block products here."""
    meta = kb._dot_meta(dtype, 2 * kb.MAX_BLOCK)
    return dict(DOT_DTYPE=meta["DOT_DTYPE"], PRECISION=meta["PRECISION"])


def _layout(grp: dict, b: int, kind: str, dtype: torch.dtype) -> dict:
    kp, bn, ns = slab(kind, b, dtype)
    layout = dict(B=b, S=grp["S"], H=grp["H"], KP=kp, BN=bn, NS=ns, KC=k_chunk(kind, b, dtype))
    if kind == "fwd":  # the held slab's rows as one tile of KP, or KP/2 and a tail of KT (``held_tail``)
        tail = held_tail(b, dtype)
        layout.update(KT=tail, **({"KP": kp // 2, "KC": kp // 2} if tail else {}))
    return layout


def takes_pair(b: int, dtype: torch.dtype) -> bool:
    """Whether the dMc pass of a b-wide level holds the whole dMc (``_wide_grad_pair_kernel``)."""
    return kb.MAX_BLOCK < b <= kb.MAX_BLOCK + PAIR_REST and (dtype != torch.float32 or kb.interpreting())


def takes_halves(b: int, dtype: torch.dtype) -> bool:
    """Whether the dMc pass of a b-wide level holds half the block's dMc per program as two tiles
    (``_wide_grad_halves_kernel``): 193-256 wide, 16-bit (the interpreter: any dtype)."""
    return (kb.MAX_BLOCK + PAIR_REST < b <= 2 * kb.MAX_BLOCK
            and (dtype != torch.float32 or kb.interpreting()))


def writes_dx(b: int, dtype: torch.dtype, cap: tuple[int, int] | None = None) -> bool:
    """Whether the dMc pass of a b-wide level can also write dx (``grad_q``'s dx and delta) on a
    GPU of compute capability cap (None: the interpreter, as Hopper): the four-tile kernel's
    ``takes_pair_dx``, and the two-half kernel (193-256) on every arch, before Hopper only where
    the rows are 16-byte aligned at a block (194, 198: 72-80 bytes of spills at one stage on triton
    3.7; 196, 204: 48 bytes on triton 3.6, the GPU image's)."""
    halves = takes_halves(b, dtype) and (aligned(b) or not register_operand_mma(cap))
    return takes_pair_dx(b, dtype, cap) or halves


def takes_pair_dx(b: int, dtype: torch.dtype, cap: tuple[int, int] | None = None) -> bool:
    """Whether that dMc pass can also write dx (``grad_q``'s dx and delta) on a GPU of compute
    capability cap (None: the interpreter, as Hopper): up to 160 wide, 192 where the held tiles
    stay in shared memory (``register_operand_mma``: Hopper, datacenter Blackwell), there not at
    widths of an odd number of column pairs past 160 (162, 166, ...: 72-92 bytes of spills in the
    row loop at one or two stages)."""
    if register_operand_mma(cap):
        return takes_pair(b, dtype) and b <= kb.MAX_BLOCK + PAIR_DX_REST
    return takes_pair(b, dtype) and b <= kb.MAX_BLOCK + PAIR_DX_REST_HOPPER and (b <= 160 or b % 4 == 0)


# The compile report's pre-Hopper arch, as a capability.
SM80 = (8, 0)


def pair_dx_archs(b: int, dtype: torch.dtype) -> dict:
    """What a compile spec of the dMc pass that writes dx carries: ``archs=(90,)`` where sm_80 does
    not launch it (161-192 wide, and 193-256 where rows are not 16-byte aligned), nothing where
    both do."""
    return {} if writes_dx(b, dtype, SM80) else {"archs": (90,)}


def _pick(kind: str, key, x, tuned_as=None) -> tuple[str, dict]:
    """The config for ``key``'s kernels: forced, or tuned (the cache entry of ``tuned_as``, the
    layer shape that runs them, else ``key``), else this module's default."""
    source, cfg = kb.pick_config(kind, *(tuned_as or key), x.dtype, x.device)
    if source != "default":
        return source, cfg
    return "default", default_config(kind, key[1], x.dtype, capability(x.device), key[2])


def apply_into(x, q, transpose, k0, key, y) -> None:
    """``y = x + x Delta`` per block of the wide level k0 (``Delta^T`` with transpose); x and y
    contiguous ``[T, n]``, q the level's Q ``[1, D, b, b]`` (fp32, contiguous)."""
    T, n = x.shape
    if T == 0:
        return
    b = key[1]
    grp = level_group(*key, k0)
    layout = _layout(grp, b, "fwd", x.dtype)
    source, cfg = _pick("fwd", key, x)
    LAST_LAUNCH["butterfly_wide"] = (source, dict(cfg))
    blocks = grp["NB"] * layout["NS"]
    want = min(triton.cdiv(cfg["PPS"] * num_sms(x.device), blocks), T // kb._rows_min(grp, b))
    programs = max(1, min(triton.cdiv(T, cfg["BT"]), max(triton.cdiv(num_sms(x.device), blocks), want)))
    wrap_triton(_wide_apply_kernel)[(blocks, programs)](
        x, q, y, T, n, **layout, TRANS=transpose, BT=cfg["BT"], **_dot_meta(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2),
    )


def grad_q(x, g, shape, transpose, k0, key, dtype=torch.float32, tuned_as=None, dx=None, delta=None,
           delta_from_q=False):
    """dQ of the level (``dMc``) of ``apply_into``'s product, for contiguous x, g; ``shape`` is
    the level's Q's, ``[1, D, b, b]``, dtype dQ's (accumulated in fp32 either way); tuned_as
    the layer shape whose tuned backward config to use (``kernels/coarse.py``). With dx (``[T,
    n]``, written) and delta (``[D, b, b]`` in x's dtype, or the level's Q with delta_from_q), the
    same pass also writes ``dx = g + g Delta`` per block (``writes_dx``; ``_wide_grad_pair_kernel``
    says which Delta)."""
    T, n = x.shape
    b = key[1]
    grp = level_group(*key, k0)
    write_dx = dx is not None
    if write_dx and (delta is None or not writes_dx(b, x.dtype, capability(x.device))):
        raise ValueError(f"wide.grad_q: the dMc pass writes dx only where wide.writes_dx holds "
                         f"({kb.MAX_BLOCK + 1}-{2 * kb.MAX_BLOCK} wide, by arch, and not at every b = 2 mod 4) "
                         f"and given its Delta (b={b}, {x.dtype}, delta given: {delta is not None})")
    if T == 0:
        return torch.zeros(shape, dtype=dtype, device=x.device)
    layout = _layout(grp, b, "bwd", x.dtype)
    source, cfg = _pick("bwd", key, x, tuned_as)
    LAST_LAUNCH["butterfly_wide_bwd"] = (source, dict(cfg))
    splits, rows = kb._splits(T, grp, b, num_sms(x.device))
    dq = new_empty(*shape, dtype=dtype, device=x.device)
    NB = grp["NB"]
    partial = dq if splits == 1 else new_empty(splits, NB, b, b, dtype=torch.float32, device=x.device)
    warps, stages = cfg["num_warps"], cfg.get("num_stages", 2)
    if takes_pair(b, x.dtype):
        wrap_triton(_wide_grad_pair_kernel)[(NB, splits)](
            x, g, partial, dq, delta if write_dx else x, dx if write_dx else x, T, n, rows, NB, B=b, S=grp["S"],
            H=grp["H"], A=kb.MAX_BLOCK, RP=pair_rest(b), TRANS=transpose,
            FUSED_DQ=splits == 1, WRITE_DX=write_dx, DELTA_FROM_Q=delta_from_q, RC=PAIR_RC, **_dot_meta(x.dtype),
            num_warps=warps, num_stages=stages,
        )
    elif takes_halves(b, x.dtype):
        wrap_triton(_wide_grad_halves_kernel)[(NB * 2, splits)](
            x, g, partial, dq, delta if write_dx else x, dx if write_dx else x, T, n, rows, NB, B=b, S=grp["S"],
            H=grp["H"], A=kb.MAX_BLOCK, TRANS=transpose, FUSED_DQ=splits == 1, WRITE_DX=write_dx,
            DELTA_FROM_Q=delta_from_q, RC=HALVES_RC, **_dot_meta(x.dtype), num_warps=warps, num_stages=stages,
        )
    else:
        wrap_triton(_wide_grad_kernel)[(NB * layout["NS"] * (layout["KP"] // layout["KC"]), splits)](
            x, g, partial, dq, T, n, rows, NB, **layout, TRANS=transpose, FUSED_DQ=splits == 1, RC=wide_rc(b, key[2]),
            **_dot_meta(x.dtype), num_warps=warps, num_stages=stages,
        )
    if splits > 1:
        kp, br = layout["KP"], max(1, DQ_SUM // layout["KP"])
        wrap_triton(_wide_dq_kernel)[(NB, triton.cdiv(b, br))](
            partial, dq, splits, NB, B=b, KP=kp, BR=br, num_warps=warps, num_stages=1,
        )
    return dq


# ---------------------------------------------------------------------------------------------
# ops and autograd


def _apply_fake(x, q, transpose, k0, n, b, N):
    return x.new_empty(x.shape)


def _grad_fake(x, g, q, transpose, k0, n, b, N):
    return q.new_empty(q.shape, dtype=torch.float32)


@kernel_op("boft_triton::wide_apply", _apply_fake)
def wide_apply(x: torch.Tensor, q: torch.Tensor, transpose: bool, k0: int, n: int, b: int, N: int) -> torch.Tensor:
    """``x + x Delta`` on each block of the wide level k0 (``Delta^T`` with transpose); x ``[T, n]``,
    q that level's Q ``[1, D, b, b]`` (fp32). (n, b, N) name the layer shape."""
    x = x.contiguous()
    y = new_empty(*x.shape, dtype=x.dtype, device=x.device)
    apply_into(x, q.contiguous(), transpose, k0, (n, b, N), y)
    return y


@kernel_op("boft_triton::wide_grad_q", _grad_fake)
def wide_grad_q(x: torch.Tensor, g: torch.Tensor, q: torch.Tensor, transpose: bool, k0: int, n: int, b: int,
                N: int) -> torch.Tensor:
    """dl/dq of ``wide_apply``."""
    return grad_q(x.contiguous(), g.contiguous(), q.shape, transpose, k0, (n, b, N))


def _grads_fake(x, g, q, transpose, k0, n, b, N):
    return x.new_empty(x.shape), q.new_empty(q.shape, dtype=torch.float32)


@kernel_op("boft_triton::wide_grads", _grads_fake)
def wide_grads(x: torch.Tensor, g: torch.Tensor, q: torch.Tensor, transpose: bool, k0: int, n: int, b: int,
               N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dl/dx, dl/dq)`` of ``wide_apply`` in one pass over (x, g), Delta made from Q in the
    program (``writes_dx``)."""
    x, g, q = x.contiguous(), g.contiguous(), q.contiguous()
    dx = new_empty(*x.shape, dtype=x.dtype, device=x.device)
    dq = grad_q(x, g, q.shape, transpose, k0, (n, b, N), dx=dx, delta=q, delta_from_q=True)
    return dx, dq


def _setup_context(ctx, inputs, output):
    x, q, transpose, k0, n, b, N = inputs
    ctx.save_for_backward(x, q)
    ctx.args = (transpose, k0, n, b, N)


def _backward(ctx, g):
    """dl/dx is the transposed product (``g Mc^T``, ``g Mc`` with transpose); dl/dq a pass over
    (x, g). Both: one pass where the dMc kernel holds Delta's tiles too (``writes_dx``)."""
    x, q = ctx.saved_tensors
    transpose, k0, n, b, N = ctx.args
    none = (None,) * 5
    if g is None:
        return None, None, *none
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and writes_dx(b, g.dtype, capability(g.device)):
        return *wide_grads(x, g, q, transpose, k0, n, b, N), *none
    dx = wide_apply(g, q, not transpose, k0, n, b, N) if ctx.needs_input_grad[0] else None
    dq = wide_grad_q(x, g, q, transpose, k0, n, b, N) if ctx.needs_input_grad[1] else None
    return dx, dq, *none


wide_apply.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# what a launch compiles (for the compile report: bench/kernel_profile.py)


def launch_specs(grp: dict, b: int, dtype: torch.dtype, tag: str = "", N: int = 1) -> list[dict]:
    """Every kernel the wide launchers run for level group ``grp`` of an N-level layer, at the
    default config (see ``butterfly.launch_specs``): wide (forward), wide_T (dx), wide_grad (dMc, several row splits),
    wide_grad_dq (one split), wide_dq (adds the splits' partials)."""
    ptr = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    with kb._compiling():  # the dots and stages a GPU launches (the interpreter takes other dMc kernels for fp32)
        dot = _dot_meta(dtype)
        fwd, bwd = default_config("fwd", b, dtype, N=N), default_config("bwd", b, dtype, N=N)
        bwd_80 = default_config("bwd", b, dtype, SM80, N)  # as launched before Hopper, where that differs
    bwd_arch = {80: {"num_stages": bwd_80["num_stages"]}} if bwd_80 != bwd else {}
    shape = dict(width=grp["WP"], levels=1)
    specs = []
    sig = {"x_ptr": ptr, "q_ptr": "*fp32", "y_ptr": ptr, "T": "i32", "n": "i32"}
    for name, trans in (("wide", False), ("wide_T", True)):
        specs.append(dict(name=name + tag, **shape, fn=_wide_apply_kernel, signature=sig, divisible=("n",),
                          constexprs={**_layout(grp, b, "fwd", dtype), "TRANS": trans, "BT": fwd["BT"], **dot},
                          config=fwd, num_warps=fwd["num_warps"], num_stages=fwd["num_stages"]))
    gsig = {"x_ptr": ptr, "g_ptr": ptr, "dd_ptr": "*fp32", "dq_ptr": "*fp32", "T": "i32", "n": "i32",
            "ROWS": "i32", "NB": "i32"}
    pair_sig = {**gsig, "d_ptr": ptr, "dx_ptr": ptr}
    with kb._compiling():
        pair, halves = takes_pair(b, dtype), takes_halves(b, dtype)
    for name, fused in (("wide_grad", False), ("wide_grad_dq", True)):
        if pair:
            fn, sig, constexprs = _wide_grad_pair_kernel, pair_sig, {
                "B": b, "S": grp["S"], "H": grp["H"], "A": kb.MAX_BLOCK,
                "RP": pair_rest(b), "RC": PAIR_RC, "WRITE_DX": False, "DELTA_FROM_Q": False}
        elif halves:
            fn, sig, constexprs = _wide_grad_halves_kernel, pair_sig, {
                "B": b, "S": grp["S"], "H": grp["H"], "A": kb.MAX_BLOCK, "RC": HALVES_RC, "WRITE_DX": False,
                "DELTA_FROM_Q": False}
        else:
            fn, sig, constexprs = _wide_grad_kernel, gsig, {**_layout(grp, b, "bwd", dtype), "RC": wide_rc(b, N)}
        kind = "_pair" if pair else "_halves" if halves else ""
        specs.append(dict(name=name + kind + tag, **shape, fn=fn, signature=sig,
                          divisible=("n", "ROWS"), constexprs={**constexprs, "TRANS": False, "FUSED_DQ": fused, **dot},
                          config=bwd, num_warps=bwd["num_warps"], num_stages=bwd["num_stages"], arch_options=bwd_arch))
    with kb._compiling():
        pair_dx, archs = writes_dx(b, dtype), pair_dx_archs(b, dtype)
    if pair_dx:  # both gradients in one pass (wide_grads): dx too, Delta made from Q; where sm_80 does not, Hopper only
        specs += [dict(spec, name=spec["name"].replace("wide_grad", "wide_dx_grad", 1),
                       signature={**spec["signature"], "d_ptr": "*fp32"},
                       constexprs={**spec["constexprs"], "WRITE_DX": True, "DELTA_FROM_Q": True}, **archs)
                  for spec in specs if spec["name"].startswith("wide_grad")]
    kp = slab("bwd", b, dtype)[0]
    specs.append(dict(name="wide_dq" + tag, **shape, fn=_wide_dq_kernel,
                      signature={"dd_ptr": "*fp32", "dq_ptr": "*fp32", "SPLITS": "i32", "NB": "i32"}, divisible=(),
                      constexprs={"B": b, "KP": kp, "BR": max(1, DQ_SUM // kp)}, config=bwd,
                      num_warps=bwd["num_warps"], num_stages=1))
    return specs
