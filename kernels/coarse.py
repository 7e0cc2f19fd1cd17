"""The backward of a multi-level butterfly through its dense coarse blocks (no pass per group).

``M = B_{N-1} ... B_0`` is block-diagonal with dense ``L x L`` coarse blocks ``Mc`` (``L = b
2^(N-1)``). The one-pass backward (``butterfly.fused_grad``) reads (x, g) once per factor group
because each group's ``dMc`` fills a program's registers. With ``L`` just past ``MAX_BLOCK``
(DreamBooth's 40x3 and ControlNet's 80x2 on 1280-wide layers: L = 160) three passes over the
activations are cheaper than that:

1. ``dx = g Mc^T`` (``g Mc`` with transpose): the one-pass forward with the transpose flipped,
   reading g once and writing dx once;
2. ``dl/dMc = x^T g`` (``g^T x``) per coarse block: the dMc pass of a single level ``L`` wide
   (``wide.grad_q``: up to 192 wide the whole block's dMc is four tiles in one program, so x and
   g are read once), accumulated in fp32 and written once as ``[n/L, L, L]`` bf16;
3. dQ from dMc by the chain rule, ``dF_k = (F_{N-1}..F_{k+1})^T dMc (F_{k-1}..F_0)^T`` on F_k's
   values: the butterfly's own dQ pass on ``y = I M`` with ``dl/dy = dMc`` (``fused_chain_dq``: the
   identity rows are made in registers, dMc is read once per factor group; a one-level group
   acting first, in ``I M`` or ``I M^T``, needs no accumulator: ``butterfly.chain_passes``). This
   is parameter-sized work, ``n L`` values a pass, whatever the row count.

Activations move 4 times (the per-group backward: ``2 G + 1``), parameter-sized tensors ``G + 1``
times, so the route pays from about L rows on: ``takes`` picks whichever moves fewer bytes,
unless ``boft-triton tune`` timed both routes for the shape (``route``).
Row splits and split-ordered sums are the dMc and dQ passes' own, so dQ is deterministic.
"""

from __future__ import annotations

import torch

from . import butterfly as kb
from . import wide as kw
from ._common import LAST_LAUNCH, kernel_op, new_empty, next_pow2


def width(b: int, N: int) -> int:
    """L, the coarse block of an (n, b, N) butterfly."""
    return b << (N - 1)


def supported(n: int, b: int, N: int, dtype: torch.dtype) -> bool:
    """Whether the shape can take this route: 16-bit inputs (dMc is rounded to bf16, as the
    16-bit backward's own block products are; fp32 keeps its fp32-exact paths), the one-pass
    forward and chain passes (``butterfly.chain_passes``), and a coarse block past what one block
    kernel covers that the dMc pass holds."""
    L = width(b, N)
    return (dtype in (torch.bfloat16, torch.float16) and N >= 2 and kb.MAX_BLOCK < L <= kb.MAX_WIDE
            and kb.chain_passes(n, b, N) is not None)


def moved_bytes(n: int, b: int, N: int, T: int, dtype: torch.dtype, need_dx: bool) -> tuple[int, int]:
    """(per-group backward, this route): bytes of activations, and of dMc for this route, each
    moves; the parameters' own reads and writes (about the same in both) left out."""
    es, L = dtype.itemsize, width(b, N)
    act = T * n * es
    groups = len(kb.fused_groups(n, b, N))
    if kb.fused_backward(n, b, N):  # a pass over (x, g) per group, the first writing dx
        per_group = (2 * groups + need_dx) * act
    else:  # plan()'s groups: recompute their inputs, then a pass over (input, gradient) each
        levels = len(kb.plan(n, b, N))
        per_group = (2 * (levels - 1) + 3 * levels - (not need_dx)) * act
    dmc = n * L * 2  # bf16
    g_reads = 1 if kw.takes_pair(L, dtype) else kw.slab("bwd", L, dtype)[2]
    coarse = (2 * need_dx + 1 + g_reads) * act + (1 + groups) * dmc
    return per_group, coarse


def takes(n: int, b: int, N: int, T: int, dtype: torch.dtype, need_dx: bool) -> bool:
    """Whether the byte model sends the backward of ``T`` rows through the dense coarse blocks:
    supported, and fewer bytes moved than the per-group passes."""
    if not supported(n, b, N, dtype):
        return False
    per_group, coarse = moved_bytes(n, b, N, T, dtype, need_dx)
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
    chosen = "coarse" if takes(n, b, N, T, dtype, need_dx) else "groups"
    LAST_LAUNCH["butterfly_bwd_route"] = ("model", chosen)
    return chosen


def grad(x, g, q, transpose, key, need_dx):
    """``(dx or None, dQ)`` of ``y = x M`` (``x M^T``): the three passes of the module docstring."""
    T, n = x.shape
    _, b, N = key
    L = width(b, N)
    dx = None
    if need_dx:
        dx = new_empty(T, n, dtype=x.dtype, device=x.device)
        kb.fused_apply_into(g, q, not transpose, key, dx)
    # dMc in bf16 (fp32's range): the chain's products round it to bf16 anyway on a GPU, and at
    # fp32 its write and reads would cost a third of an activation pass each at T = 1024
    dmc = kw.grad_q(x, g, (1, n // L, L, L), transpose, 0, (n, L, 1), dtype=torch.bfloat16, tuned_as=key)
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
    fused, hp = kb.fused_groups(n, b, N), next_pow2(b // 2)
    with kb._compiling():
        dot = kb._dot_meta(torch.bfloat16, max(hp << (k1 - k0) for k0, k1 in fused))
    bwd = kb.CHAIN_CONFIG
    chain = []
    for sel, mode in enumerate(kb.chain_passes(n, b, N)):
        order, at = (fused[::-1], len(fused) - 1 - sel) if mode == "last" else (fused, sel)
        k0, k1 = order[at]
        bounds = [v for k0k1 in order for v in k0k1] + [0, 0] * (kb.FUSED_MAX_GROUPS - len(order))
        for tag, fused_dq in ((("", False), ("_dq", True)) if mode == "acc" else (("_direct", True),)):
            chain.append(dict(name=f"coarse_chain{tag}[{sel}]", width=hp << (k1 - k0), levels=k1 - k0,
                              fn=kb._fused_grad_kernel, signature={**gsig, "x_ptr": "*bf16", "g_ptr": "*bf16",
                                                                   "dx_ptr": "*bf16"},
                              divisible=("n", "ROWS"),
                              constexprs={"NL": N, "B": b, "HC": b // 2, "HP": hp, "NG": len(order),
                                          **dict(zip(("A0", "A1", "B0", "B1", "C0", "C1", "D0", "D1"), bounds)),
                                          "SEL": at, "S0": k0, "S1": k1, "TRANS": mode == "last", "WRITE_DX": False,
                                          "FUSED_DQ": fused_dq, "RC": kb.FUSED_RC, **dot, "CHAIN": True,
                                          "DIRECT": mode != "acc"},
                              config=bwd, num_warps=bwd["num_warps"], num_stages=bwd["num_stages"]))
    return dmc + chain
