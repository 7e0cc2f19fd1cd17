"""Butterfly rotation of rows, ``y = x M`` (or ``x M^T``), as dense block products on tensor cores.

``M = B_{N-1} ... B_0`` is block-diagonal with coarse blocks of ``L = b 2^(N-1)`` columns, so
(as Monarch matrices and FlashFFTConv do with structured products) the rotation is applied as
dense ``L x L`` block products with ``tl.dot``:

1. **Blocks built where they are used.** Each program loads the Q blocks of its coarse block (each
   factor as a dense, mostly-zero tile read through a masked gather, so only Q's own values move)
   and multiplies them into ``Mc`` in fp32 with ``tl.dot`` (``tf32x3``: fp32-accurate on tensor
   cores). The parameters therefore cost one read of Q per program and nothing else: no blocks are
   written to or read back from memory, and no torch op runs per call.
2. **Residual form.** The kernels apply ``y_c = x_c + x_c Delta_c`` with ``Delta = Mc - I``, so the
   identity part of M is exact and only the (small) rotation is rounded to x's dtype for the dot.
   Operands are x's dtype (bf16/fp16) with fp32 accumulation; fp32 inputs use ``tf32x3``. Programs
   are persistent over row tiles: each builds its Delta tile once, then streams rows, so x is read
   once and y written once.
3. **Backward.** ``dx = g Mc^T = g + g Delta^T`` and ``dMc = sum_rows x_c^T g_c`` in one pass over
   (x, g); then ``dQ`` of each factor ``F_k`` of ``Mc = F_{k1-1} ... F_{k0}`` is
   ``(F_{k1-1} ... F_{k+1})^T dMc (F_{k-1} ... F_{k0})^T`` on its nonzeros, stored straight into
   dQ (every Q value sits in exactly one block, so no accumulation). The row sum is deterministic:
   fixed row *splits* (set by T, the shape and the device, never the tile config) each reduce
   their rows in chunks of a fixed ``RC`` rows; with one split the same program goes on to dQ, with
   several each writes a partial and a small kernel adds them in split order before dQ. No float
   atomics, so the bits do not depend on the tile config or the order programs run in. (With
   several factor groups, a lower group's input is the upper group's forward output, whose bits a
   GPU may round differently under another forward tile, e.g. mma instead of wgmma; the interpreter
   cannot show it.) When x
   needs no gradient the dx half is compiled out; when Q needs none, dx is the forward kernel with
   the transpose flipped.
4. **Every (b, N).**
   - small coarse blocks (below tl.dot's 16): several consecutive blocks are packed into one
     block-diagonal block of at least 16 columns (``pack``), so every product is a 16-wide dot;
   - large coarse blocks (``L > MAX_BLOCK``): the factors are applied in groups of consecutive
     levels, each group with its own dense blocks of at most MAX_BLOCK columns (a group of high
     levels acts on interleaved columns). Where every group's blocks fit on chip
     (``fused_groups``), one program holds its coarse block's row tile and applies the groups in
     turn, permuting the tile in registers between their block frames (chunks padded to a power
     of two), so the forward reads x once however wide L is; the backward takes one pass over
     (x, g) per group (``fused_grad``: each recomputes its group's input and output gradient), or,
     where a group's dMc does not fit, recomputes the group inputs for ``plan``'s per-group passes.
     For 16-bit inputs with enough rows (L up to ``coarse.MAX_L``) the backward instead runs through the
     dense coarse blocks (``kernels/coarse.py``): the whole ``L x L`` dMc in one pass, which up
     to 256 wide (except 161-192 before Hopper) writes dx too (else dx is the transposed one-pass
     forward), then dQ by a parameter-sized chain pass per group (``fused_chain_dq``), so the
     activations move three or four times rather than ``2G + 1``.
     Where the whole coarse block's groups do not fit on chip but a butterfly of its low levels
     does (``split_prefix``: 80x3, 96x3), those levels run as that one-pass prefix and the rest
     a pass per group. Other shapes run one pass per group of ``plan``, the kernels gathering
     interleaved columns with a column map;
   - single levels wider than MAX_BLOCK (b > 128, a group of their own): the slab kernels of
     ``wide.py``, each program owning a slab of a block's output columns (K-split, a tiled GEMM
     per block, where the slab does not fit: 16-bit b > 512); fp32 inputs whose blocks are wider
     than MAX_FP32_BLOCK run level by level through them too (``wide.takes_levels``).

Widths that are not a power of two are padded to one (masked lanes, zero Delta). The block layout
(which Q value sits where) is ``reference.group_blocks``'s; the tests hold the kernels to it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.library import wrap_triton

from boft_triton.tuning import valid_config, warn_once

from ._common import (
    LAST_LAUNCH,
    cached_config,
    capability as device_capability,
    interpreting,
    kernel_op,
    new_empty,
    next_pow2,
    num_sms,
    register_cap,
    register_operand_mma,
    tl,
    triton,
)

# Widest dense block a program holds (its Delta tile and, backward, its dMc accumulator).
MAX_BLOCK = 128
# tl.dot needs every dim >= 16: narrower blocks are packed (or padded) to this width.
MIN_BLOCK = 16
# Rows per step of the backward's dMc reduction: fixed (never tuned) so the bits of dQ do not
# depend on the tile config.
RC = 64
# ... but on pre-Hopper GPUs (sm_80: mma.sync holds both operands in registers) 128-wide groups
# step 16 rows in one stage (their untuned config): at 64 rows their row loop spilled 104-252
# bytes a thread on sm_80, at 32 rows 0-72, at 16 rows in two stages 0-48, in one none (the
# compile report). Hopper keeps 64 rows and two stages: its wgmma takes 64-row tiles, and spills
# nothing.
RC_SM80_WIDE = 16
STAGES_SM80_WIDE = 1


# Rows of 16-bit values are 16-byte aligned at a group's blocks only where its contiguous runs of
# columns (the block; its chunks where the levels interleave) are a multiple of ROWS_ALIGNED
# columns (the wide levels' rule too: ``wide.aligned``). Elsewhere (116x1, 66x2's 33-wide chunks, ...) the row loads split into narrower vectors
# whose addresses take registers, and 128-wide groups spilled (sm_90 and sm_80, triton 3.7; the
# compile sweep of every unaligned width 66-126): the backward 32 bytes in its row loop on Hopper
# at 64-row steps (none at 32, RC_UNALIGNED) and 44-68 bytes before it writing dx at 16 (none
# without dx: there dx takes the forward kernel's pass, ``writes_dx``).
ROWS_ALIGNED = 8
RC_UNALIGNED = 32


def _pre_hopper_wide(grp: dict, capability: tuple[int, int] | None) -> bool:
    return grp["WP"] >= MAX_BLOCK and register_operand_mma(capability)


def rows_aligned(grp: dict) -> bool:
    """Whether the group's rows are 16-byte aligned at its blocks (``ROWS_ALIGNED``): its runs of
    contiguous columns, ``_columns``' H where the levels interleave (S > 1), else the block."""
    return (grp["H"] if grp["S"] > 1 else grp["WB"]) % ROWS_ALIGNED == 0


def chunks_aligned(b: int) -> bool:
    """Whether a layer's chunks (b/2 contiguous columns: the strided levels' runs, the one-pass
    kernels' row chunks) are 16-byte aligned (``ROWS_ALIGNED``)."""
    return (b // 2) % ROWS_ALIGNED == 0


def _unaligned_wide(grp: dict) -> bool:
    return grp["WP"] >= MAX_BLOCK and not rows_aligned(grp)


def row_step(grp: dict, capability: tuple[int, int] | None) -> int:
    """Rows per step of a group's backward (``_grad_kernel``) on a GPU of that compute capability
    (None: the interpreter, which steps as Hopper does): RC, but fewer for 128-wide groups before
    Hopper (RC_SM80_WIDE) and for unaligned ones on it (RC_UNALIGNED). Set by the shape and the
    device, never by tuning, so dQ's bits do not depend on the config."""
    if _pre_hopper_wide(grp, capability):
        return RC_SM80_WIDE
    return RC_UNALIGNED if _unaligned_wide(grp) else RC


def grad_registers(grp: dict, fused_dq: bool) -> int | None:
    """ptxas's register cap for a group's backward: lifted (MAX_REGISTERS) where it makes dQ
    itself (one split) and the rows are unaligned, else ptxas's own guess (None). There the guess
    spilled: 28x1 32 bytes in the row loop at 128 registers on sm_80, 86x2's second group 8 at
    128 without dx; lifted, 138-162 registers and none (sm_90 and sm_80)."""
    return MAX_REGISTERS if fused_dq and not rows_aligned(grp) else None


def writes_dx(grp: dict, capability: tuple[int, int] | None) -> bool:
    """Whether the group's dMc pass also writes dx: everywhere but 128-wide groups whose rows are
    not aligned (``ROWS_ALIGNED``) before Hopper, where dx takes the forward kernel's pass over g
    (``apply_into`` with the transpose flipped)."""
    return not (_pre_hopper_wide(grp, capability) and not rows_aligned(grp))


def backward_stages(grp: dict, capability: tuple[int, int] | None, source: str, stages: int) -> int:
    """Pipeline stages of ``_grad_kernel``: the config's, but one for the untuned (default) config
    of 128-wide groups before Hopper (``STAGES_SM80_WIDE``)."""
    return STAGES_SM80_WIDE if source == "default" and _pre_hopper_wide(grp, capability) else stages
# A program (forward) or row split (backward) gets at least this many rows per level-times-b of
# its group, so the Q values it reads (levels x b per block row, fp32) cost at most about 1/16 of
# the bytes its rows move, unless that would leave SMs idle.
ROWS_PER_Q = 16


# ---------------------------------------------------------------------------------------------
# plan: groups of factors, their block layout


@functools.lru_cache(maxsize=1024)
def plan(n: int, b: int, N: int) -> tuple[dict, ...]:
    """The groups of factors of an (n, b, N) butterfly, in the order they act on ``x M``.

    Each group: levels ``[k0, k1)``, the chunk HC a factor mixes (b/2; b when N = 1), block width
    W, column interleave S and chunk H (see ``reference.group_blocks``), pack (consecutive blocks
    merged block-diagonally), the packed width WB, block count NB and the padded power-of-two
    width WP the kernels tile. ``x M^T`` runs the groups in reverse."""
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
        out.append(dict(k0=k0, k1=k1, HC=chunk, W=W, S=S, H=chunk if S > 1 else Wp, pack=pack, WB=Wp,
                        NB=NB // pack, WP=max(MIN_BLOCK, next_pow2(Wp))))
    return tuple(reversed(out))  # x M = x B_{N-1} ... B_0: the highest levels act first


def group(n: int, b: int, N: int, k0: int) -> dict:
    """The group of ``plan(n, b, N)`` that starts at level k0."""
    return next(g for g in plan(n, b, N) if g["k0"] == k0)


def fused_backward(n: int, b: int, N: int) -> bool:
    """Whether the backward of a ``fused_groups`` shape runs in one pass per group
    (``fused_grad``): every group's dMc over the coarse block fits FUSED_ACC, or FUSED_GRAD_ACC
    where the chunks (b/2) are whole multiples of 4 columns."""
    groups = fused_groups(n, b, N)
    hp = next_pow2(b // 2)
    limit = FUSED_GRAD_ACC if (b // 2) % 4 == 0 else FUSED_ACC
    return groups is not None and all(group_values(N, hp, k0, k1) <= limit for k0, k1 in groups)


def group_blocks(N: int, k0: int, k1: int) -> int:
    """Dense blocks of levels ``[k0, k1)`` in one coarse block: ``2^(N - k1 + k0)``."""
    return (1 << (N - k1)) << k0


def group_values(N: int, hp: int, k0: int, k1: int) -> int:
    """Values of the dense blocks of levels ``[k0, k1)`` in one coarse block (chunks padded to
    hp): ``group_blocks`` blocks of ``(hp 2^(k1 - k0))^2``. What a program holds for that group,
    its blocks or its fp32 dMc."""
    return group_blocks(N, k0, k1) * (hp << (k1 - k0)) ** 2


def path_name(n: int, b: int, N: int, T: int | None = None, dtype: torch.dtype | None = None,
              route: str | None = None) -> str:
    """The kernels a shape runs, in a few characters (reports, tuning); with the backward's
    route, or the row count and dtype that model it, also whether the backward goes through the
    dense coarse blocks (``-bwd-coarse``)."""
    fused = fused_groups(n, b, N)
    if fused is not None:
        hp = next_pow2(b // 2)
        widths = "+".join(str(hp << (k1 - k0)) for k0, k1 in reversed(fused))
        if route is None and T is not None and dtype is not None:
            route = "coarse" if _coarse().takes(n, b, N, T, dtype, True) else None
        if route == "coarse":
            return f"fused{widths}-bwd-coarse"
        return f"fused{widths}" + ("" if fused_backward(n, b, N) else "-bwd-per-group")
    prefix = split_prefix(n, b, N)
    if prefix is not None:
        high = "+".join(str(g["WP"]) for g in reversed(high_groups(n, b, N)))
        return f"dot{high}+" + path_name(n, b, prefix, T, dtype, route)
    groups = plan(n, b, N)
    if _wide().is_wide(groups[0]):  # then every group is one wide level: slab passes
        slabs = _wide().slab("fwd", b)[2]
        return (f"wide{groups[0]['WP']}x{len(groups)}" + (f"-slabs{slabs}" if slabs > 1 else "")
                + ("-ksplit" if _wide().splits_k("fwd", b) else ""))
    widths = "+".join(str(g["WP"]) for g in reversed(groups))
    return f"dot{widths}" + (f"-pack{groups[-1]['pack']}" if groups[-1]["pack"] > 1 else "")


# One pass over several factor groups (``fused_groups``): a program holds its coarse block's row
# tile (chunks padded to a power of two) and every group's dense blocks, and applies the groups in
# turn, so x is read once and y written once however wide the coarse block. The limits are what
# compiles without spills on sm_90 and sm_80 (the compile report): a one-level group is at most
# MAX_BLOCK wide; a group of several levels builds its blocks' products in fp32 registers, so all
# its blocks in the coarse block hold at most FUSED_BUILD values (20x4 as two 64-wide two-level
# groups, 16K values, spills 0.5 KB; as four one-level groups it does not); and the held blocks of
# all groups at most FUSED_HELD values (bf16 in shared memory: 128 KB).
FUSED_BUILD = 8 * 1024
FUSED_HELD = 64 * 1024
FUSED_MAX_GROUPS = 4
# From this many held values (96 KB of bf16 and the row tiles' stages: 118 KB and more in the
# compile report) two one-pass programs never share an SM, so the forward lets ptxas use the
# register file: left to guess, ptxas (which cannot see Triton's dynamic shared memory) capped
# 48x3's transposed forward at 128 registers for a second program and spilled 4 bytes a thread.
# Below it (8x6, 20x4: 90-98 KB) two programs fit, and an explicit cap would raise their
# registers from 110 to 162 (20x4) and halve the programs an SM runs.
FUSED_SOLO_HELD = 48 * 1024
# ptxas's register cap per thread at 8 warps (.maxnreg): the whole register file for one program
MAX_REGISTERS = 255
_BOUND_NAMES = ("A0", "A1", "B0", "B1", "C0", "C1", "D0", "D1")


# Chunk widths (b/2) at which the one-pass kernels read Q padded (``padded_q``): 3 and 5 columns
# (6x6, 10x5) spilled gathered in place; 6 and 7 (12x5, 14x5) compile clean gathered, and padded
# would read Q 1.8x and 1.3x over (wider ones more: 40x3's 2.6x).
PADDED_CHUNKS = (3, 5)


def q_block(b: int) -> int:
    """The width of the Q blocks the one-pass kernels read (their constexpr B): b, or, where the
    chunks are ``PADDED_CHUNKS`` columns, ``2 next_pow2(b/2)``."""
    return 2 * next_pow2(b // 2) if b // 2 in PADDED_CHUNKS else b


def padded_q(q: torch.Tensor, b: int) -> torch.Tensor:
    """Q ``[N, D, b, b]`` as the one-pass kernels read it: as is, or, where ``q_block`` pads, each
    block's two halves of rows and of columns padded from b/2 to the kernels' power-of-two chunk
    with zeros, so a chunk's values are contiguous and unmasked like the lanes that hold them.
    Gathered in place (b/2 = 3: 6x6), the masked loads spilled 12-208 bytes a thread in the block
    builds and dQ sweeps on sm_90 and sm_80; padded, 6x6 compiles like 8x6, clean. The padding is
    parameter-sized (at 6x6, 64 values a block for 36: Q's reads 0.07 -> 0.12 of an activation
    pass at T = 1024; forward + backward 1.27x -> 1.33x there in the interpreter's count, whose
    masked gather counts 12 of the 32 bytes a GPU's sector fetches)."""
    B = q_block(b)
    if B == b:
        return q
    h, hp = b // 2, B // 2
    N, D = q.shape[:2]
    return torch.nn.functional.pad(q.reshape(N, D, 2, h, 2, h), (0, hp - h, 0, 0, 0, hp - h)).reshape(N, D, B, B)


def unpadded_dq(dq: torch.Tensor, b: int) -> torch.Tensor:
    """dQ in Q's own layout from the one-pass kernels' (``padded_q``'s)."""
    B = dq.shape[-1]
    if B == b:
        return dq
    h, hp = b // 2, B // 2
    N, D = dq.shape[:2]
    return dq.reshape(N, D, 2, hp, 2, hp)[:, :, :, :h, :, :h].reshape(N, D, b, b)


def fused_held(n: int, b: int, N: int) -> int:
    """Values the one-pass forward holds: every group's blocks in a coarse block."""
    hp = next_pow2(b // 2)
    return sum(group_values(N, hp, k0, k1) for k0, k1 in fused_groups(n, b, N))


def fused_options(n: int, b: int, N: int) -> dict:
    """Compile options of the one-pass forward besides warps and stages: the register cap where
    its programs run one to an SM (``FUSED_SOLO_HELD``)."""
    return {"maxnreg": MAX_REGISTERS} if fused_held(n, b, N) >= FUSED_SOLO_HELD else {}


def fused_stages(b: int, source: str, stages: int) -> int:
    """Pipeline stages of the one-pass forward: the config's, but one for the untuned config where
    its chunks are not aligned (``chunks_aligned``). At two, ptxas's 128-register guess for a
    second program spilled 16 bytes at 12x5 on sm_90; at one, 18x4-28x4, 10x5-14x5, 8x6, 4x7 and
    2x8 compile clean on sm_90 and sm_80 at 76-204 registers (20x4's 92-110 -> 76-78), the
    shared memory a little less."""
    return 1 if source == "default" and not chunks_aligned(b) else stages


def fused_grad_registers(b: int) -> int | None:
    """ptxas's register cap for the one-pass backward's passes: lifted (MAX_REGISTERS) where the
    chunks are not aligned (``chunks_aligned``), else ptxas's own guess (None). There the guess
    capped 24x4's last pass at 128 registers for a second program and spilled 8 bytes on sm_90;
    lifted, 152-174, and the other unaligned shapes' passes (18x4-28x4, 10x5-14x5, 8x6, 2x8),
    already past 128, stay within a few registers of ptxas's own picks, no spills."""
    return None if chunks_aligned(b) else MAX_REGISTERS


def group_bounds(groups) -> dict:
    """The one-pass kernels' group constexprs: NG and each group's levels ``[k0, k1)`` in acting
    order as A0, A1, B0, ... (unused groups ``[0, 0)``)."""
    bounds = [v for k0k1 in groups for v in k0k1] + [0, 0] * (FUSED_MAX_GROUPS - len(groups))
    return dict(NG=len(groups), **dict(zip(_BOUND_NAMES, bounds)))


# A unit of the one-pass kernels' fp32 working sets (a group's dMc, a dQ sweep), in values.
FUSED_ACC = 8 * 1024
# The one-pass backward holds one group's fp32 dMc for the coarse block besides the other groups'
# blocks: up to FUSED_ACC values (8x6), or this many where b/2 is a multiple of 4. 16K is three
# 64-wide groups of 4 blocks (34x3-64x3): with the blocks' batched products whole in each warp
# group they sat at 255 registers and spilled 4-124 bytes a thread, so those shapes took plan()'s
# per-group passes below the coarse route's row counts. Cut to cover the warps (``_batch_parts``)
# 40x3, 48x3, 56x3 and 64x3 compile clean on sm_90 and sm_80 under triton 3.7 and 3.6 (8 warps,
# the default). Chunks that are not a multiple of 4 still spill: odd ones (34x3, 38x3, ... 62x3)
# 4-104 bytes, 36x3, 44x3 and 52x3 8 under 3.6 (60x3 compiled clean, left out by the rule). The
# byte model picks between this backward and the coarse route (``coarse.takes``).
FUSED_GRAD_ACC = 2 * FUSED_ACC
# A group's dQ sweep (``_fused_store_dq``: its fp32 dMc and the products of its levels) in one
# program, levels x values. In a row pass's epilogue (one row split) up to FUSED_SWEEP: 3 levels
# of 8K (8x6, 6x6) compile clean on sm_90 and sm_80, 4 of 8K (4x7's first group) spilled 28-80
# bytes there and in the chain's; past it the row pass writes its partial however many row splits
# there are. The dq kernel that adds the partials sweeps up to DQ_SWEEP a program, the group's
# blocks in chunks (``sweep_blocks``): under triton 3.6, the GPU image's, 3 levels of 8K spilled
# 36-56 bytes there; 16K compile clean under 3.6 and 3.7 (4x7, 8x6, 6x6, 2x8).
FUSED_SWEEP = 3 * FUSED_ACC
DQ_SWEEP = 2 * FUSED_ACC


def sweep_blocks(N: int, hp: int, k0: int, k1: int) -> int:
    """Blocks of group ``[k0, k1)`` whose dQ a program of the dq kernel sweeps: all of the coarse
    block's, or the most (a power of two) within DQ_SWEEP levels x values (``_fused_dq_kernel``'s
    ZC)."""
    blocks = group_blocks(N, k0, k1)
    per_block = (k1 - k0) * group_values(N, hp, k0, k1) // blocks
    while blocks > 1 and per_block * blocks > DQ_SWEEP:
        blocks //= 2
    return blocks


def sweeps_in_pass(N: int, hp: int, k0: int, k1: int) -> bool:
    """Whether a row pass with one row split may sweep the group's dQ itself (``FUSED_DQ``): its
    levels x values within FUSED_SWEEP."""
    return (k1 - k0) * group_values(N, hp, k0, k1) <= FUSED_SWEEP


# The chain pass that accumulates a middle group's dMc (``chain_passes``' ``acc``) holds fewer
# blocks (its identity rows are made, not read, and the first group's are gathered): it compiles
# clean up to this many values.
CHAIN_ACC = 16 * 1024


@functools.lru_cache(maxsize=1024)
def fused_groups(n: int, b: int, N: int) -> tuple[tuple[int, int], ...] | None:
    """The factor groups ``(k0, k1)`` of the one-pass kernel, in the order they act on ``x M``
    (highest levels first), or None where the shape takes ``plan``'s path (or, where
    ``split_prefix`` finds one, a one-pass prefix of its low levels): one group already covers the
    coarse block, or the blocks do not fit on chip.

    A coarse block of ``L = 2^N h`` columns (chunks of ``h = b/2``, padded to ``hp``, a power of
    two) is cut into as few groups of consecutive levels as the width limits allow, levels shared
    out evenly (fewer block products than a greedy cut: 8x6 takes 32 + 32 rather than 128 + 16)."""
    if N == 1 or len(plan(n, b, N)) == 1:
        return None
    hp = next_pow2(b // 2)
    if 2 * hp > MAX_BLOCK:
        return None  # one level is already wider than a held block
    for G in range(2, min(N, FUSED_MAX_GROUPS) + 1):
        sizes = [N // G + (1 if i < N % G else 0) for i in range(G)]
        widths = [hp << s for s in sizes]
        if all(MIN_BLOCK <= w <= MAX_BLOCK and (s == 1 or (hp << N) * w <= FUSED_BUILD)
               for s, w in zip(sizes, widths)):
            if (hp << N) * sum(widths) > FUSED_HELD:
                return None
            out, k = [], 0
            for s in sizes:
                out.append((k, k + s))
                k += s
            return tuple(reversed(out))
    return None


@functools.lru_cache(maxsize=1024)
def split_prefix(n: int, b: int, N: int) -> int | None:
    """Levels ``N'`` of a one-pass prefix where the whole butterfly has no one-pass kernel
    (``fused_groups`` is None): ``x M = (x B_{N-1} ... B_{N'}) M'`` with ``M' = B_{N'-1} ... B_0``
    the ``(n, b, N')`` butterfly on ``Q[:N']`` (a level's blocks depend on its index and b, not on
    N), so ``plan``'s groups of levels ``>= N'`` take a pass each and the prefix one. Taken where it
    saves passes over x: PEFT's multi-concept ``block_num=8, N=3`` on Stable Diffusion's 640 and 768
    (80x3, 96x3: three 128-wide groups, the 160/192-wide prefix of two levels in one pass) runs in
    two passes rather than three. None where no such prefix exists or it saves nothing."""
    if N < 3 or fused_groups(n, b, N) is not None:
        return None
    groups = plan(n, b, N)
    for prefix in range(N - 1, 1, -1):  # the longest prefix whose levels a plan() group boundary ends
        high = [g for g in groups if g["k0"] >= prefix]
        if fused_groups(n, b, prefix) is not None and sum(g["k1"] - g["k0"] for g in high) == N - prefix:
            return prefix if len(high) + 1 < len(groups) else None
    return None


def high_groups(n: int, b: int, N: int) -> tuple[dict, ...]:
    """``plan``'s groups above ``split_prefix``'s levels, in the order they act on ``x M``
    (every group where there is no prefix)."""
    prefix = split_prefix(n, b, N) or 0
    return tuple(g for g in plan(n, b, N) if g["k0"] >= prefix)


def _rows_min(grp: dict, b: int) -> int:
    return ROWS_PER_Q * (grp["k1"] - grp["k0"]) * b


# ---------------------------------------------------------------------------------------------
# configs


def candidates(n: int, b: int, N: int, kind: str, dtype: torch.dtype | None = None) -> list[dict]:
    """Configs worth trying: forward rows per tile BT, programs per SM (persistence), warps,
    stages; the backward's row splits and chunk are fixed (determinism), so it tunes warps and
    stages, and, where the backward can run through the dense coarse blocks, the ``route``
    (``coarse`` or per ``groups``: which is faster is measured, not modelled)."""
    WP = max(g["WP"] for g in plan(n, b, N))
    if _wide().is_wide(plan(n, b, N)[0]) or _wide().fp32_too_wide(n, b, N, dtype):  # the slab kernels
        return _wide().candidates(kind, b, dtype)
    if kind == "fwd" and fused_groups(n, b, N) is not None:  # one pass: tiles of 16 or 32 rows fit
        return [{"BT": BT, "PPS": pps, "num_warps": warps, "num_stages": 2}
                for warps in (4, 8) for pps in (2, 4, 8) for BT in (16, 32)]
    if kind != "fwd" and dtype is not None and _coarse().supported(n, b, N, dtype):
        return [{"num_warps": warps, "num_stages": stages, "route": route}
                for warps in (4, 8) for stages in (2, 3) for route in _coarse().ROUTES]
    out = []
    for warps in (4, 8):
        for stages in (2, 3):
            if kind != "fwd":
                out.append({"num_warps": warps, "num_stages": stages})
                continue
            for pps in (2, 4, 8):
                for BT in (32, 64, 128):
                    if BT * WP <= 128 * 128:
                        out.append({"BT": BT, "PPS": pps, "num_warps": warps, "num_stages": stages})
    return out


def default_config(n: int, b: int, N: int, kind: str, dtype: torch.dtype | None = None) -> dict:
    """The untuned config: 64-row tiles (128 for narrow blocks), 4 programs per SM, 8 warps where
    the tiles need the registers (forward at 128-wide blocks; backward from 64-wide ones, whose
    fp32 dMc accumulator and block products need them, or 32-wide ones for fp32 inputs, whose
    tf32x3 dots hold three operand tiles), else 4."""
    WP = max(g["WP"] for g in plan(n, b, N))
    if kind == "fwd" and fused_groups(n, b, N) is not None:
        return {"BT": 16, "PPS": 4, "num_warps": 8, "num_stages": 2}  # the whole coarse block's tile
    if kind == "fwd":
        return group_default_config(n, b, N)
    return {"num_warps": 8 if WP >= (32 if dtype == torch.float32 else 64) else 4, "num_stages": 2}


def group_default_config(n: int, b: int, N: int) -> dict:
    """The untuned forward tiles of plan()'s group kernels (``_apply_kernel``,
    ``_segmented_apply_kernel``)."""
    WP = max(g["WP"] for g in plan(n, b, N))
    return {"BT": 128 if WP <= 32 else 64, "PPS": 4, "num_warps": 8 if WP >= 128 else 4, "num_stages": 3}


def group_config(n: int, b: int, N: int, dtype: torch.dtype, device: torch.device) -> tuple[str, dict]:
    """(source, config) of plan()'s group kernels' forward tiles: the layer's forward pick, but
    where the layer has a one-pass forward, whose config (tuned or not) tiles its whole coarse
    block, plan()'s own default. Those kernels run there in the per-group backward's recompute and
    the mixed-batch forward; on the one-pass forward's 16-row tiles and two stages ptxas picked 64-80
    registers and spilled 12-44 bytes in 106x2-122x2's recompute on sm_80, 8-24 in 110x2's and
    26x4-28x4's mixed-batch kernel (none on plan()'s)."""
    if fused_groups(n, b, N) is not None:
        return "default", group_default_config(n, b, N)
    return pick_config("fwd", n, b, N, dtype, device)


# fp32 inputs run their dots as tf32x3 (three operand tiles): wider than this, a block kernel needs
# more shared memory or registers than an SM has (the compile report), so on a GPU those shapes
# run level by level through the slab kernels (wide.takes_levels).
MAX_FP32_BLOCK = 32


def runs_on_gpu(n: int, b: int, N: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this layer shape and input dtype on a GPU: every shape in
    bf16/fp16/fp32 (groups of levels up to MAX_BLOCK wide in the block kernels, wider single
    levels in ``wide``'s slab kernels, K-split where a slab does not fit; fp32 past
    MAX_FP32_BLOCK level by level through them). fp64 takes the torch path. (n, b, N) stay in the
    signature so a shape rule can come back without touching the callers."""
    return dtype in (torch.bfloat16, torch.float16, torch.float32)


_REQUIRED = {"fwd": ("BT", "PPS", "num_warps"), "bwd": ("num_warps",)}
_FORCED: dict[str, tuple[tuple[int, int, int] | None, dict]] = {}  # kind -> (key or None: all, config)


@contextlib.contextmanager
def forced_config(kind: str, cfg: dict, key: tuple[int, int, int] | None = None):
    """Launch ``kind`` ("fwd"/"bwd") kernels with ``cfg`` inside the block (used by tuning); with
    ``key`` (n, b, N) only that shape's kernels: a ``split_prefix`` shape's one-pass prefix has
    its own key (``tuning_keys``) and configs."""
    _FORCED[kind] = (key, cfg)
    try:
        yield
    finally:
        _FORCED.pop(kind, None)


def tuning_keys(n: int, b: int, N: int) -> tuple[tuple[int, int, int], ...]:
    """The (n, b, N) keys whose configs a layer shape's kernels pick: its own, and a
    ``split_prefix`` shape's one-pass prefix (each timed with its own candidates; while one key is
    timed, the other's kernels run the tile they had when tuning began, the same in every
    candidate's time)."""
    prefix = split_prefix(n, b, N)
    return ((n, b, prefix), (n, b, N)) if prefix is not None else ((n, b, N),)


def pick_config(kind: str, n: int, b: int, N: int, dtype: torch.dtype, device: torch.device) -> tuple[str, dict]:
    """(source, config): forced, else the tuning cache's entry, else the default."""
    forced_key, forced = _FORCED.get(kind, (None, None))
    if forced is not None and forced_key in (None, (n, b, N)):
        return "forced", forced
    cfg = cached_config(kind, n, b, N, dtype, device)
    if cfg is not None:
        if valid_config(cfg, _REQUIRED[kind]):
            return "cache", cfg
        warn_once(f"the tuning cache's {kind} tile for n={n}, b={b}, N={N} ({cfg!r}) is malformed: the default tile is used")
    return "default", default_config(n, b, N, kind, dtype)


# ---------------------------------------------------------------------------------------------
# kernels: block layout and block products


@triton.jit
def _columns(i_b, WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, H: tl.constexpr):
    """Columns [WP] of block i_b (see reference.group_blocks) and their mask."""
    o_w = tl.arange(0, WP)
    if S == 1:
        o_col = i_b * WB + o_w
    else:
        o_col = (i_b // S) * (S * WB) + (o_w // H) * (S * H) + (i_b % S) * H + o_w % H
    return o_col, o_w < WB


@triton.jit
def _factor(i_b, D, k: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr,
            W: tl.constexpr, WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr):
    """Where factor k's values for block i_b sit in Q[K0:K1] (``[levels, D, B, B]``): offsets and
    mask of a dense ``[WP, WP]`` tile (row = input column of the block, col = output column).

    Block row r = (pack slot, m, off): m holds the group's chunk bits (levels K0..K1-1 of the
    chunk index), off the offset in a chunk of HC. Factor k pairs the two chunks that differ in
    bit k, so (r, c) is a value when they agree in every other bit; it is row (bit k of m_r, off_r),
    column (bit k of m_c, off_c) of Q block ``d = (chunk >> (k+1)) 2^k + (chunk mod 2^k)``.
    The offsets' type is i_b's (Q has fewer than 2^31 values, so an int32 i_b is safe)."""
    o_w = tl.arange(0, WP)
    return _factor_at(o_w, o_w, i_b, D, k, K0, K1, B, HC, W, WB, S, PACK)


@triton.jit
def _factor_at(o_r, o_c, i_b, D, k, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr,
               HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr):
    """``_factor`` on block rows o_r and columns o_c (lanes of the ``[WP, WP]`` tile); k may be a
    runtime level."""
    slot = o_r // W
    m = (o_r % W) // HC
    off = o_r % HC
    slot_c = o_c // W
    m_c = (o_c % W) // HC
    off_c = o_c % HC
    bit = 1 << (k - K0)
    half = (m // bit) % 2
    half_c = (m_c // bit) % 2
    blk = i_b * PACK + slot
    chunk = ((blk // S) * (1 << (K1 - K0)) + m) * S + blk % S
    d = (chunk // (2 << k)) * (1 << k) + chunk % (1 << k)
    o_q = (((k - K0) * D + d)[:, None] * B + (half * HC + off)[:, None]) * B + (half_c * HC + off_c)[None, :]
    mask = (((o_r < WB)[:, None] & (o_c < WB)[None, :]) & (slot[:, None] == slot_c[None, :])
            & ((m | bit)[:, None] == (m_c | bit)[None, :]))
    return o_q, mask


@triton.jit
def _residual(q_ptr, i_b, D, k: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr,
              HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr,
              PACK: tl.constexpr):
    """``E_k = F_k - I`` on block i_b, fp32 ``[WP, WP]`` (zero on padded lanes)."""
    o_q, m_q = _factor(i_b, D, k, K0, K1, B, HC, W, WB, WP, S, PACK)
    f = tl.load(q_ptr + o_q, mask=m_q, other=0.0).to(tl.float32)
    o_w = tl.arange(0, WP)
    return tl.where((o_w[:, None] == o_w[None, :]) & (o_w < WB)[:, None], f - 1.0, f)


@triton.jit
def _factor_blocks(q_ptr, i_b, D, k: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr,
                   HC: tl.constexpr, HP: tl.constexpr, S: tl.constexpr):
    """``E_k = F_k - I`` on block i_b of a group of several levels (``blockwise``, or padded:
    ``_delta``), as its ``[Z, 2 HP, 2 HP]`` fp32 blocks, Z = 2^(K1-K0-1) (chunk bits above level
    k's, then those below): F_k pairs the chunks that differ in bit k, and each pair is one Q block
    (``_factor``'s d), each half of its rows and columns a chunk of HC padded to HP (zeros)."""
    LO: tl.constexpr = 1 << (k - K0)
    HI: tl.constexpr = (1 << (K1 - K0)) // (2 * LO)
    o_z = tl.arange(0, HI * LO)
    m0 = (o_z // LO) * (2 * LO) + o_z % LO  # the pair's chunk bits, bit k clear
    chunk = ((i_b // S) * (1 << (K1 - K0)) + m0) * S + i_b % S
    d = (chunk // (2 << k)) * (1 << k) + chunk % (1 << k)
    o_w = tl.arange(0, 2 * HP)
    if HP == HC:  # contiguous rows of B = 2 HC
        f = tl.load(q_ptr + (((k - K0) * D + d)[:, None, None] * B + o_w[None, :, None]) * B + o_w[None, None, :])
        return tl.where((o_w[:, None] == o_w[None, :])[None, :, :], f - 1.0, f)
    valid = (o_w % HP) < HC
    o_b = (o_w // HP) * HC + o_w % HP  # the lane's row (column) in the Q block
    f = tl.load(q_ptr + (((k - K0) * D + d)[:, None, None] * B + o_b[None, :, None]) * B + o_b[None, None, :],
                mask=(valid[:, None] & valid[None, :])[None, :, :], other=0.0)
    return tl.where(((o_w[:, None] == o_w[None, :]) & valid[:, None])[None, :, :], f - 1.0, f)


@triton.jit
def _residual_from_blocks(q_ptr, i_b, D, k: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr,
                          HC: tl.constexpr, HP: tl.constexpr, S: tl.constexpr, DT: tl.constexpr):
    """``E_k`` on block i_b as a dense ``[WP, WP]`` tile in DT, WP = 2^(K1-K0) HP (chunks padded
    from HC to HP), laid out from its ``[Z, 2 HP, 2 HP]`` blocks (``_factor_blocks``: loads of Q's
    blocks alone) by broadcasting and permuting, with no ``[WP, WP]`` gather offsets."""
    LO: tl.constexpr = 1 << (k - K0)
    HI: tl.constexpr = (1 << (K1 - K0)) // (2 * LO)
    Z: tl.constexpr = HI * LO
    WP: tl.constexpr = (1 << (K1 - K0)) * HP
    blocks = _factor_blocks(q_ptr, i_b, D, k, K0, K1, B, HC, HP, S).to(DT)
    o_z = tl.arange(0, Z)
    e = tl.where((o_z[:, None] == o_z[None, :])[:, None, :, None], blocks[:, :, None, :], 0.0).to(DT)
    e = tl.reshape(e, (HI, LO, 2, HP, HI, LO, 2, HP))
    return tl.reshape(tl.permute(e, (0, 2, 1, 3, 4, 6, 5, 7)), (WP, WP))


@triton.jit
def _factor_tile(q_ptr, i_b, D, k: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr,
                 HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr,
                 PACK: tl.constexpr, DT: tl.constexpr):
    """``E_k`` on block i_b, ``[WP, WP]`` in DT: laid out from its Q blocks where ``blockwise``
    (a 128-wide group of several levels whose chunks fill it), else gathered (``_residual``)."""
    BLOCKWISE: tl.constexpr = K1 - K0 > 1 and WP >= 128 and WB == WP and PACK == 1  # blockwise()
    if BLOCKWISE:
        e = _residual_from_blocks(q_ptr, i_b.to(tl.int32), D, k, K0, K1, B, HC, HC, S, DT)
    else:
        e = _residual(q_ptr, i_b, D, k, K0, K1, B, HC, W, WB, WP, S, PACK).to(DT)
    return e


@triton.jit
def _product_minus_eye(q_ptr, i_b, D, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr,
                       W: tl.constexpr, WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr,
                       PADDED: tl.constexpr, BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr):
    """``Mc - I = F_{K1-1} ... F_{K0} - I`` on block i_b, fp32 ``[WP, WP]``, in residual form:
    ``(I + E_k)(I + D) - I = E_k + D + E_k D``. The identity and first-order terms are exact fp32
    adds; only the second-order ``E_k D`` goes through the dot (in BUILD_DTYPE), so its rounding
    is relative to that small term, not to the identity. Where ``blockwise``, the factor tiles
    are laid out from their Q blocks: gathered, the 16x4 and 8x6 (128-wide, 4-5 levels) builds
    before the row loop held ``[WP, WP]`` offsets too and spilled 4-20 bytes a thread. Where
    the group's chunks leave padding (``padded_build``), the product is built in the frame of
    chunks padded to a power of two (PADDED: ``_delta`` decides, and compacts it), also from Q's
    blocks."""
    HP: tl.constexpr = WP >> (K1 - K0)
    if PADDED:
        d = _residual_from_blocks(q_ptr, i_b.to(tl.int32), D, K0, K0, K1, B, HC, HP, S, tl.float32)
    else:
        d = _factor_tile(q_ptr, i_b, D, K0, K0, K1, B, HC, W, WB, WP, S, PACK, tl.float32)
    for k in tl.static_range(K0 + 1, K1):
        if PADDED:
            e = _residual_from_blocks(q_ptr, i_b.to(tl.int32), D, k, K0, K1, B, HC, HP, S, tl.float32)
        else:
            e = _factor_tile(q_ptr, i_b, D, k, K0, K1, B, HC, W, WB, WP, S, PACK, tl.float32)
        d = tl.dot(e.to(BUILD_DTYPE), d.to(BUILD_DTYPE), d + e, input_precision=BUILD_PRECISION)
    return d


@triton.jit
def _delta(q_ptr, i_b, D, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, W: tl.constexpr,
           WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr, TRANS: tl.constexpr,
           DOT_DTYPE: tl.constexpr, BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr):
    """``Delta = Mc - I`` of block i_b (``Delta^T`` with TRANS) as a ``[WP, WP]`` dot operand.
    Built in padded chunks (``padded_build``), it is moved into the rows' frame (chunks of HC
    side by side, as ``_columns`` loads them) by two products with the 0/1 map ``P`` from padded
    lanes to packed ones, ``P^T Delta P``: each entry is one product with 1, so exact, and the
    row loop keeps its contiguous loads."""
    PADDED: tl.constexpr = K1 - K0 >= 4 and WP >= 128 and WB != WP and PACK == 1  # padded_build()
    HP: tl.constexpr = WP >> (K1 - K0)
    delta = _product_minus_eye(q_ptr, i_b, D, K0, K1, B, HC, W, WB, WP, S, PACK, PADDED, BUILD_DTYPE,
                               BUILD_PRECISION)
    if TRANS:
        delta = tl.trans(delta)
    delta = delta.to(DOT_DTYPE)
    if PADDED:
        o_w = tl.arange(0, WP)
        packed = (o_w // HP) * HC + o_w % HP  # padded lane -> packed lane
        p_map = ((packed[:, None] == o_w[None, :]) & ((o_w % HP) < HC)[:, None]).to(DOT_DTYPE)
        delta = tl.dot(delta, p_map, input_precision="ieee").to(DOT_DTYPE)  # one term per entry: exact
        delta = tl.dot(tl.trans(p_map), delta, input_precision="ieee").to(DOT_DTYPE)
    return delta


@triton.jit
def _store_dq(dq_ptr, q_ptr, dmc, i_b, D, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr,
              W: tl.constexpr, WB: tl.constexpr, WP: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr,
              BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr):
    """dQ of block i_b's factors from ``dMc``: ``dF_k = (F_{K1-1} ... F_{k+1})^T dMc (F_{k-1} ...
    F_{K0})^T``, stored on F_k's values (each is one Q value: a plain store, no accumulation).
    Factor by factor, residual form, sweeping down from the top level: ``G = dMc``; for k = K1-1
    .. K0, ``dF_k = G F_{K0}^T ... F_{k-1}^T`` (``V F_j^T = V + V E_j^T``), then ``G <- F_k^T G``
    (``= G + E_k^T G``). No product of factors is ever held, and a group of m levels loads
    ``m (m - 1) / 2 + m - 1`` factor tiles (3 levels: 5, against 6 recomputing each upper product
    from dMc). Offsets are int32 here: int64 ``[WP, WP]`` ones took a quarter of the registers at
    128 wide (int32 ones in the block builds before the row loop spill more: the compile report).
    One narrow level (no products, small tiles) keeps them as they were: int32 ones spilled 8
    bytes at 8x1, where they cut 440-536 bytes to 124-248 at one 128-wide level (80x2, 72x2, 96x2
    on sm_80).

    128-wide groups of several levels (``blockwise``) lay each factor tile out from its Q
    blocks (``_residual_from_blocks``), with no ``[WP, WP]`` gather offsets beside the two fp32
    states: gathered, the sweep spilled 184-412 bytes a thread on sm_90 (16x4, 32x3)."""
    if K1 - K0 > 1 or WP > 64:
        i_b = i_b.to(tl.int32)
    upper_g = dmc  # (F_{K1-1} ... F_{k+1})^T dMc
    for k in tl.static_range(K1 - 1, K0 - 1, -1):
        upper = upper_g
        for j in tl.static_range(K0, k):  # dF_k = G (F_{k-1} ... F_{K0})^T = G F_{K0}^T ... F_{k-1}^T
            e = _factor_tile(q_ptr, i_b, D, j, K0, K1, B, HC, W, WB, WP, S, PACK, BUILD_DTYPE)
            upper = tl.dot(upper.to(BUILD_DTYPE), tl.trans(e), upper, input_precision=BUILD_PRECISION)
        o_q, m_q = _factor(i_b, D, k, K0, K1, B, HC, W, WB, WP, S, PACK)
        tl.store(dq_ptr + o_q, upper, mask=m_q)
        if k > K0:  # G <- F_k^T G for the level below
            e = _factor_tile(q_ptr, i_b, D, k, K0, K1, B, HC, W, WB, WP, S, PACK, BUILD_DTYPE)
            upper_g = tl.dot(tl.trans(e), upper_g.to(BUILD_DTYPE), upper_g, input_precision=BUILD_PRECISION)


# ---------------------------------------------------------------------------------------------
# kernels: row passes


@triton.jit
def _apply_kernel(
    x_ptr, q_ptr, y_ptr, T, n, D,
    K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr,
    WP: tl.constexpr, S: tl.constexpr, H: tl.constexpr, PACK: tl.constexpr, TRANS: tl.constexpr,
    BT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BUILD_DTYPE: tl.constexpr,
    BUILD_PRECISION: tl.constexpr,
):
    """``y = x + x Delta`` (``x + x Delta^T`` with TRANS) on block i_b's columns, for row tiles
    i_p, i_p + P, ... (persistent: the Delta tile is built once per program)."""
    i_p = tl.program_id(0).to(tl.int64)  # int64 row offsets for large T*n
    i_b = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(0)
    o_col, m_col = _columns(i_b, WB, WP, S, H)  # [WP]
    b_d = _delta(q_ptr, i_b, D, K0, K1, B, HC, W, WB, WP, S, PACK, TRANS, DOT_DTYPE, BUILD_DTYPE, BUILD_PRECISION)
    for i_t in range(i_p, tl.cdiv(T, BT), n_p):
        o_t = i_t * BT + tl.arange(0, BT)
        o_x = o_t[:, None] * n + o_col[None, :]  # [BT, WP]
        m_x = (o_t < T)[:, None] & m_col[None, :]
        b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0)
        b_y = b_x.to(tl.float32) + tl.dot(b_x.to(DOT_DTYPE), b_d, input_precision=PRECISION)
        tl.store(y_ptr + o_x, b_y.to(y_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _grad_kernel(
    x_ptr, g_ptr, q_ptr, dx_ptr, dd_ptr, dq_ptr, T, n, D, ROWS, NB,
    K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr,
    WP: tl.constexpr, S: tl.constexpr, H: tl.constexpr, PACK: tl.constexpr, TRANS: tl.constexpr,
    WRITE_DX: tl.constexpr, FUSED_DQ: tl.constexpr, RC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr,
):
    """Rows [i_s ROWS, (i_s+1) ROWS) of block i_b: ``dx = g + g Delta^T`` (``g + g Delta`` with
    TRANS) and this split's ``dMc = x^T g`` (``g^T x``), reduced RC rows at a time; then dQ
    (FUSED_DQ: the only split) or the split's partial dMc."""
    i_s = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_col, m_col = _columns(i_b, WB, WP, S, H)
    if WRITE_DX:
        b_dt = _delta(q_ptr, i_b, D, K0, K1, B, HC, W, WB, WP, S, PACK, not TRANS, DOT_DTYPE, BUILD_DTYPE,
                      BUILD_PRECISION)
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
    if FUSED_DQ:
        _store_dq(dq_ptr, q_ptr, b_dd, i_b, D, K0, K1, B, HC, W, WB, WP, S, PACK, BUILD_DTYPE, BUILD_PRECISION)
    else:
        o_w = tl.arange(0, WP)
        m_w = o_w < WB
        o_dd = (i_s * NB + i_b) * (WB * WB) + o_w[:, None] * WB + o_w[None, :]
        tl.store(dd_ptr + o_dd, b_dd, mask=m_w[:, None] & m_w[None, :])


@triton.jit
def _dq_kernel(
    dd_ptr, q_ptr, dq_ptr, D, SPLITS, NB,
    K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr,
    WP: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr, BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr,
):
    """dQ of block i_b from its SPLITS partial dMc, added in split order (deterministic)."""
    i_b = tl.program_id(0).to(tl.int64)
    o_w = tl.arange(0, WP)
    m_w = o_w < WB
    o_dd = o_w[:, None] * WB + o_w[None, :]
    m_dd = m_w[:, None] & m_w[None, :]
    dmc = tl.zeros([WP, WP], dtype=tl.float32)
    for i_s in range(0, SPLITS):
        dmc += tl.load(dd_ptr + (i_s * NB + i_b) * (WB * WB) + o_dd, mask=m_dd, other=0.0)
    _store_dq(dq_ptr, q_ptr, dmc, i_b, D, K0, K1, B, HC, W, WB, WP, S, PACK, BUILD_DTYPE, BUILD_PRECISION)


@triton.jit
def _residual_at(q_ptr, o_r, o_c, i_b, D, k, K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr,
                 W: tl.constexpr, WB: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr):
    """Rows o_r, columns o_c of ``E_k = F_k - I`` on block i_b, fp32 (``_residual``'s lanes)."""
    o_q, m_q = _factor_at(o_r, o_c, i_b, D, k, K0, K1, B, HC, W, WB, S, PACK)
    f = tl.load(q_ptr + o_q, mask=m_q, other=0.0)
    return tl.where((o_r[:, None] == o_c[None, :]) & m_q, f - 1.0, f)


@triton.jit
def _dq_rows_kernel(
    dd_ptr, q_ptr, dq_ptr, D, SPLITS, NB,
    K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr,
    WP: tl.constexpr, S: tl.constexpr, PACK: tl.constexpr, RS: tl.constexpr, BUILD_DTYPE: tl.constexpr,
    BUILD_PRECISION: tl.constexpr,
):
    """Rows [i_r RS, (i_r+1) RS) of ``dF_k`` of block i_b, k = K0 + axis 2 (``_store_dq``'s
    maths), from its SPLITS partial dMc added in split order: ``dF_k[r] = P[r] dMc (F_{k-1} ...
    F_{K0})^T`` with ``P[r] = I[r] + V`` the rows of ``(F_{K1-1} ... F_{k+1})^T``, built on the
    right (``V <- V + E_j^T[r] + V E_j^T``, j = k+1 ..), so ``P[r] dMc = dMc[r] + V dMc``: only
    the terms of first and higher order go through the dot, as in ``_store_dq``'s residual sweep.
    A program holds RS rows of the running products rather than whole ``[WP, WP]`` ones (which
    spilled 0.2-0.8 KB a thread at 128-wide groups of 3 and 4 levels), one level per program, the
    levels' loops at run time (unrolled, the compiler hoisted later levels' loads and spilled)."""
    i_b = tl.program_id(0)
    i_r = tl.program_id(1)
    k = K0 + tl.program_id(2)
    o_w = tl.arange(0, WP)
    o_r = i_r * RS + tl.arange(0, RS)
    m_w = o_w < WB
    g = tl.zeros([RS, WP], dtype=tl.float32)  # dMc[r]
    for i_s in range(0, SPLITS):
        base = dd_ptr + (i_s * NB + i_b).to(tl.int64) * (WB * WB)
        g += tl.load(base + o_r[:, None] * WB + o_w[None, :], mask=(o_r < WB)[:, None] & m_w[None, :], other=0.0)
    if k + 1 < K1:
        v = tl.zeros([RS, WP], dtype=tl.float32)
        for j in range(k + 1, K1):  # V <- V + E_j^T[r] + V E_j^T
            e_t = tl.trans(_residual_at(q_ptr, o_w, o_w, i_b, D, j, K0, K1, B, HC, W, WB, S, PACK)).to(BUILD_DTYPE)
            e_r = tl.trans(_residual_at(q_ptr, o_w, o_r, i_b, D, j, K0, K1, B, HC, W, WB, S, PACK))
            v = tl.dot(v.to(BUILD_DTYPE), e_t, v + e_r, input_precision=BUILD_PRECISION)
        dmc = tl.zeros([WP, WP], dtype=tl.float32)  # the whole dMc, added up where it is used
        for i_s in range(0, SPLITS):
            base = dd_ptr + (i_s * NB + i_b).to(tl.int64) * (WB * WB)
            dmc += tl.load(base + o_w[:, None] * WB + o_w[None, :], mask=m_w[:, None] & m_w[None, :], other=0.0)
        g = tl.dot(v.to(BUILD_DTYPE), dmc.to(BUILD_DTYPE), g, input_precision=BUILD_PRECISION)
    for j in range(K0, k):  # dF_k[r] = G[r] F_{K0}^T ... F_{k-1}^T
        e_t = tl.trans(_residual_at(q_ptr, o_w, o_w, i_b, D, j, K0, K1, B, HC, W, WB, S, PACK)).to(BUILD_DTYPE)
        g = tl.dot(g.to(BUILD_DTYPE), e_t, g, input_precision=BUILD_PRECISION)
    o_q, m_q = _factor_at(o_r, o_w, i_b, D, k, K0, K1, B, HC, W, WB, S, PACK)
    tl.store(dq_ptr + o_q, g, mask=m_q)


@triton.jit
def _segmented_apply_kernel(
    x_ptr, q_ptr, y_ptr, chunk_ptr, n, D, Q_STRIDE,
    K0: tl.constexpr, K1: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, W: tl.constexpr, WB: tl.constexpr,
    WP: tl.constexpr, S: tl.constexpr, H: tl.constexpr, PACK: tl.constexpr, TRANS: tl.constexpr,
    BT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BUILD_DTYPE: tl.constexpr,
    BUILD_PRECISION: tl.constexpr,
):
    """Mixed-adapter batches: rows ``[row0, row1)`` of chunk i_c lie in one adapter's segment
    (``chunk_ptr[3 i_c:3 i_c + 3]`` = row0, row1, adapter k): ``y = x + x Delta_k`` on block i_b's
    columns, with adapter k's Delta built once per program from its Q (``q_ptr + k Q_STRIDE``)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    row0 = tl.load(chunk_ptr + 3 * i_c).to(tl.int64)
    row1 = tl.load(chunk_ptr + 3 * i_c + 1).to(tl.int64)
    i_k = tl.load(chunk_ptr + 3 * i_c + 2).to(tl.int64)
    o_col, m_col = _columns(i_b, WB, WP, S, H)  # [WP]
    b_d = _delta(q_ptr + i_k * Q_STRIDE, i_b.to(tl.int32), D, K0, K1, B, HC, W, WB, WP, S, PACK, TRANS, DOT_DTYPE, BUILD_DTYPE,
                 BUILD_PRECISION)
    for t0 in range(row0, row1, BT):
        o_t = t0 + tl.arange(0, BT)
        o_x = o_t[:, None] * n + o_col[None, :]  # [BT, WP]
        m_x = (o_t < row1)[:, None] & m_col[None, :]
        b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0)
        b_y = b_x.to(tl.float32) + tl.dot(b_x.to(DOT_DTYPE), b_d, input_precision=PRECISION)
        tl.store(y_ptr + o_x, b_y.to(y_ptr.dtype.element_ty), mask=m_x)


# ---------------------------------------------------------------------------------------------
# kernels: one pass over several factor groups (fused_groups)


@triton.constexpr_function
def _batch_parts(Z, WP, BW):
    """Parts to cut each ``[WP, WP]`` block of a batched product into (its output columns, or an
    accumulator's rows) so that the batch, Z blocks x parts, covers the program's BW warps.
    Triton lays a batched dot's warps along the batch axis only (mma v2, ``warpsPerCTA = [BW, 1,
    1]``): a batch of Z < BW blocks is held and multiplied whole in each of BW / Z warp groups,
    BW / Z times the registers and the tensor-core work. Parts stay at least 16 wide (a dot's
    least). The one-pass kernels pass their warps (64x3's forward: 4 blocks of 64 at 8 warps,
    half the HMMA instructions cut in 2, registers unchanged; 34x3's accumulating chain pass, with
    its halves (HALF), 255 registers and 24-76 bytes spilled -> 178 and none; the halves alone
    left it at 255); BW = 1 never cuts."""
    parts = 1
    while Z * parts < BW and WP // (2 * parts) >= 16:
        parts *= 2
    return parts


@triton.jit
def _cut_columns(t, P: tl.constexpr):
    """``[Z, R, C]`` -> ``[Z P, R, C / P]``: each matrix's columns cut into P parts, part p of
    matrix z at batch ``z P + p`` (``_batch_parts``' cut; ``_join_columns`` undoes it)."""
    Z: tl.constexpr = t.shape[0]
    R: tl.constexpr = t.shape[1]
    C: tl.constexpr = t.shape[2]
    return tl.reshape(tl.permute(tl.reshape(t, (Z, R, P, C // P)), (0, 2, 1, 3)), (Z * P, R, C // P))


@triton.jit
def _join_columns(t, P: tl.constexpr):
    """``_cut_columns``' inverse: ``[Z P, R, C / P]`` -> ``[Z, R, C]``."""
    Z: tl.constexpr = t.shape[0] // P
    R: tl.constexpr = t.shape[1]
    C: tl.constexpr = t.shape[2] * P
    return tl.reshape(tl.permute(tl.reshape(t, (Z, P, R, C // P)), (0, 2, 1, 3)), (Z, R, C))


@triton.jit
def _repeat_parts(t, P: tl.constexpr):
    """``[Z, R, C]`` -> ``[Z P, R, C]``: each matrix repeated for the P parts it meets."""
    Z: tl.constexpr = t.shape[0]
    R: tl.constexpr = t.shape[1]
    C: tl.constexpr = t.shape[2]
    return tl.reshape(tl.broadcast_to(tl.expand_dims(t, 1), (Z, P, R, C)), (Z * P, R, C))


@triton.jit
def _fused_factor(q_ptr, i_cb, D, k: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, NL: tl.constexpr,
                  B: tl.constexpr, HC: tl.constexpr, HP: tl.constexpr, z0=0, ZC: tl.constexpr = 0):
    """Where factor k's values sit for every block of group [K0, K1) in coarse block i_cb, as a
    ``[Z, WP, WP]`` tile: Z = the group's blocks in the coarse block (outer bits x low bits), WP =
    ``2^(K1-K0) HP`` (row = the block's chunk bits m and offset, chunks padded from HC to HP).
    The same layout as ``_factor`` (and ``reference.group_blocks``), with padded chunks. Q's
    blocks are B wide as laid out (``padded_q``): a block's second half of rows starts at B/2.
    With ZC, only the group's blocks ``[z0, z0 + ZC)`` (``sweep_blocks``)."""
    LO: tl.constexpr = 1 << K0
    MID: tl.constexpr = 1 << (K1 - K0)
    HI: tl.constexpr = 1 << (NL - K1)
    ZN: tl.constexpr = ZC if ZC > 0 else HI * LO
    o_z = z0 + tl.arange(0, ZN)
    o_w = tl.arange(0, MID * HP)
    m = o_w // HP
    off = o_w % HP
    bit: tl.constexpr = 1 << (k - K0)
    half = (m // bit) % 2
    i_b = (i_cb * HI + o_z // LO) * LO + o_z % LO  # [Z] the block's index in the layer
    chunk = ((i_b // LO)[:, None] * MID + m[None, :]) * LO + (i_b % LO)[:, None]  # [Z, WP]
    d = (chunk // (2 << k)) * (1 << k) + chunk % (1 << k)
    row = half * (B // 2) + off
    o_q = ((k * D + d)[:, :, None] * B + row[None, :, None]) * B + row[None, None, :]
    valid = off < B // 2
    m_q = (valid[:, None] & valid[None, :]) & ((m | bit)[:, None] == (m | bit)[None, :])
    return o_q, m_q[None, :, :] & (o_z >= 0)[:, None, None]


@triton.jit
def _fused_delta(q_ptr, i_cb, D, K0: tl.constexpr, K1: tl.constexpr, NL: tl.constexpr, B: tl.constexpr,
                 HC: tl.constexpr, HP: tl.constexpr, TRANS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr, BW: tl.constexpr = 1):
    """``Delta = Mc - I`` (``Delta^T`` with TRANS) of every block of the group in coarse block
    i_cb, ``[Z, WP, WP]``, in residual form as ``_product_minus_eye`` builds one block. With BW,
    as ``_fused_group`` holds it: each block's columns cut into ``_batch_parts`` parts,
    ``[Z parts, WP, WP / parts]``."""
    o_w = tl.arange(0, (1 << (K1 - K0)) * HP)
    eye = ((o_w[:, None] == o_w[None, :]) & ((o_w % HP) < HC)[:, None])[None, :, :]
    o_q, m_q = _fused_factor(q_ptr, i_cb, D, K0, K0, K1, NL, B, HC, HP)
    f = tl.load(q_ptr + o_q, mask=m_q, other=0.0).to(tl.float32)
    d = tl.where(eye, f - 1.0, f)
    for k in tl.static_range(K0 + 1, K1):
        o_q, m_q = _fused_factor(q_ptr, i_cb, D, k, K0, K1, NL, B, HC, HP)
        f = tl.load(q_ptr + o_q, mask=m_q, other=0.0).to(tl.float32)
        e = tl.where(eye, f - 1.0, f)
        d = tl.dot(e.to(BUILD_DTYPE), d.to(BUILD_DTYPE), d + e, input_precision=BUILD_PRECISION)
    if TRANS:
        d = tl.permute(d, (0, 2, 1))
    d = d.to(DOT_DTYPE)
    Z: tl.constexpr = (1 << (NL - K1)) * (1 << K0)
    WP: tl.constexpr = (1 << (K1 - K0)) * HP
    GP: tl.constexpr = _batch_parts(Z, WP, BW)
    if GP > 1:
        d = _cut_columns(d, GP)
    return d


@triton.jit
def _fused_group(b_t, b_d, BT: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, NL: tl.constexpr,
                 HP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BW: tl.constexpr = 1):
    """``t + t Delta`` on the group's blocks: the row tile ``[BT, 2^NL HP]`` (chunk index bits
    high to low, then the offset) is permuted so each block's columns are contiguous, multiplied
    by its block (one batched dot), and permuted back. Everything stays in registers. With BW,
    b_d is ``_fused_delta``'s cut one: each block's rows meet every part of its columns."""
    LO: tl.constexpr = 1 << K0
    MID: tl.constexpr = 1 << (K1 - K0)
    HI: tl.constexpr = 1 << (NL - K1)
    b_u = tl.permute(tl.reshape(b_t, (BT, HI, MID, LO, HP)), (1, 3, 0, 2, 4))
    b_u = tl.reshape(b_u, (HI * LO, BT, MID * HP))  # [Z, BT, WP]
    Z: tl.constexpr = HI * LO
    WP: tl.constexpr = MID * HP
    GP: tl.constexpr = _batch_parts(Z, WP, BW)
    if GP > 1:
        b_w = tl.dot(_repeat_parts(b_u.to(DOT_DTYPE), GP), b_d, input_precision=PRECISION)
        b_u = b_u + _join_columns(b_w, GP)
    else:
        b_u = b_u + tl.dot(b_u.to(DOT_DTYPE), b_d, input_precision=PRECISION)
    b_u = tl.permute(tl.reshape(b_u, (HI, LO, BT, MID, HP)), (2, 0, 3, 1, 4))
    return tl.reshape(b_u, (BT, HI * MID * LO * HP))


@triton.jit
def _fused_apply_kernel(
    x_ptr, q_ptr, y_ptr, T, n, D,
    NL: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, HP: tl.constexpr, NG: tl.constexpr,
    A0: tl.constexpr, A1: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, TRANS: tl.constexpr,
    BT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BUILD_DTYPE: tl.constexpr,
    BUILD_PRECISION: tl.constexpr, BW: tl.constexpr,
):
    """``y = x M`` (``x M^T`` with TRANS) on coarse block i_cb for row tiles i_p, i_p + P, ...:
    the NG groups, levels ``[A0, A1)``, ``[B0, B1)``, ``[C0, C1)``, ``[D0, D1)``, in the order they act, each
    with its blocks held for the whole row loop. x is read once and y written once."""
    i_p = tl.program_id(0).to(tl.int64)
    i_cb = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(0)
    LP: tl.constexpr = (1 << NL) * HP
    o_c = tl.arange(0, LP)
    m_c = (o_c % HP) < HC
    o_col = i_cb * ((1 << NL) * HC) + (o_c // HP) * HC + o_c % HP  # [LP] padded chunk lanes masked
    b_da = _fused_delta(q_ptr, i_cb, D, A0, A1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE, BUILD_PRECISION, BW)
    b_db = _fused_delta(q_ptr, i_cb, D, B0, B1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE, BUILD_PRECISION, BW)
    if NG > 2:
        b_dc = _fused_delta(q_ptr, i_cb, D, C0, C1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE, BUILD_PRECISION, BW)
    if NG > 3:
        b_dd = _fused_delta(q_ptr, i_cb, D, D0, D1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE, BUILD_PRECISION, BW)
    for i_t in range(i_p, tl.cdiv(T, BT), n_p):
        o_t = i_t * BT + tl.arange(0, BT)
        o_x = o_t[:, None] * n + o_col[None, :]  # [BT, LP]
        m_x = (o_t < T)[:, None] & m_c[None, :]
        b_t = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_t = _fused_group(b_t, b_da, BT, A0, A1, NL, HP, DOT_DTYPE, PRECISION, BW)
        b_t = _fused_group(b_t, b_db, BT, B0, B1, NL, HP, DOT_DTYPE, PRECISION, BW)
        if NG > 2:
            b_t = _fused_group(b_t, b_dc, BT, C0, C1, NL, HP, DOT_DTYPE, PRECISION, BW)
        if NG > 3:
            b_t = _fused_group(b_t, b_dd, BT, D0, D1, NL, HP, DOT_DTYPE, PRECISION, BW)
        tl.store(y_ptr + o_x, b_t.to(y_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _fused_frame(b_t, BT: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, NL: tl.constexpr, HP: tl.constexpr):
    """The row tile ``[BT, 2^NL HP]`` in the group's block frame ``[Z, BT, WP]``."""
    LO: tl.constexpr = 1 << K0
    MID: tl.constexpr = 1 << (K1 - K0)
    HI: tl.constexpr = 1 << (NL - K1)
    b_u = tl.permute(tl.reshape(b_t, (BT, HI, MID, LO, HP)), (1, 3, 0, 2, 4))
    return tl.reshape(b_u, (HI * LO, BT, MID * HP))


@triton.jit
def _chain_store_rows(dq_ptr, b_fv, o_t, row_hi, i_cb, D, K0: tl.constexpr, NL: tl.constexpr, B: tl.constexpr,
                      HC: tl.constexpr, HP: tl.constexpr, RC: tl.constexpr, TRANS: tl.constexpr):
    """The chain pass of a one-level group [K0, K0+1) acting first (``_fused_grad_kernel``'s
    DIRECT): row r of the identity lies in one block z(r) of the group, at row p(r), so dMc's row
    p(r) of block z(r) is row r of the frame ``b_fv`` ``[Z, RC, WP]`` there, and dQ of the level
    is dMc (transposed with TRANS). Stored straight into Q's layout (``_fused_factor``'s, where a
    one-level group's block z is Q block i_b of the level)."""
    LO: tl.constexpr = 1 << K0
    HI: tl.constexpr = 1 << (NL - K0 - 1)
    o_z = tl.arange(0, HI * LO)
    o_w = tl.arange(0, 2 * HP)
    chunk = o_t // HC  # row r's chunk: bits (outer, the level's bit, low)
    z_r = (chunk // (2 * LO)) * LO + chunk % LO
    p_r = ((chunk // LO) % 2) * (B // 2) + o_t % HC  # its row in the block
    c_w = (o_w // HP) * (B // 2) + o_w % HP  # lane w's column in the block
    i_b = (i_cb * HI + o_z // LO) * LO + o_z % LO  # [Z] Q block of the level
    if TRANS:
        o_q = ((K0 * D + i_b)[:, None, None] * B + c_w[None, None, :]) * B + p_r[None, :, None]
    else:
        o_q = ((K0 * D + i_b)[:, None, None] * B + p_r[None, :, None]) * B + c_w[None, None, :]
    mine = (o_z[:, None] == z_r[None, :]) & (o_t < row_hi)[None, :]
    tl.store(dq_ptr + o_q, b_fv, mask=mine[:, :, None] & ((o_w % HP) < HC)[None, None, :])


@triton.jit
def _chain_factor_rows(q_ptr, o_t, o_lc, m_x, i_cb, D, k: tl.constexpr, NL: tl.constexpr, B: tl.constexpr,
                       HC: tl.constexpr, TRANS: tl.constexpr):
    """Rows ``o_t`` of one level's factor ``F_k`` (``F_k^T`` with TRANS) on the coarse block's
    lanes ``o_lc`` (their columns inside it), ``[RC, LP]`` fp32: the identity's rows carried
    through a one-level group (``_fused_grad_kernel``'s CHAIN), gathered from Q rather than
    multiplied by a held block. Row r's chunk pairs with the chunk that differs in bit k; Q block
    and rows as ``_fused_factor`` lays them out."""
    bit: tl.constexpr = 1 << k
    chunk_r = i_cb * (1 << NL) + o_t // HC  # [RC] global chunks
    chunk_c = i_cb * (1 << NL) + o_lc // HC  # [LP]
    d = (chunk_r // (2 * bit)) * bit + chunk_r % bit  # [RC] the level's block of row r
    row_r = ((chunk_r // bit) % 2) * (B // 2) + o_t % HC
    row_c = ((chunk_c // bit) % 2) * (B // 2) + o_lc % HC
    if TRANS:
        o_q = ((k * D + d)[:, None] * B + row_c[None, :]) * B + row_r[:, None]
    else:
        o_q = ((k * D + d)[:, None] * B + row_r[:, None]) * B + row_c[None, :]
    pair = (chunk_r | bit)[:, None] == (chunk_c | bit)[None, :]
    return tl.load(q_ptr + o_q, mask=m_x & pair, other=0.0).to(tl.float32)


@triton.jit
def _fused_store_dq(dq_ptr, q_ptr, dmc, i_cb, D, K0: tl.constexpr, K1: tl.constexpr, NL: tl.constexpr,
                    B: tl.constexpr, HC: tl.constexpr, HP: tl.constexpr, BUILD_DTYPE: tl.constexpr,
                    BUILD_PRECISION: tl.constexpr, z0=0, ZC: tl.constexpr = 0):
    """dQ of the group's factors from ``dMc`` ``[Z, WP, WP]``, every block of the coarse block at
    once: ``_store_dq`` with a batch of blocks (``dF_k = (F_{K1-1} ... F_{k+1})^T dMc (F_{k-1} ...
    F_{K0})^T`` on F_k's values, swept down from the top level in residual form; int32
    offsets, as ``_store_dq``'s)."""
    i_cb = i_cb.to(tl.int32)
    o_w = tl.arange(0, (1 << (K1 - K0)) * HP)
    eye = ((o_w[:, None] == o_w[None, :]) & ((o_w % HP) < HC)[:, None])[None, :, :]
    upper_g = dmc  # (F_{K1-1} ... F_{k+1})^T dMc
    for k in tl.static_range(K1 - 1, K0 - 1, -1):
        upper = upper_g
        for j in tl.static_range(K0, k):
            o_q, m_q = _fused_factor(q_ptr, i_cb, D, j, K0, K1, NL, B, HC, HP, z0, ZC)
            f = tl.load(q_ptr + o_q, mask=m_q, other=0.0).to(tl.float32)
            e = tl.permute(tl.where(eye, f - 1.0, f), (0, 2, 1))
            upper = tl.dot(upper.to(BUILD_DTYPE), e.to(BUILD_DTYPE), upper, input_precision=BUILD_PRECISION)
        o_q, m_q = _fused_factor(q_ptr, i_cb, D, k, K0, K1, NL, B, HC, HP, z0, ZC)
        tl.store(dq_ptr + o_q, upper, mask=m_q)
        if k > K0:  # G <- F_k^T G for the level below
            f = tl.load(q_ptr + o_q, mask=m_q, other=0.0).to(tl.float32)
            e = tl.permute(tl.where(eye, f - 1.0, f), (0, 2, 1))
            upper_g = tl.dot(e.to(BUILD_DTYPE), upper_g.to(BUILD_DTYPE), upper_g, input_precision=BUILD_PRECISION)


@triton.jit
def _fused_grad_kernel(
    x_ptr, g_ptr, q_ptr, dx_ptr, dd_ptr, dq_ptr, T, n, D, ROWS, NCB,
    NL: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, HP: tl.constexpr, NG: tl.constexpr,
    A0: tl.constexpr, A1: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, SEL: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr,
    TRANS: tl.constexpr, WRITE_DX: tl.constexpr, FUSED_DQ: tl.constexpr, RC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr,
    CHAIN: tl.constexpr, DIRECT: tl.constexpr, HALF: tl.constexpr, BW: tl.constexpr,
):
    """One pass over (x, g) for group SEL (levels ``[S0, S1)``; groups in acting order A, B, C,
    D) on rows ``[i_s ROWS, (i_s+1) ROWS)`` of coarse block i_cb: the group's input u is x carried
    forward through the groups before it, its output gradient v is g carried back through the
    groups after it, and ``dMc = sum_rows u^T v`` is reduced RC rows at a time; then dQ (FUSED_DQ:
    the only split) or the split's partial. With WRITE_DX (group A's pass) also ``dx = v + v
    Delta_A^T`` (``Delta_A`` with TRANS). Each group's blocks are held once, in the orientation
    this pass uses them in (but CHAIN's GATHER_A: below).

    CHAIN (``fused_chain_dq``): x is the identity, one row per column of the coarse block (made here,
    never read), and g is the coarse block's dense ``dMc`` ``[L, L]`` (row r of block i_cb at
    ``(i_cb L + r) L``; with TRANS, the chain of ``y = I M^T`` reads ``dMc^T``): dQ is then the
    chain rule from dMc to the factors. DIRECT (the chain of a one-level group acting first):
    row r of the identity is nonzero in one block of the group only, so each row's dMc row is
    that row of v, stored straight into dQ: no accumulator, no partials. GATHER_A (an
    accumulating chain pass whose first group A is one level): the identity's rows carried
    through A are rows of A's factor, gathered from Q (``_chain_factor_rows``) rather than made
    here and multiplied by a held Delta_A, which frees that block's registers. (``fused_chain_dq``
    runs accumulating passes in ``y = I M`` only; the TRANS gather is tested directly.)

    HALF (``chain_halves``: a gathered A of the top level, in ``y = I M``): a program takes one
    half of the coarse block's columns, those whose chunk has the top level's bit h (program axis
    1 runs over 2 NCB halves, ``2 i_cb + h``). Only A mixes the halves, and its rows are gathered
    at the half's columns; every group after it acts within a half, which is a coarse block of
    NL - 1 levels at index ``2 i_cb + h`` (a level's blocks depend on its index and b, not on N).
    So each program holds half the later groups' blocks, half the tiles and half of S's dMc,
    for the same total work: the whole pass spilled 24-76 bytes in its loop at 34x3-62x3.
    BW: the program's warps, which the batched products are cut to cover (``_batch_parts``)."""
    i_s = tl.program_id(0).to(tl.int64)
    i_fb = tl.program_id(1).to(tl.int64)  # the frame's coarse block: a half with HALF
    FB: tl.constexpr = 2 if HALF else 1
    NF: tl.constexpr = NL - 1 if HALF else NL  # the frame's levels
    i_cb = i_fb // FB  # the coarse block (x's, g's and A's gather)
    LP: tl.constexpr = (1 << NF) * HP
    o_c = tl.arange(0, LP)
    m_c = (o_c % HP) < HC
    LC: tl.constexpr = (1 << NL) * HC
    # [LP] the lane's column inside the coarse block (in half i_fb % 2 with HALF)
    o_lc = (i_fb % FB) * ((1 << NF) * HC) + (o_c // HP) * HC + o_c % HP
    o_col = i_cb * LC + o_lc
    # the chain's identity rows through a one-level first group are rows of its factor: gathered
    # from Q, so that group's blocks are not held (the accumulating passes' registers)
    GATHER_A: tl.constexpr = CHAIN and SEL > 0 and A1 - A0 == 1
    # the halves are split by the top level's bit, which only a gathered A of that level mixes
    tl.static_assert(not HALF or (GATHER_A and A1 == NL and not TRANS and not DIRECT))
    # before SEL: forward operands (x M's blocks); after SEL: their transposes (the gradient's)
    if (SEL > 0 and not GATHER_A) or WRITE_DX:
        b_da = _fused_delta(q_ptr, i_fb, D, A0, A1, NF, B, HC, HP, TRANS != (SEL <= 0), DOT_DTYPE, BUILD_DTYPE,
                            BUILD_PRECISION, BW)
    if SEL != 1:
        b_db = _fused_delta(q_ptr, i_fb, D, B0, B1, NF, B, HC, HP, TRANS != (SEL < 1), DOT_DTYPE, BUILD_DTYPE,
                            BUILD_PRECISION, BW)
    if NG > 2 and SEL != 2:
        b_dc = _fused_delta(q_ptr, i_fb, D, C0, C1, NF, B, HC, HP, TRANS != (SEL < 2), DOT_DTYPE, BUILD_DTYPE,
                            BUILD_PRECISION, BW)
    if NG > 3 and SEL != 3:
        b_dd = _fused_delta(q_ptr, i_fb, D, D0, D1, NF, B, HC, HP, TRANS != (SEL < 3), DOT_DTYPE, BUILD_DTYPE,
                            BUILD_PRECISION, BW)
    WP: tl.constexpr = (1 << (S1 - S0)) * HP
    Z: tl.constexpr = (1 << (NF - S1)) * (1 << S0)
    AP: tl.constexpr = _batch_parts(Z, WP, BW)  # dMc's rows cut into parts (the batch's warps)
    b_acc = tl.zeros([Z * AP, WP // AP, WP], dtype=tl.float32)  # (unused, so never allocated, with DIRECT)
    row_lo = i_s * ROWS
    row_hi = tl.minimum(row_lo + ROWS, T)
    for t0 in range(row_lo, row_hi, RC):
        o_t = t0 + tl.arange(0, RC)
        o_x = o_t[:, None] * n + o_col[None, :]  # [RC, LP]
        m_x = (o_t < row_hi)[:, None] & m_c[None, :]
        if CHAIN:  # int32 offsets inside the coarse block: int64 ones spilled the accumulating passes
            o_r = o_t.to(tl.int32)
            if GATHER_A:  # I F_A: rows of group A's one factor (transposed with TRANS, as b_da would be)
                b_u = _chain_factor_rows(q_ptr, o_r, o_lc, m_x, i_cb.to(tl.int32), D, A0, NL, B, HC, TRANS)
                if SEL == 1:  # only a dot operand from here (further groups keep the fp32 residual)
                    b_u = b_u.to(DOT_DTYPE)
            else:
                b_u = tl.where((o_lc[None, :] == o_r[:, None]) & m_x, 1.0, 0.0)
            if TRANS:  # the chain of y = I M^T: its gradient is dMc^T
                o_g = o_lc[None, :] * LC + o_r[:, None]
            else:
                o_g = o_r[:, None] * LC + o_lc[None, :]
            b_v = tl.load(g_ptr + i_cb * LC * LC + o_g, mask=m_x, other=0.0).to(tl.float32)
        else:
            b_u = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
            b_v = tl.load(g_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        if SEL > 0 and not GATHER_A:
            b_u = _fused_group(b_u, b_da, RC, A0, A1, NF, HP, DOT_DTYPE, PRECISION, BW)
        if SEL > 1:
            b_u = _fused_group(b_u, b_db, RC, B0, B1, NF, HP, DOT_DTYPE, PRECISION, BW)
        if SEL > 2:
            b_u = _fused_group(b_u, b_dc, RC, C0, C1, NF, HP, DOT_DTYPE, PRECISION, BW)
        if NG > 3 and SEL < 3:
            b_v = _fused_group(b_v, b_dd, RC, D0, D1, NF, HP, DOT_DTYPE, PRECISION, BW)
        if NG > 2 and SEL < 2:
            b_v = _fused_group(b_v, b_dc, RC, C0, C1, NF, HP, DOT_DTYPE, PRECISION, BW)
        if SEL < 1:
            b_v = _fused_group(b_v, b_db, RC, B0, B1, NF, HP, DOT_DTYPE, PRECISION, BW)
        if DIRECT:
            _chain_store_rows(dq_ptr, _fused_frame(b_v, RC, S0, S1, NF, HP), o_t, row_hi, i_cb, D, S0, NL, B, HC, HP,
                              RC, TRANS)
        else:
            b_fu = _fused_frame(b_u, RC, S0, S1, NF, HP).to(DOT_DTYPE)
            b_fv = _fused_frame(b_v, RC, S0, S1, NF, HP).to(DOT_DTYPE)
            if AP > 1:  # dMc's rows are u's columns
                b_fu = _cut_columns(b_fu, AP)
                b_fv = _repeat_parts(b_fv, AP)
            b_acc = tl.dot(tl.permute(b_fu, (0, 2, 1)), b_fv, b_acc, input_precision=PRECISION)
        if WRITE_DX:
            b_dx = _fused_group(b_v, b_da, RC, A0, A1, NF, HP, DOT_DTYPE, PRECISION, BW)
            tl.store(dx_ptr + o_x, b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)
    if not DIRECT:  # (DIRECT stored its rows in the loop)
        b_acc = tl.reshape(b_acc, (Z, WP, WP))
        if TRANS:  # the held operand was Delta^T: its gradient is the transpose
            b_acc = tl.permute(b_acc, (0, 2, 1))
        if FUSED_DQ:
            _fused_store_dq(dq_ptr, q_ptr, b_acc, i_fb, D, S0, S1, NF, B, HC, HP, BUILD_DTYPE, BUILD_PRECISION)
        else:
            o_z = tl.arange(0, Z)
            o_w = tl.arange(0, WP)
            m_w = (o_w % HP) < HC
            o_dd = (((i_s * NCB * FB + i_fb) * Z + o_z[:, None, None]) * (WP * WP) + o_w[None, :, None] * WP
                    + o_w[None, None, :])
            tl.store(dd_ptr + o_dd, b_acc, mask=(m_w[:, None] & m_w[None, :])[None, :, :] & (o_z >= 0)[:, None, None])


@triton.jit
def _fused_dq_kernel(
    dd_ptr, q_ptr, dq_ptr, D, SPLITS, NCB,
    NL: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, HP: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr,
    BUILD_DTYPE: tl.constexpr, BUILD_PRECISION: tl.constexpr, ZC: tl.constexpr,
):
    """dQ of group ``[S0, S1)``'s blocks ``[z0, z0 + ZC)`` in coarse block i_cb from its SPLITS
    partials, added in split order (deterministic)."""
    i_cb = tl.program_id(0).to(tl.int64)
    z0 = tl.program_id(1) * ZC
    WP: tl.constexpr = (1 << (S1 - S0)) * HP
    Z: tl.constexpr = (1 << (NL - S1)) * (1 << S0)
    o_z = z0 + tl.arange(0, ZC)
    o_w = tl.arange(0, WP)
    m_w = (o_w % HP) < HC
    m_dd = (m_w[:, None] & m_w[None, :])[None, :, :] & (o_z >= 0)[:, None, None]
    dmc = tl.zeros([ZC, WP, WP], dtype=tl.float32)
    for i_s in range(0, SPLITS):
        o_dd = ((i_s * NCB + i_cb) * Z + o_z[:, None, None]) * (WP * WP) + o_w[None, :, None] * WP + o_w[None, None, :]
        dmc += tl.load(dd_ptr + o_dd, mask=m_dd, other=0.0)
    _fused_store_dq(dq_ptr, q_ptr, dmc, i_cb, D, S0, S1, NL, B, HC, HP, BUILD_DTYPE, BUILD_PRECISION, z0, ZC)


# ---------------------------------------------------------------------------------------------
# launchers


def _dot_meta(dtype: torch.dtype, width: int) -> dict:
    """Row products: operands in x's dtype, fp32 accumulation (fp32 inputs: tf32x3, fp32-accurate
    on tensor cores). Block products (second-order terms only): tf32x3 for fp32 inputs; tf32 for
    16-bit ones up to 64 wide: with x's dtype there, large rotations (R ~ 0.5) lose 2.3x accuracy
    (6.7e-3 against 2.9e-3 relative in y, emulated), while tf32 matches an exact build. At 128 wide
    the fp32 operands of the block products would need more shared memory than an SM has, so
    those use bf16 (fp32's range: dMc, a sum over T rows, can pass fp16's 65504). The interpreter
    computes bf16 dots wrongly, so there every operand is fp32."""
    if interpreting():
        return dict(DOT_DTYPE=tl.float32, PRECISION="ieee", BUILD_DTYPE=tl.float32, BUILD_PRECISION="ieee")
    if dtype == torch.float32:
        return dict(DOT_DTYPE=tl.float32, PRECISION="tf32x3", BUILD_DTYPE=tl.float32, BUILD_PRECISION="tf32x3")
    low = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    if width > 64:  # bf16 even for fp16 x: dMc sums T rows of (loss-scaled) gradients, past fp16's range
        return dict(DOT_DTYPE=low, PRECISION="ieee", BUILD_DTYPE=tl.bfloat16, BUILD_PRECISION="ieee")
    return dict(DOT_DTYPE=low, PRECISION="ieee", BUILD_DTYPE=tl.float32, BUILD_PRECISION="tf32")


def _layout(grp: dict, b: int) -> dict:
    """The block-layout constexprs of a group's kernels."""
    return dict(K0=grp["k0"], K1=grp["k1"], B=b, HC=grp["HC"], W=grp["W"], WB=grp["WB"], WP=grp["WP"], S=grp["S"],
                PACK=grp["pack"])


def _programs(T: int, BT: int, pps: int, grp: dict, b: int, sms: int) -> int:
    """Programs per block of the forward: PPS per SM across the blocks, each with at least
    ``_rows_min`` rows, but never fewer than fill the SMs once."""
    NB = grp["NB"]
    want = min(triton.cdiv(pps * sms, NB), T // _rows_min(grp, b))
    return max(1, min(triton.cdiv(T, BT), max(triton.cdiv(sms, NB), want)))


def _splits(T: int, grp: dict, b: int, sms: int) -> tuple[int, int]:
    """Row splits of the backward, set by T, the shape and the device only (never the tile config,
    so the dMc reduction order, hence the bits of dQ, do not change with tuning): (splits, rows
    per split). A split covers at least 8 WP rows (its dMc partial costs at most about 1/6 of its
    rows' bytes) and ``_rows_min`` rows, unless that would leave SMs idle."""
    if T == 0:
        return 1, 0
    NB = grp["NB"]
    want = min(triton.cdiv(4 * sms, NB), T // max(8 * grp["WP"], _rows_min(grp, b)))
    splits = max(1, min(triton.cdiv(T, 4 * RC), max(triton.cdiv(sms, NB), want)))
    rows = triton.cdiv(triton.cdiv(T, splits), RC) * RC
    return triton.cdiv(T, rows), rows


def apply_into(x, q, transpose, k0, key, y) -> None:
    """``y = x + x Delta`` per block of the group starting at level k0 (``Delta^T`` with
    transpose); x and y contiguous ``[T, n]``, q the group's levels of Q (fp32, contiguous)."""
    T, n = x.shape
    if T == 0:
        return
    b = key[1]
    grp = group(*key, k0)
    source, cfg = group_config(*key, x.dtype, x.device)
    LAST_LAUNCH["butterfly_fwd"] = (source, dict(cfg))
    BT = cfg["BT"]
    programs = _programs(T, BT, cfg["PPS"], grp, b, num_sms(x.device))
    wrap_triton(_apply_kernel)[(programs, grp["NB"])](
        x, q, y, T, n, n // b, **_layout(grp, b), H=grp["H"], TRANS=transpose, BT=BT,
        **_dot_meta(x.dtype, grp["WP"]), num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
    )


def _fused_programs(T: int, BT: int, pps: int, n: int, b: int, N: int, sms: int) -> int:
    """Programs per coarse block of the one-pass kernel: as ``_programs``, each with at least
    ``ROWS_PER_Q`` rows per level-times-b (its Q read is about 1/16 of its rows' bytes)."""
    blocks = n // (b << (N - 1))
    want = min(triton.cdiv(pps * sms, blocks), T // (ROWS_PER_Q * N * b))
    return max(1, min(triton.cdiv(T, BT), max(triton.cdiv(sms, blocks), want)))


def fused_apply_into(x, q, transpose, key, y) -> None:
    """``y = x M`` (``x M^T``) in one pass for a shape with ``fused_groups``; x and y contiguous
    ``[T, n]``, q the key's N levels of Q (all of it, or ``split_prefix``'s first levels; fp32,
    contiguous)."""
    T, n = x.shape
    if T == 0:
        return
    _, b, N = key
    groups = fused_groups(*key)
    if transpose:  # x M^T = x M_lo^T ... M_hi^T
        groups = groups[::-1]
    source, cfg = pick_config("fwd", *key, x.dtype, x.device)
    LAST_LAUNCH["butterfly_fused"] = (source, dict(cfg))
    hp = next_pow2(b // 2)
    programs = _fused_programs(T, cfg["BT"], cfg["PPS"], n, b, N, num_sms(x.device))
    wrap_triton(_fused_apply_kernel)[(programs, n // (b << (N - 1)))](
        x, padded_q(q, b), y, T, n, n // b, NL=N, B=q_block(b), HC=b // 2, HP=hp, **group_bounds(groups), TRANS=transpose, BT=cfg["BT"],
        **_dot_meta(x.dtype, max(hp << (k1 - k0) for k0, k1 in groups)), BW=cfg["num_warps"], num_warps=cfg["num_warps"],
        num_stages=fused_stages(b, source, cfg.get("num_stages", 2)), **register_cap(fused_options(*key).get("maxnreg")),
    )


# Rows per step of the one-pass backward's dMc reduction (fixed, like RC): its tiles span the whole
# coarse block, so fewer rows than RC.
FUSED_RC = 16


def _fused_splits(T: int, n: int, b: int, N: int, sms: int) -> tuple[int, int]:
    """Row splits of the one-pass backward (as ``_splits``: set by T, the shape and the device
    only): (splits, rows per split)."""
    if T == 0:
        return 1, 0
    blocks = n // (b << (N - 1))
    want = min(triton.cdiv(4 * sms, blocks), T // (ROWS_PER_Q * N * b))
    splits = max(1, min(triton.cdiv(T, 4 * FUSED_RC), max(triton.cdiv(sms, blocks), want)))
    rows = triton.cdiv(triton.cdiv(T, splits), FUSED_RC) * FUSED_RC
    return triton.cdiv(T, rows), rows


def fused_grad(x, g, q, transpose, key, need_dx):
    """``(dx or None, dQ)`` of ``y = x M`` (``x M^T``) for a shape with ``fused_groups``: one
    pass over (x, g) per group, the first-acting group's pass also writing dx."""
    T, n = x.shape
    _, b, N = key
    dx = new_empty(T, n, dtype=x.dtype, device=x.device) if need_dx else None
    if T == 0:
        return dx, torch.zeros(q.shape, dtype=torch.float32, device=x.device)
    groups = fused_groups(*key)
    if transpose:
        groups = groups[::-1]
    source, cfg = pick_config("bwd", *key, x.dtype, x.device)
    LAST_LAUNCH["butterfly_fused_bwd"] = (source, dict(cfg))
    q = padded_q(q, b)
    dq = new_empty(*q.shape, dtype=torch.float32, device=x.device)
    for sel in range(len(groups)):
        _fused_grad_pass(x, g, q, dx, dq, groups, sel, transpose, need_dx and sel == 0, key, cfg, x.dtype,
                         chain=False, direct=False)
    return dx, unpadded_dq(dq, b)


def chain_halves(groups, sel: int, transpose: bool) -> bool:
    """Whether the accumulating chain pass of ``groups[sel]`` (groups in acting order) runs a
    program per half coarse block (``_fused_grad_kernel``'s HALF): its first group is the top
    level alone, gathered, and only that group mixes the halves (``y = I M``; in ``y = I M^T`` the
    first group is the lowest level)."""
    k0, k1 = groups[0]
    return sel > 0 and not transpose and k1 - k0 == 1


def _fused_grad_pass(x, g, q, dx, dq, groups, sel, transpose, write_dx, key, cfg, dtype, chain, direct) -> None:
    """One ``_fused_grad_kernel`` pass for group ``groups[sel]`` (groups in acting order), then,
    with several row splits, the kernel adding their partials into dQ."""
    T, n = x.shape
    _, b, N = key
    k0, k1 = groups[sel]
    hp, blocks = next_pow2(b // 2), n // (b << (N - 1))
    splits, rows = _fused_splits(T, n, b, N, num_sms(x.device))
    meta = _dot_meta(dtype, max(hp << (g1 - g0) for g0, g1 in groups))
    common = dict(NL=N, B=q_block(b), HC=b // 2, HP=hp)  # q, dq: ``padded_q``'s layout
    width, z = hp << (k1 - k0), (1 << (N - k1)) << k0
    # the direct chain stores every row's own values: nothing to add; a group whose dQ sweep does
    # not fit next to the row pass's tiles (``sweeps_in_pass``) leaves it to the dq kernel
    reduce = (splits > 1 or not sweeps_in_pass(N, hp, k0, k1)) and not direct
    partial = new_empty(splits, blocks, z, width, width, dtype=torch.float32, device=x.device) if reduce else dq
    half = chain and not direct and chain_halves(groups, sel, transpose)
    wrap_triton(_fused_grad_kernel)[(splits, blocks * (2 if half else 1))](
        x, g, q, dx if write_dx else x, partial, dq, T, n, n // b, rows, blocks, **common, **group_bounds(groups),
        SEL=sel, S0=k0, S1=k1,
        TRANS=transpose, WRITE_DX=write_dx, FUSED_DQ=not reduce, RC=FUSED_RC, **meta, CHAIN=chain, DIRECT=direct,
        HALF=half, BW=cfg["num_warps"],
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 2),
        **register_cap(cfg.get("maxnreg") or fused_grad_registers(b)),
    )
    if reduce:
        zc = sweep_blocks(N, hp, k0, k1)
        wrap_triton(_fused_dq_kernel)[(blocks, z // zc)](
            partial, q, dq, n // b, splits, blocks, **common, S0=k0, S1=k1, BUILD_DTYPE=meta["BUILD_DTYPE"],
            BUILD_PRECISION=meta["BUILD_PRECISION"], ZC=zc, num_warps=FUSED_DQ_CONFIG["num_warps"],
            num_stages=FUSED_DQ_CONFIG["num_stages"], **register_cap(FUSED_DQ_CONFIG["maxnreg"]),
        )


# The kernel adding the one-pass backward's row-split partials and sweeping dQ out of them
# (``_fused_dq_kernel``): parameter-sized work, a program per coarse block, so its own config, not
# the row passes' tuned one. It holds a group's ``[Z, WP, WP]`` fp32 dMc and the factors of its
# sweep: at 4 warps 8x6 spilled 356-460 bytes on sm_90 and sm_80 (8 warps: 233-245 registers,
# none); 16 warps cap ptxas at 128 registers and spill more.
FUSED_DQ_CONFIG = {"num_warps": 8, "num_stages": 1, "maxnreg": MAX_REGISTERS}


# The chain passes of ``kernels/coarse.py`` (parameter-sized work, L rows): the config under which
# the accumulating passes (a middle group, up to 16K fp32 of dMc) spill nothing on sm_90 and sm_80
# under triton 3.7 at 40x3, 64x3, 36x3, 20x4 and 8x6 (3.6, the GPU image's: at most 16 bytes, at
# 36x3 and 8x6), once the first group's factor rows are gathered (``_chain_factor_rows``) and the
# offsets are int32. 4 warps, or 1 or 2 stages, spill 8-480 bytes on one of them or another. The
# direct passes spill nothing under any of these, given the register file: a chain pass runs a
# few programs (L rows each), never two to an SM, but ptxas, left to guess, capped 48x3's first
# direct pass at 128 registers and spilled 12 bytes (153 with the cap at MAX_REGISTERS, no spill).
CHAIN_CONFIG = {"num_warps": 8, "num_stages": 3, "maxnreg": MAX_REGISTERS}


@functools.lru_cache(maxsize=1024)
def chain_passes(n: int, b: int, N: int) -> tuple[str, ...] | None:
    """How ``fused_chain_dq`` takes each group of ``fused_groups`` (in that order): ``first`` /
    ``last`` (a one-level group acting first in ``y = I M`` / ``y = I M^T``: rows stored
    straight, no accumulator), ``acc`` (a middle or multi-level group: dMc accumulated, so it
    must fit CHAIN_ACC), or None where one does not."""
    groups = fused_groups(n, b, N)
    if groups is None:
        return None
    hp, modes = next_pow2(b // 2), []
    for sel, (k0, k1) in enumerate(groups):
        if k1 - k0 == 1 and sel in (0, len(groups) - 1):
            modes.append("first" if sel == 0 else "last")
        elif group_values(N, hp, k0, k1) <= CHAIN_ACC:
            modes.append("acc")
        else:
            return None
    return tuple(modes)


def fused_chain_dq(dmc: torch.Tensor, q: torch.Tensor, key) -> torch.Tensor:
    """dQ of every factor from the coarse blocks' ``dl/dMc`` ``[n/L, L, L]`` (``y = x M``'s Mc):
    the dQ passes of ``y = I M`` with ``dl/dy = dMc`` (identity rows made in registers), each
    group in the orientation ``chain_passes`` names (``y = I M^T`` with ``dMc^T`` has the same dQ).
    The operands are dMc's, bf16 (fp32's range) on a GPU, as _dot_meta's wide blocks."""
    n, b, N = key
    L = b << (N - 1)
    x = torch.empty(1, 1, dtype=torch.bfloat16, device=dmc.device).expand(L, n)  # never read
    groups = fused_groups(*key)
    q = padded_q(q, b)
    dq = new_empty(*q.shape, dtype=torch.float32, device=dmc.device)
    for sel, mode in enumerate(chain_passes(*key)):
        order, at = (groups[::-1], len(groups) - 1 - sel) if mode == "last" else (groups, sel)
        _fused_grad_pass(x, dmc, q, None, dq, order, at, mode == "last", False, key, CHAIN_CONFIG, torch.bfloat16,
                         chain=True, direct=mode != "acc")
    return unpadded_dq(dq, b)


def _several_levels_at_max(grp: dict) -> bool:
    """A group of several levels at MAX_BLOCK wide: its dQ sweep holds two 128 x 128 fp32 states."""
    return grp["k1"] - grp["k0"] > 1 and grp["WP"] >= MAX_BLOCK


def blockwise(grp: dict) -> bool:
    """Whether the block builds and ``_store_dq`` lay the group's factor tiles out from their Q
    blocks (``_residual_from_blocks``) rather than gather them: a group of several levels at
    MAX_BLOCK wide whose chunks fill it (power-of-two chunks, no packing), so that each factor's
    ``[Z, b, b]`` blocks are a reshape of the tile. (``_factor_tile``'s BLOCKWISE constexpr.)"""
    return _several_levels_at_max(grp) and grp["WB"] == grp["WP"] and grp["pack"] == 1


# The fewest levels of a padded group whose builds go through padded chunks (``padded_build``;
# ``_delta``'s PADDED constexpr spells it out).
PADDED_BUILD_LEVELS = 4


def padded_build(grp: dict) -> bool:
    """Whether the Delta builds (``_product_minus_eye``) of a group of PADDED_BUILD_LEVELS or more
    levels at MAX_BLOCK wide whose chunks leave padding (12x4, 12x5: 6-wide chunks, 96 of 128
    lanes) lay the factor tiles out from Q's blocks in chunks padded to a power of two, then
    compact Delta (``_delta``'s PADDED constexpr). Gathered, 12x4's builds spilled 4-12 bytes a
    thread (the forward) and 72-96 (the mixed-batch forward) at 255 registers. With fewer levels
    the gather is cheaper than the compaction's two products: 2-3 levels (40x2, 36x3, 20x4) took
    4-72 more registers padded, and 20x4's mixed-batch build spilled 12 bytes on sm_80."""
    return (_several_levels_at_max(grp) and grp["k1"] - grp["k0"] >= PADDED_BUILD_LEVELS
            and grp["WB"] != grp["WP"] and grp["pack"] == 1)


def fuses_dq(grp: dict, splits: int, capability: tuple[int, int] | None, dtype: torch.dtype | None = None) -> bool:
    """Whether a group's backward makes dQ in its row pass's programs (``_grad_kernel``'s
    FUSED_DQ, one row split) on a GPU of that compute capability (None: the interpreter, as
    Hopper), for x of that dtype (None: 16-bit). Not for a group of several levels at MAX_BLOCK
    wide, unless ``blockwise`` and Hopper: the sweep beside the held dMc spilled there (gathered
    factor tiles: 1.3-2.3 KB a thread at 24x3 and 12x4 on sm_90; blockwise, 92-176 bytes on
    sm_80, whose mma.sync holds both operands in registers; the compile report). Nor, on a GPU,
    for fp32 inputs' groups of several levels (tf32x3: three operand tiles a product; at 32 wide
    68-108 bytes on sm_80, some in the row loop, and on sm_90 4-24 bytes at one stage or two,
    whichever of 8x3 and 4x4); the interpreter, with no registers to spill, keeps their epilogue
    (its row-slab kernel runs about 10x slower there). Those write their one split's dMc as a
    partial, and ``_dq_rows_kernel`` makes dQ in row slabs, as for several splits."""
    fp32_levels = dtype == torch.float32 and grp["k1"] - grp["k0"] > 1
    if splits != 1 or (fp32_levels and capability is not None):
        return False
    return not _several_levels_at_max(grp) or (blockwise(grp) and not register_operand_mma(capability))


def partial_dq_bytes(grp: dict, capability: tuple[int, int] | None) -> int:
    """Bytes a group's one-split backward moves for dQ besides its row pass where it does not
    make dQ there (``fuses_dq``): its dMc written as a partial, then read by ``_dq_rows_kernel``,
    whose programs (a row slab of a level each) read their rows and, below the top level, the
    whole dMc (the byte model of ``coarse.moved_bytes``)."""
    if fuses_dq(grp, 1, capability):
        return 0
    levels, slabs = grp["k1"] - grp["k0"], triton.cdiv(grp["WB"], min(DQ_ROWS, grp["WP"]))
    return grp["NB"] * grp["WB"] ** 2 * 4 * (2 + (levels - 1) * slabs)


def dq_epilogue_stages(grp: dict, stages: int) -> int:
    """Pipeline stages of ``_grad_kernel`` when it makes dQ itself: one for a group of several
    levels at MAX_BLOCK wide (16x4's sweep spilled 12 bytes at two on sm_90; one split means a
    few row steps, so the prefetch buys little), else the backward's."""
    return 1 if _several_levels_at_max(grp) else stages


def grad(x, g, q, transpose, k0, key, need_dx):
    """``(dx or None, dQ of the group's levels)`` of ``y = x + x Delta`` (``Delta^T``) for
    contiguous x, g."""
    T, n = x.shape
    b = key[1]
    grp = group(*key, k0)
    dx = new_empty(T, n, dtype=x.dtype, device=x.device) if need_dx else None
    if T == 0:
        return dx, torch.zeros(q.shape, dtype=torch.float32, device=x.device)
    source, cfg = pick_config("bwd", *key, x.dtype, x.device)
    LAST_LAUNCH["butterfly_bwd"] = (source, dict(cfg))
    splits, rows = _splits(T, grp, b, num_sms(x.device))
    capability = device_capability(x.device)
    write_dx = need_dx and writes_dx(grp, capability)
    if need_dx and not write_dx:  # dx = g + g Delta^T: the forward kernel, the transpose flipped
        apply_into(g, q, not transpose, k0, key, dx)
    fused_dq = fuses_dq(grp, splits, capability, x.dtype)
    dq = new_empty(*q.shape, dtype=torch.float32, device=x.device)
    partial = dq if fused_dq else new_empty(splits, grp["NB"], grp["WB"], grp["WB"], dtype=torch.float32,
                                            device=x.device)
    layout, meta = _layout(grp, b), _dot_meta(x.dtype, grp["WP"])
    warps, stages = cfg["num_warps"], backward_stages(grp, capability, source, cfg.get("num_stages", 2))
    if fused_dq:
        stages = dq_epilogue_stages(grp, stages)
    wrap_triton(_grad_kernel)[(splits, grp["NB"])](
        x, g, q, dx if write_dx else x, partial, dq, T, n, n // b, rows, grp["NB"], **layout, H=grp["H"],
        TRANS=transpose, WRITE_DX=write_dx, FUSED_DQ=fused_dq, RC=row_step(grp, capability), **meta,
        num_warps=warps, num_stages=stages, **register_cap(grad_registers(grp, fused_dq)),
    )
    if not fused_dq:
        _launch_dq(partial, q, dq, splits, grp, layout, n // b, meta, warps)
    return dx, dq


# The row-slab dQ kernel of groups of several levels (``_dq_rows_kernel``): rows per program and
# warps, fixed (not the row loop's tuned config): 32 rows on 8 warps compile without spills on
# sm_90 and sm_80 at 2x6, 64x2, 32x3 and 16x4 (16 rows or 4 warps spill at some of them).
DQ_ROWS, DQ_ROWS_WARPS = 32, 8
# The dQ kernels (one level: ``_dq_kernel``; several: ``_dq_rows_kernel``) lift ptxas's register
# cap: parameter-sized work, so a second program per SM buys little, and left to guess ptxas
# capped fp32's 8x3 at 128 registers and spilled 4 bytes, and 44x3's one-level dQ at 40 (40 bytes).
DQ_REGISTERS = MAX_REGISTERS


def _launch_dq(partial, q, dq, splits, grp, layout, D, meta, warps) -> None:
    """dQ from the row splits' partial dMc: per block (one level: dQ is dMc), or for groups of
    several levels in row slabs, one level per program (``_dq_rows_kernel``)."""
    levels = grp["k1"] - grp["k0"]
    build = dict(BUILD_DTYPE=meta["BUILD_DTYPE"], BUILD_PRECISION=meta["BUILD_PRECISION"])
    if levels == 1:
        wrap_triton(_dq_kernel)[(grp["NB"],)](partial, q, dq, D, splits, grp["NB"], **layout, **build,
                                              num_warps=warps, num_stages=1, **register_cap(DQ_REGISTERS))
        return
    rs = min(DQ_ROWS, grp["WP"])
    wrap_triton(_dq_rows_kernel)[(grp["NB"], triton.cdiv(grp["WB"], rs), levels)](
        partial, q, dq, D, splits, grp["NB"], **layout, RS=rs, **build, num_warps=DQ_ROWS_WARPS, num_stages=1,
        **register_cap(DQ_REGISTERS),
    )


def segment_chunks(offsets: list[int], grp: dict, b: int, BT: int, pps: int, sms: int) -> list[int]:
    """``[row0, row1, adapter]`` per program row-chunk: every chunk lies inside one adapter's
    segment ``[offsets[k], offsets[k+1])``. A chunk has at least ``_rows_min`` rows (its Q read
    then costs at most about 1/16 of its rows' bytes) and, on large batches, about the rows that
    PPS programs per SM would each get."""
    T = offsets[-1]
    per = max(_rows_min(grp, b), triton.cdiv(T, max(1, triton.cdiv(pps * sms, grp["NB"]))))
    per = triton.cdiv(per, BT) * BT
    flat = []
    for k in range(len(offsets) - 1):
        for row0 in range(offsets[k], offsets[k + 1], per):
            flat += [row0, min(row0 + per, offsets[k + 1]), k]
    return flat


def _chunk_tensor(flat: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The chunk table on the device; memoised outside tracing (decoding asks for the same table
    every step and layer, and each fresh one is a host-to-device copy)."""
    if torch.compiler.is_compiling():
        return torch.tensor(flat, dtype=torch.int64, device=device)
    return _cached_chunk_tensor(flat, device)


@functools.lru_cache(maxsize=256)
def _cached_chunk_tensor(flat: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(flat, dtype=torch.int64, device=device)


def segmented_apply_into(x, q, offsets: list[int], k0: int, key, y) -> None:
    """``y = x + x Delta_k`` per block of the group starting at level k0, rows
    ``[offsets[k], offsets[k+1])`` with adapter k's Delta; q ``[K, levels, D, b, b]`` fp32."""
    T, n = x.shape
    b = key[1]
    grp = group(*key, k0)
    source, cfg = group_config(*key, x.dtype, x.device)
    LAST_LAUNCH["butterfly_segmented"] = (source, dict(cfg))
    BT = cfg["BT"]
    flat = segment_chunks(offsets, grp, b, BT, cfg["PPS"], num_sms(x.device))
    if not flat:
        return
    chunks = _chunk_tensor(tuple(flat), x.device)
    wrap_triton(_segmented_apply_kernel)[(len(flat) // 3, grp["NB"])](
        x, q, y, chunks, n, n // b, q[0].numel(), **_layout(grp, b), H=grp["H"], TRANS=False, BT=BT,
        **_dot_meta(x.dtype, grp["WP"]), num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3),
    )


# ---------------------------------------------------------------------------------------------
# ops and autograd


def _block_apply_fake(x, q, transpose, k0, n, b, N):
    return x.new_empty(x.shape)


def _block_grad_fake(x, g, q, transpose, k0, need_dx, n, b, N):
    return x.new_empty(x.shape), q.new_empty(q.shape, dtype=torch.float32)


@kernel_op("boft_triton::block_apply", _block_apply_fake)
def block_apply(x: torch.Tensor, q: torch.Tensor, transpose: bool, k0: int, n: int, b: int, N: int) -> torch.Tensor:
    """``x + x Delta`` on each block of columns of the group of factors starting at level k0
    (``Delta^T`` with transpose); x ``[T, n]``, q that group's levels of Q (fp32). (n, b, N) name
    the layer shape: the block layout and the tuning-cache key."""
    x = x.contiguous()
    y = new_empty(*x.shape, dtype=x.dtype, device=x.device)
    apply_into(x, q.contiguous(), transpose, k0, (n, b, N), y)
    return y


@kernel_op("boft_triton::block_grad", _block_grad_fake)
def block_grad(x: torch.Tensor, g: torch.Tensor, q: torch.Tensor, transpose: bool, k0: int, need_dx: bool, n: int,
               b: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dl/dx, dl/dq)`` of ``block_apply``; dl/dx is unwritten when not need_dx."""
    dx, dq = grad(x.contiguous(), g.contiguous(), q.contiguous(), transpose, k0, (n, b, N), need_dx)
    return (dx if dx is not None else torch.empty_like(x)), dq


def _setup_context(ctx, inputs, output):
    x, q, transpose, k0, n, b, N = inputs
    ctx.save_for_backward(x, q)
    ctx.args = (transpose, k0, n, b, N)


def _backward(ctx, g):
    """``y = x Mc``: ``dl/dx = g Mc^T``, ``dl/dMc = x^T g`` (with transpose, ``y = x Mc^T``:
    ``dl/dx = g Mc``, ``dl/dMc = g^T x``), then ``dl/dq`` through the block products, per block."""
    x, q = ctx.saved_tensors
    transpose, k0, n, b, N = ctx.args
    none = (None,) * 5
    if g is None:
        return None, None, *none
    if not ctx.needs_input_grad[1]:  # Q frozen: dl/dx alone is the transposed product
        return block_apply(g, q, not transpose, k0, n, b, N), None, *none
    need_dx = ctx.needs_input_grad[0]
    dx, dq = block_grad(x, g, q, transpose, k0, need_dx, n, b, N)
    return (dx if need_dx else None), dq, *none


block_apply.register_autograd(_backward, setup_context=_setup_context)


def _fused_apply_fake(x, q, transpose, n, b, N):
    return x.new_empty(x.shape)


@kernel_op("boft_triton::fused_apply", _fused_apply_fake)
def fused_apply(x: torch.Tensor, q: torch.Tensor, transpose: bool, n: int, b: int, N: int) -> torch.Tensor:
    """``x M`` (``x M^T`` with transpose) in one pass over x, for shapes with ``fused_groups``;
    x ``[T, n]``, q the N levels of Q the key names (all of it, or ``split_prefix``'s; fp32)."""
    x = x.contiguous()
    y = new_empty(*x.shape, dtype=x.dtype, device=x.device)
    fused_apply_into(x, q.contiguous(), transpose, (n, b, N), y)
    return y


def _fused_setup_context(ctx, inputs, output):
    x, q, transpose, n, b, N = inputs
    ctx.save_for_backward(x, q)
    ctx.args = (transpose, n, b, N)


def _fused_grad_fake(x, g, q, transpose, need_dx, n, b, N):
    return x.new_empty(x.shape), q.new_empty(q.shape, dtype=torch.float32)


@kernel_op("boft_triton::fused_grad", _fused_grad_fake)
def fused_grad_op(x: torch.Tensor, g: torch.Tensor, q: torch.Tensor, transpose: bool, need_dx: bool, n: int, b: int,
                  N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dl/dx, dl/dq)`` of ``fused_apply``; dl/dx is unwritten when not need_dx."""
    dx, dq = fused_grad(x.contiguous(), g.contiguous(), q.contiguous(), transpose, (n, b, N), need_dx)
    return (dx if dx is not None else torch.empty_like(x)), dq


def _fused_backward(ctx, g):
    """dl/dx alone (Q frozen) is the transposed product, one pass. With dl/dQ, one pass over
    (x, g) per factor group (``fused_grad``): only x is saved, each pass recomputes what its group
    needs, so the forward keeps no intermediate."""
    x, q = ctx.saved_tensors
    transpose, n, b, N = ctx.args
    none = (None,) * 4
    if g is None:
        return None, None, *none
    if not ctx.needs_input_grad[1]:
        return fused_apply(g, q, not transpose, n, b, N), None, *none
    need_dx = ctx.needs_input_grad[0]
    if _coarse().route(n, b, N, x.shape[0], x.dtype, need_dx, x.device) == "coarse":  # 3 activation passes
        dx, dq = _coarse().coarse_grad(x, g, q, transpose, need_dx, n, b, N)
        return (dx if need_dx else None), dq, *none
    if fused_backward(n, b, N):
        dx, dq = fused_grad_op(x, g, q, transpose, need_dx, n, b, N)
        return (dx if need_dx else None), dq, *none
    # dMc too large to hold: recompute each of plan()'s group inputs from x, then block_grad group
    # by group, last first, as _backward does
    groups = plan(n, b, N)
    if transpose:
        groups = groups[::-1]
    inputs = [x]
    for grp in groups[:-1]:
        inputs.append(block_apply(inputs[-1], q[grp["k0"]:grp["k1"]], transpose, grp["k0"], n, b, N))
    dq = torch.empty_like(q)
    h = g
    for k, grp in reversed(list(enumerate(groups))):
        h, dq[grp["k0"]:grp["k1"]] = block_grad(inputs[k], h, q[grp["k0"]:grp["k1"]], transpose, grp["k0"],
                                                k > 0 or need_dx, n, b, N)
    return (h if need_dx else None), dq, *none


fused_apply.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def butterfly(x: torch.Tensor, Q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x M`` (``x M^T``) over x's last dim; same contract as ``torch_ops.butterfly``."""
    shape, n = x.shape, x.shape[-1]
    N, D, b, _ = Q.shape
    if _wide().takes_levels(n, b, N, x.dtype):  # fp32 wider than its block kernels hold: level by level
        h, qs = x.reshape(-1, n), _levels_of(Q.float(), [(k, k + 1) for k in range(N)])
        for k in (range(N) if transpose else reversed(range(N))):
            h = _wide().wide_apply(h, qs[k], transpose, k, n, b, N)
        return h.reshape(shape)
    if fused_groups(n, b, N) is not None:
        return fused_apply(x.reshape(-1, n), Q.float(), transpose, n, b, N).reshape(shape)
    Q, h = Q.float(), x.reshape(-1, n)
    prefix = split_prefix(n, b, N)
    # (levels, apply) in the order they act on x M: the high groups a pass each, then the low
    # levels' one-pass prefix; x M^T = x M_lo^T ... M_hi^T runs them in reverse
    if prefix is not None:
        steps = [(g["k0"], g["k1"], block_apply) for g in high_groups(n, b, N)] + [(0, prefix, None)]
    else:
        steps = [(g["k0"], g["k1"], _wide().wide_apply if _wide().is_wide(g) else block_apply)
                 for g in plan(n, b, N)]
    qs = _levels_of(Q, [(k0, k1) for k0, k1, _ in steps])
    for k0, k1, apply in (steps[::-1] if transpose else steps):
        if apply is None:
            h = fused_apply(h, qs[k0], transpose, n, b, k1)
        else:
            h = apply(h, qs[k0], transpose, k0, n, b, N)
    return h.reshape(shape)


def _levels_of(Q: torch.Tensor, bounds: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Q's levels ``[k0, k1)`` per group, keyed by k0: Q itself for one group, else one split
    (whose backward is one cat of the groups' dQ, where slicing would zero-fill a Q-sized
    gradient per group and add them up)."""
    if len(bounds) == 1:
        return {bounds[0][0]: Q}
    bounds = sorted(bounds)
    return dict(zip((k0 for k0, _ in bounds), Q.split([k1 - k0 for k0, k1 in bounds])))


def _wide():
    """``kernels.wide`` (levels wider than MAX_BLOCK), imported on first use: it builds on this
    module."""
    from . import wide

    return wide


def _coarse():
    """``kernels.coarse`` (the backward through dense coarse blocks), imported on first use."""
    from . import coarse

    return coarse


def _segmented_block_apply_fake(x, q, offsets, k0, n, b, N):
    return x.new_empty(x.shape)


@kernel_op("boft_triton::segmented_block_apply", _segmented_block_apply_fake)
def segmented_block_apply(x: torch.Tensor, q: torch.Tensor, offsets: list[int], k0: int, n: int, b: int,
                          N: int) -> torch.Tensor:
    """``block_apply`` for a mixed-adapter batch: x's rows sorted by adapter, segment k =
    ``[offsets[k], offsets[k+1])`` rotated by adapter k (q ``[K, levels, D, b, b]``). Forward only."""
    x = x.contiguous()
    y = new_empty(*x.shape, dtype=x.dtype, device=x.device)
    segmented_apply_into(x, q.contiguous(), list(offsets), k0, (n, b, N), y)
    return y


def segmented_butterfly(x: torch.Tensor, Q: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """``x[rows of segment k] M_k`` for every segment in one launch per factor group (Punica /
    S-LoRA style): x ``[T, n]`` with rows grouped by adapter, Q ``[K, N, D, b, b]`` (adapter k's
    blocks), ``offsets`` the K + 1 segment bounds (``offsets[-1] == T``). Inference only: no
    gradient."""
    n = x.shape[-1]
    _, N, D, b, _ = Q.shape
    if len(offsets) != Q.shape[0] + 1 or offsets[0] != 0 or offsets[-1] != x.shape[0]:
        raise ValueError(f"segmented_butterfly: {len(offsets)} offsets ending at {offsets[-1] if offsets else None} "
                         f"for {Q.shape[0]} adapters and {x.shape[0]} rows; want K + 1 bounds from 0 to the row count")
    levels = _wide().takes_levels(n, b, N, x.dtype)
    groups = tuple(_wide().level_group(n, b, N, k) for k in reversed(range(N))) if levels else plan(n, b, N)
    Q = Q.float()
    h = x
    for grp in groups:
        q = Q if len(groups) == 1 else Q[:, grp["k0"]:grp["k1"]]
        if levels or _wide().is_wide(grp):  # a slab kernel (fp32 level by level, or wider than MAX_BLOCK), per segment
            h = torch.cat([_wide().wide_apply(h[offsets[k]:offsets[k + 1]], q[k], False, grp["k0"], n, b, N)
                           for k in range(len(offsets) - 1)])
        else:
            h = segmented_block_apply(h, q, list(offsets), grp["k0"], n, b, N)
    return h


def block_products(grp: dict) -> tuple[int, int]:
    """``WP x WP x WP`` products a program spends on its block: building Delta (forward, and the
    backward's dx) and dQ from dMc (``_store_dq``'s sweep: ``m (m - 1) / 2`` products for the
    lower levels' factors plus ``m - 1`` updates of the running upper product, m levels)."""
    levels = grp["k1"] - grp["k0"]
    return levels - 1, levels * (levels - 1) // 2 + levels - 1


# ---------------------------------------------------------------------------------------------
# what a launch compiles (for the compile report: bench/kernel_profile.py)


def launch_specs(n: int, b: int, N: int, dtype_name: str = "bf16") -> list[dict]:
    """Every kernel the launchers run for this layer shape, at the default config, as
    (kernel, signature, constexprs, options): apply (forward), apply_T (``dx`` when Q is frozen,
    and merges), grad (the fused backward, several row splits), grad_dq (one split: dQ in the same
    program, where ``fuses_dq``), segmented (mixed-adapter batches) and dq (adds the splits' partials, then dQ); the
    one-pass ``fused*`` kernels where ``fused_groups`` holds (``fused_dq[k]``: adding group k's
    row-split partials, then its dQ), with ``coarse*`` where the backward can run through dense
    coarse blocks; the slab kernels ``wide*`` for levels wider than
    MAX_BLOCK and, per level, for fp32 beyond MAX_FP32_BLOCK.
    Pointers are 16-byte aligned and n, ROWS divisible by 16 at launch, as the compile report
    assumes."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if _wide().fp32_too_wide(n, b, N, dtype):  # wide.takes_levels on a GPU
        return [spec for k in range(N)
                for spec in _wide().launch_specs(_wide().level_group(n, b, N, k), b, dtype, f"[l{k}]" if N > 1 else "", N)]
    ptr = "*" + dtype_name
    fwd, bwd = default_config(n, b, N, "fwd", dtype), default_config(n, b, N, "bwd", dtype)
    specs = []
    fused = fused_groups(n, b, N)
    if fused is not None:  # the one-pass forward (and dx with Q frozen), then plan()'s backward kernels
        hp = next_pow2(b // 2)
        width = max(hp << (k1 - k0) for k0, k1 in fused)
        with _compiling():
            dot = _dot_meta(dtype, width)
        fused_fwd_stages, grad_cap = fused_stages(b, "default", fwd["num_stages"]), fused_grad_registers(b)
        for name, trans in (("fused", False), ("fused_T", True)):
            groups = fused[::-1] if trans else fused
            specs.append(dict(name=name, width=width, levels=N, fn=_fused_apply_kernel,
                              signature={"x_ptr": ptr, "q_ptr": "*fp32", "y_ptr": ptr, "T": "i32", "n": "i32",
                                         "D": "i32"}, divisible=("n",),
                              constexprs={"NL": N, "B": q_block(b), "HC": b // 2, "HP": hp, **group_bounds(groups),
                                          "TRANS": trans, "BT": fwd["BT"], **dot, "BW": fwd["num_warps"]},
                              config={**fwd, "num_stages": fused_fwd_stages}, num_warps=fwd["num_warps"],
                              num_stages=fused_fwd_stages,
                              options=fused_options(n, b, N)))
        gsig = {"x_ptr": ptr, "g_ptr": ptr, "q_ptr": "*fp32", "dx_ptr": ptr, "dd_ptr": "*fp32", "dq_ptr": "*fp32",
                "T": "i32", "n": "i32", "D": "i32", "ROWS": "i32", "NCB": "i32"}
        for sel, (k0, k1) in enumerate(fused if fused_backward(n, b, N) else ()):  # a pass per group
            for tag, fused_dq in (("", False), ("_dq", True))[:1 + sweeps_in_pass(N, hp, k0, k1)]:
                specs.append(dict(name=f"fused_grad{tag}[{sel}]", width=hp << (k1 - k0), levels=k1 - k0,
                                  fn=_fused_grad_kernel, signature=gsig, divisible=("n", "ROWS"),
                                  constexprs={"NL": N, "B": q_block(b), "HC": b // 2, "HP": hp,
                                              **group_bounds(fused),
                                              "SEL": sel, "S0": k0, "S1": k1, "TRANS": False, "WRITE_DX": sel == 0,
                                              "FUSED_DQ": fused_dq, "RC": FUSED_RC, **dot, "CHAIN": False,
                                              "DIRECT": False, "HALF": False, "BW": bwd["num_warps"]},
                                  config=bwd, num_warps=bwd["num_warps"], num_stages=bwd["num_stages"],
                                  options={"maxnreg": grad_cap} if grad_cap else {}))
        if fused_backward(n, b, N) or _coarse().supported(n, b, N, dtype):  # the row splits' sums, dQ
            dsig = {"dd_ptr": "*fp32", "q_ptr": "*fp32", "dq_ptr": "*fp32", "D": "i32", "SPLITS": "i32", "NCB": "i32"}
            for sel, (k0, k1) in enumerate(fused):
                specs.append(dict(name=f"fused_dq[{sel}]", width=hp << (k1 - k0), levels=k1 - k0, fn=_fused_dq_kernel,
                                  signature=dsig, divisible=(),
                                  constexprs={"NL": N, "B": q_block(b), "HC": b // 2, "HP": hp, "S0": k0, "S1": k1,
                                              "BUILD_DTYPE": dot["BUILD_DTYPE"],
                                              "BUILD_PRECISION": dot["BUILD_PRECISION"],
                                              "ZC": sweep_blocks(N, hp, k0, k1)},
                                  config=FUSED_DQ_CONFIG, num_warps=FUSED_DQ_CONFIG["num_warps"],
                                  num_stages=FUSED_DQ_CONFIG["num_stages"],
                                  options={"maxnreg": FUSED_DQ_CONFIG["maxnreg"]}))
        if _coarse().supported(n, b, N, dtype):  # the backward through dense coarse blocks
            specs += _coarse().launch_specs(n, b, N, dtype, gsig)
    # what still runs per plan() group: everything, but for one-pass shapes only the segmented
    # forward (and, where the backward is not one pass, apply for the recompute and the grads)
    if fused is None:
        kept = None
    elif fused_backward(n, b, N):
        kept = ("segmented",)
    else:
        kept = ("apply[", "grad", "dq", "segmented")
    prefix = split_prefix(n, b, N)
    if prefix is not None:  # the one-pass prefix's kernels (its mixed-batch forward is plan()'s)
        specs += [dict(spec, name=spec["name"] + "[prefix]") for spec in launch_specs(n, b, prefix, dtype_name)
                  if not spec["name"].startswith("segmented")]
    gfwd = group_default_config(n, b, N)  # plan()'s group kernels' tiles (``group_config``)
    for k, grp in enumerate(plan(n, b, N)):
        with _compiling():
            dot = _dot_meta(dtype, grp["WP"])
        tag = f"[g{k}]" if len(plan(n, b, N)) > 1 else ""
        if _wide().is_wide(grp):
            specs += _wide().launch_specs(grp, b, dtype, tag, N)
            continue
        layout = _layout(grp, b)
        shape = dict(width=grp["WP"], levels=grp["k1"] - grp["k0"])
        sig = {"x_ptr": ptr, "q_ptr": "*fp32", "y_ptr": ptr, "T": "i32", "n": "i32", "D": "i32"}
        for name, trans in (("apply", False), ("apply_T", True)):
            specs.append(dict(name=name + tag, **shape, fn=_apply_kernel, signature=sig, divisible=("n",),
                              constexprs={**layout, "H": grp["H"], **dot, "TRANS": trans, "BT": gfwd["BT"]},
                              config=gfwd, num_warps=gfwd["num_warps"], num_stages=gfwd["num_stages"]))
        gsig = {"x_ptr": ptr, "g_ptr": ptr, "q_ptr": "*fp32", "dx_ptr": ptr, "dd_ptr": "*fp32", "dq_ptr": "*fp32",
                "T": "i32", "n": "i32", "D": "i32", "ROWS": "i32", "NB": "i32"}
        for name, fused in (("grad", False), ("grad_dq", True)):
            if fused and not fuses_dq(grp, 1, (9, 0), dtype):
                continue  # the one split writes a partial, as several do
            archs = {} if not fused or fuses_dq(grp, 1, (8, 0), dtype) else {"archs": (90,)}  # sm_80: a partial
            stages = dq_epilogue_stages(grp, bwd["num_stages"]) if fused else bwd["num_stages"]
            cap = grad_registers(grp, fused)
            specs.append(dict(name=name + tag, **shape, fn=_grad_kernel, signature=gsig, divisible=("n", "ROWS"),
                              **({"options": {"maxnreg": cap}} if cap else {}),
                              constexprs={**layout, "H": grp["H"], **dot, "TRANS": False, "WRITE_DX": True,
                                          "FUSED_DQ": fused, "RC": row_step(grp, None)},
                              arch_constexprs={80: {"RC": row_step(grp, (8, 0)), "WRITE_DX": writes_dx(grp, (8, 0))}},
                              arch_options={80: {"num_stages": backward_stages(grp, (8, 0), "default",
                                                                               bwd["num_stages"])}},
                              config={**bwd, "num_stages": stages}, num_warps=bwd["num_warps"], num_stages=stages,
                              **archs))
        ssig = {"x_ptr": ptr, "q_ptr": "*fp32", "y_ptr": ptr, "chunk_ptr": "*i64", "n": "i32", "D": "i32",
                "Q_STRIDE": "i32"}
        specs.append(dict(name="segmented" + tag, **shape, fn=_segmented_apply_kernel, signature=ssig, divisible=("n",),
                          constexprs={**layout, "H": grp["H"], **dot, "TRANS": False, "BT": gfwd["BT"]},
                          config=gfwd, num_warps=gfwd["num_warps"], num_stages=gfwd["num_stages"]))
        dsig = {"dd_ptr": "*fp32", "q_ptr": "*fp32", "dq_ptr": "*fp32", "D": "i32", "SPLITS": "i32", "NB": "i32"}
        build = {"BUILD_DTYPE": dot["BUILD_DTYPE"], "BUILD_PRECISION": dot["BUILD_PRECISION"]}
        if shape["levels"] == 1:
            specs.append(dict(name="dq" + tag, **shape, fn=_dq_kernel, signature=dsig, divisible=(),
                              constexprs={**layout, **build}, config=bwd, num_warps=bwd["num_warps"], num_stages=1,
                              options={"maxnreg": DQ_REGISTERS}))
        else:
            specs.append(dict(name="dq" + tag, **shape, fn=_dq_rows_kernel, signature=dsig, divisible=(),
                              constexprs={**layout, **build, "RS": min(DQ_ROWS, grp["WP"])},
                              config={"num_warps": DQ_ROWS_WARPS}, num_warps=DQ_ROWS_WARPS, num_stages=1,
                              options={"maxnreg": DQ_REGISTERS}))
    if kept is not None:
        specs = [sp for sp in specs if sp["name"].startswith(("fused", "coarse") + kept)]
    if prefix is not None:  # the prefix's levels run plan()'s kernels only in the mixed-batch forward
        low = tuple(f"[g{k}]" for k, grp in enumerate(plan(n, b, N)) if grp["k0"] < prefix)
        specs = [sp for sp in specs if sp["name"].startswith("segmented") or not sp["name"].endswith(low)]
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
