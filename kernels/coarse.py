"""The backward of a multi-level butterfly through its dense coarse blocks (no pass per group).

``M = B_{N-1} ... B_0`` is block-diagonal with dense ``L x L`` coarse blocks ``Mc`` (``L = b
2^(N-1)``). The one-pass backward (``butterfly.fused_grad``) reads (x, g) once per factor group
because each group's ``dMc`` fills a program's registers. With ``L`` just past ``MAX_BLOCK``
(DreamBooth's 40x3 and ControlNet's 80x2 on 1280-wide layers: L = 160) fewer passes over the
activations are cheaper than that:

1. ``dl/dMc = x^T g`` (``g^T x``) per coarse block: the dMc pass of a single level ``L`` wide
   (``wide.grad_q``), accumulated in fp32 and written once as ``[n/L, L, L]`` bf16. Up to 192 wide
   the whole block's dMc is four tiles in one program (``wide.takes_pair``), so x and g are read
   once. Up to 192 wide (160 before Hopper) that program also writes ``dx = g + g Delta_c`` on the
   same rows, with ``Delta_c = Mc^T - I`` (``Mc - I`` with transpose) held as four tiles too: g is
   read once for both gradients. At 193-256 two programs hold half the block's dMc each
   (``wide.takes_halves``: g read twice, x once) and write dx's half, Delta_c's two tiles of it
   held. ``Delta_c`` is built first (``_coarse_delta_kernel``, parameter-sized: the one-pass
   forward on the identity's L rows) and stored in x's dtype. Wider (up to ``MAX_L``: the held
   tiles would spill), dx takes the one-pass forward with the transpose flipped, a pass of its
   own over g.
2. dQ from dMc by the chain rule, ``dF_k = (F_{N-1}..F_{k+1})^T dMc (F_{k-1}..F_0)^T`` on F_k's
   values: the butterfly's own dQ pass on ``y = I M`` with ``dl/dy = dMc`` (``fused_chain_dq``: the
   identity rows are made in registers, dMc is read once per factor group; a one-level group
   acting first, in ``I M`` or ``I M^T``, needs no accumulator: ``butterfly.chain_passes``). This
   is parameter-sized work, ``n L`` values a pass, whatever the row count.

Activations move 3 times (4 at 193-256; wider, 3 plus dMc's row slabs; the per-group backward: ``2 G + 1``), parameter-sized
tensors ``G + 1`` times (``G + 3`` with Delta_c), so the route pays from about L rows on: ``takes``
picks whichever moves fewer bytes, unless ``boft-triton tune`` timed both routes for the shape
(``route``). Row splits and split-ordered sums are the dMc and dQ passes' own, so dQ is
deterministic.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from . import butterfly as kb
from . import wide as kw
from ._common import LAST_LAUNCH, capability, kernel_op, new_empty, next_pow2, register_cap, tl, triton

# The widest coarse block this route takes: its dMc pass holds whole row steps of the block (the
# slab kernels' held dMc slabs, ``wide.HELD_BWD``); wider, the per-group backward is cheaper.
MAX_L = kw.HELD_BWD


def width(b: int, N: int) -> int:
    """L, the coarse block of an (n, b, N) butterfly."""
    return b << (N - 1)


def supported(n: int, b: int, N: int, dtype: torch.dtype) -> bool:
    """Whether the shape can take this route: 16-bit inputs (dMc is rounded to bf16, as the
    16-bit backward's own block products are; fp32 keeps its fp32-exact paths), the one-pass
    forward and chain passes (``butterfly.chain_passes``), and a coarse block past what one block
    kernel covers that the dMc pass holds."""
    L = width(b, N)
    return (dtype in (torch.bfloat16, torch.float16) and N >= 2 and kb.MAX_BLOCK < L <= MAX_L
            and kb.chain_passes(n, b, N) is not None)


def moved_bytes(n: int, b: int, N: int, T: int, dtype: torch.dtype, need_dx: bool,
                cap: tuple[int, int] | None = None) -> tuple[int, int]:
    """(per-group backward, this route): bytes of activations, and of dMc for this route, each
    moves on a GPU of compute capability cap (None: the interpreter, as Hopper); the parameters'
    own reads and writes (about the same in both) left out."""
    es, L = dtype.itemsize, width(b, N)
    act = T * n * es
    groups = len(kb.fused_groups(n, b, N))
    if kb.fused_backward(n, b, N):  # a pass over (x, g) per group, the first writing dx
        per_group = (2 * groups + need_dx) * act
    else:  # plan()'s groups: recompute their inputs, then a pass over (input, gradient) each
        levels = len(kb.plan(n, b, N))
        per_group = (2 * (levels - 1) + 3 * levels - (not need_dx)) * act
        # and g read again for dx by groups whose dMc pass cannot write it (``butterfly.writes_dx``)
        per_group += need_dx * sum(not kb.writes_dx(grp, cap) for grp in kb.plan(n, b, N)) * act
        # and dMc through the row-slab dQ kernel where a group's row pass does not make dQ (40x3's
        # 80-wide two-level group: 6 activation passes' worth at 128 rows, which took this route)
        per_group += sum(kb.partial_dq_bytes(grp, cap) for grp in kb.plan(n, b, N))
    dmc = n * L * 2  # bf16 (Delta_c: x's dtype, the same size)
    # one pass: x and g read once, dx written; Delta_c written, and read by every row split's
    # programs (counted once, as dMc's fp32 partials are left out: L2-sized, n L values a split)
    # g's reads by the dMc pass: once where it holds the whole dMc (four tiles, up to 192 wide),
    # twice at 193-256 (two halves), once per row slab wider
    g_reads = 1 if kw.takes_pair(L, dtype) else 2 if kw.takes_halves(L, dtype) else kw.slab("bwd", L, dtype)[2]
    if fuses_dx(L, dtype, cap):
        coarse = (1 + g_reads + need_dx) * act + (1 + groups + 2 * need_dx) * dmc
    else:
        coarse = (2 * need_dx + 1 + g_reads) * act + (1 + groups) * dmc
    return per_group, coarse


def fuses_dx(L: int, dtype: torch.dtype, cap: tuple[int, int] | None = None) -> bool:
    """Whether the dMc pass also writes dx (step 1 of the module docstring) on a GPU of compute
    capability cap: the whole-block dMc kernel up to 192 wide (160 before Hopper), the two-half
    one at 193-256 (``wide.writes_dx``)."""
    return kw.writes_dx(L, dtype, cap)


def takes(n: int, b: int, N: int, T: int, dtype: torch.dtype, need_dx: bool,
          cap: tuple[int, int] | None = None) -> bool:
    """Whether the byte model sends the backward of ``T`` rows through the dense coarse blocks on a
    GPU of compute capability cap: supported, and fewer bytes moved than the per-group passes."""
    if not supported(n, b, N, dtype):
        return False
    per_group, coarse = moved_bytes(n, b, N, T, dtype, need_dx, cap)
    return coarse < per_group


# The backward routes ``boft-triton tune`` times for a supported shape (``butterfly.candidates``).
ROUTES = ("coarse", "groups")


def route(n: int, b: int, N: int, T: int, dtype: torch.dtype, need_dx: bool, device: torch.device) -> str:
    """``coarse`` or ``groups``: the tuned backward's route where the tuning cache has one for
    this shape (or tuning forces one), else the byte model's (``takes``)."""
    if not supported(n, b, N, dtype):
        return "groups"
    source, cfg = kb.pick_config("bwd", n, b, N, dtype, device)
    if source != "default" and cfg.get("route") in ROUTES:
        LAST_LAUNCH["butterfly_bwd_route"] = (source, cfg["route"])
        return cfg["route"]
    chosen = "coarse" if takes(n, b, N, T, dtype, need_dx, capability(device)) else "groups"
    LAST_LAUNCH["butterfly_bwd_route"] = ("model", chosen)
    return chosen


@triton.jit
def _coarse_delta_kernel(
    q_ptr, d_ptr, D,
    NL: tl.constexpr, B: tl.constexpr, HC: tl.constexpr, HP: tl.constexpr, NG: tl.constexpr,
    A0: tl.constexpr, A1: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, TRANS: tl.constexpr,
    BT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BUILD_DTYPE: tl.constexpr,
    BUILD_PRECISION: tl.constexpr,
):
    """``Delta_c = Mc - I`` (``Mc^T - I`` with TRANS) of coarse block i_cb, ``[L, L]`` at d_ptr
    in its dtype: ``butterfly._fused_apply_kernel`` on the identity's rows, in BT-row tiles, the
    groups held once (a one-level first group's rows gathered from Q instead: they are its
    factor's rows). As there, each group adds ``t Delta_g`` to the fp32 tile t with t rounded to
    the dot's dtype, which costs Delta_c about one rounding of ``Delta_g`` (``2^-8 |Delta_g|`` in
    bf16), the order of its own rounding when stored; in residual form (``R + I Delta_g + R
    Delta_g``, only R rounded) it would cost less, but its second product per group spilled
    0.9-1.1 KB a thread at 80x2 and 72x2 on sm_90 and sm_80."""
    i_cb = tl.program_id(0).to(tl.int64)
    L: tl.constexpr = (1 << NL) * HC
    LP: tl.constexpr = (1 << NL) * HP
    o_c = tl.arange(0, LP)
    m_c = (o_c % HP) < HC
    o_lc = (o_c // HP) * HC + o_c % HP  # [LP] the lane's column in the coarse block
    # the identity's rows through a one-level first group are rows of its factor: gathered from Q
    # (as the chain passes' GATHER_A), so that group's blocks are not held (held, 118x2-128x2
    # spilled 8-20 bytes on sm_90 and sm_80)
    GATHER_A: tl.constexpr = A1 - A0 == 1
    if not GATHER_A:
        b_da = kb._fused_delta(q_ptr, i_cb, D, A0, A1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE, BUILD_PRECISION)
    b_db = kb._fused_delta(q_ptr, i_cb, D, B0, B1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE, BUILD_PRECISION)
    if NG > 2:
        b_dc = kb._fused_delta(q_ptr, i_cb, D, C0, C1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE,
                               BUILD_PRECISION)
    if NG > 3:
        b_dd = kb._fused_delta(q_ptr, i_cb, D, D0, D1, NL, B, HC, HP, TRANS, DOT_DTYPE, BUILD_DTYPE,
                               BUILD_PRECISION)
    for t0 in range(0, L, BT):
        o_t = t0 + tl.arange(0, BT)
        m_x = (o_t < L)[:, None] & m_c[None, :]
        if GATHER_A:
            b_t = kb._chain_factor_rows(q_ptr, o_t, o_lc, m_x, i_cb.to(tl.int32), D, A0, NL, B, HC, TRANS)
        else:
            eye = tl.where((o_lc[None, :] == o_t[:, None]) & m_x, 1.0, 0.0)
            b_t = kb._fused_group(eye, b_da, BT, A0, A1, NL, HP, DOT_DTYPE, PRECISION)
        b_t = kb._fused_group(b_t, b_db, BT, B0, B1, NL, HP, DOT_DTYPE, PRECISION)
        if NG > 2:
            b_t = kb._fused_group(b_t, b_dc, BT, C0, C1, NL, HP, DOT_DTYPE, PRECISION)
        if NG > 3:
            b_t = kb._fused_group(b_t, b_dd, BT, D0, D1, NL, HP, DOT_DTYPE, PRECISION)
        # the identity subtracted where its lanes are, not held as a tile through the groups (8-32
        # bytes spilled at 116x2-128x2)
        b_t = tl.where(o_lc[None, :] == o_t[:, None], b_t - 1.0, b_t)
        tl.store(d_ptr + i_cb * (L * L) + o_t[:, None] * L + o_lc[None, :], b_t.to(d_ptr.dtype.element_ty), mask=m_x)


# Rows per tile of the Delta_c build: parameter-sized work, one program per coarse block, so
# ptxas's register cap is lifted (left to guess, it capped 64x3's build at 128 registers on sm_80
# and spilled 12 bytes).
DELTA_BT = 16
DELTA_REGISTERS = kb.MAX_REGISTERS


def _delta_launch(n: int, b: int, N: int, transpose: bool, dtype: torch.dtype) -> dict:
    """The build's constexprs and launch options (groups in acting order, as
    ``butterfly.fused_apply_into``; the forward's default warps and stages)."""
    groups = kb.fused_groups(n, b, N)
    if transpose:
        groups = groups[::-1]
    hp = next_pow2(b // 2)
    fwd = kb.default_config(n, b, N, "fwd", dtype)
    return dict(NL=N, B=kb.q_block(b), HC=b // 2, HP=hp, **kb.group_bounds(groups), TRANS=transpose,
                BT=DELTA_BT, **kb._dot_meta(dtype, max(hp << (k1 - k0) for k0, k1 in groups)),
                num_warps=fwd["num_warps"], num_stages=fwd["num_stages"])


def coarse_delta(q, transpose, key, dtype) -> torch.Tensor:
    """``Delta_c`` of every coarse block, ``[n/L, L, L]`` in dtype: ``Mc - I`` (``Mc^T - I``
    with transpose), so that ``x M`` on a coarse block is ``x + x Delta_c``."""
    n, b, N = key
    L = width(b, N)
    delta = new_empty(n // L, L, L, dtype=dtype, device=q.device)
    wrap_triton(_coarse_delta_kernel)[(n // L,)](kb.padded_q(q, b), delta, n // b,
                                                 **_delta_launch(n, b, N, transpose, dtype),
                                                 **register_cap(DELTA_REGISTERS))
    return delta


def grad(x, g, q, transpose, key, need_dx):
    """``(dx or None, dQ)`` of ``y = x M`` (``x M^T``): the passes of the module docstring."""
    T, n = x.shape
    _, b, N = key
    L = width(b, N)
    dx = new_empty(T, n, dtype=x.dtype, device=x.device) if need_dx else None
    fused = need_dx and fuses_dx(L, x.dtype, capability(x.device))
    if need_dx and not fused:
        kb.fused_apply_into(g, q, not transpose, key, dx)
    # dMc in bf16 (fp32's range): the chain's products round it to bf16 anyway on a GPU, and at
    # fp32 its write and reads would cost a third of an activation pass each at T = 1024
    dmc = kw.grad_q(x, g, (1, n // L, L, L), transpose, 0, (n, L, 1), dtype=torch.bfloat16, tuned_as=key,
                    dx=dx if fused else None, delta=coarse_delta(q, not transpose, key, x.dtype) if fused else None)
    return dx, kb.fused_chain_dq(dmc[0], q, key)


def _grad_fake(x, g, q, transpose, need_dx, n, b, N):
    return x.new_empty(x.shape), q.new_empty(q.shape, dtype=torch.float32)


@kernel_op("boft_triton::coarse_grad", _grad_fake)
def coarse_grad(x: torch.Tensor, g: torch.Tensor, q: torch.Tensor, transpose: bool, need_dx: bool, n: int, b: int,
                N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dl/dx, dl/dq)`` of ``butterfly.fused_apply`` through the coarse blocks; dl/dx is
    unwritten when not need_dx."""
    dx, dq = grad(x.contiguous(), g.contiguous(), q.contiguous(), transpose, (n, b, N), need_dx)
    return (dx if dx is not None else torch.empty_like(x)), dq


def launch_specs(n: int, b: int, N: int, dtype: torch.dtype, gsig: dict) -> list[dict]:
    """The kernels this route adds to ``butterfly.launch_specs``: the coarse dMc pass (``wide``'s,
    L wide, writing bf16) and a chain pass per factor group (``coarse_chain[k]``: accumulating,
    several row splits; ``_dq``: one split, dQ in the same program; ``_direct``: rows stored
    straight). gsig is the one-pass backward's signature."""
    L = width(b, N)
    dmc = [dict(spec, name=spec["name"].replace("wide", "coarse_dmc", 1),
                signature={**spec["signature"], "dq_ptr": "*bf16"})
           for spec in kw.launch_specs(kw.level_group(n, L, 1, 0), L, dtype)
           if spec["name"].startswith(("wide_grad", "wide_dq"))]
    with kb._compiling():
        fused_dx, archs = fuses_dx(L, dtype), kw.pair_dx_archs(L, dtype)
    if fused_dx:  # the dMc pass writing dx too, and the Delta_c build it reads (Hopper only at 161-192)
        dmc += [dict(spec, name=spec["name"].replace("_grad", "_dx_grad", 1),
                     constexprs={**spec["constexprs"], "WRITE_DX": True}, **archs)
                for spec in dmc if spec["constexprs"].get("WRITE_DX") is False]
        ptr = gsig["x_ptr"]
        for trans in (False, True):
            with kb._compiling():
                meta = _delta_launch(n, b, N, trans, dtype)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
            dmc.append(dict(name="coarse_delta" + ("_T" if trans else ""), width=L, levels=N,
                            fn=_coarse_delta_kernel, signature={"q_ptr": "*fp32", "d_ptr": ptr, "D": "i32"},
                            divisible=(), constexprs=meta, config={"num_warps": warps, "num_stages": stages},
                            num_warps=warps, num_stages=stages, options={"maxnreg": DELTA_REGISTERS}, **archs))
    fused, hp = kb.fused_groups(n, b, N), next_pow2(b // 2)
    with kb._compiling():
        dot = kb._dot_meta(torch.bfloat16, max(hp << (k1 - k0) for k0, k1 in fused))
    bwd = kb.CHAIN_CONFIG
    chain = []
    for sel, mode in enumerate(kb.chain_passes(n, b, N)):
        order, at = (fused[::-1], len(fused) - 1 - sel) if mode == "last" else (fused, sel)
        k0, k1 = order[at]
        in_pass = kb.sweeps_in_pass(N, hp, k0, k1)
        for tag, fused_dq in ((("", False), ("_dq", True))[:1 + in_pass] if mode == "acc" else (("_direct", True),)):
            chain.append(dict(name=f"coarse_chain{tag}[{sel}]", width=hp << (k1 - k0), levels=k1 - k0,
                              fn=kb._fused_grad_kernel, signature={**gsig, "x_ptr": "*bf16", "g_ptr": "*bf16",
                                                                   "dx_ptr": "*bf16"},
                              divisible=("n", "ROWS"),
                              constexprs={"NL": N, "B": kb.q_block(b), "HC": b // 2, "HP": hp,
                                          **kb.group_bounds(order),
                                          "SEL": at, "S0": k0, "S1": k1, "TRANS": mode == "last", "WRITE_DX": False,
                                          "FUSED_DQ": fused_dq, "RC": kb.FUSED_RC, **dot, "CHAIN": True,
                                          "DIRECT": mode != "acc",
                                          "HALF": mode == "acc" and kb.chain_halves(order, at, False),
                                          "BW": bwd["num_warps"]},
                              config=bwd, num_warps=bwd["num_warps"], num_stages=bwd["num_stages"],
                              options={"maxnreg": bwd["maxnreg"]}))
    return dmc + chain
