"""Levels wider than a program holds (b > 128): the slab kernels of ``kernels/wide.py``, against
the dense fp64 reference and the torch path, gradients included. In Triton's interpreter on a CPU
(the conftest sets it), compiled on a GPU."""

import importlib
import os

import pytest
import torch
from test_kernels import (  # noqa: F401  (_nan_outputs: NaN-filled outputs, default tiles)
    DEVICE,
    TOL,
    check_grads_do_not_depend_on_program_order,
    _nan_outputs,
    case_id,
    check_butterfly,
    rand_q,
    rel_err,
)

from boft_triton import reference, torch_ops

kb = importlib.import_module("boft_triton.kernels.butterfly")
kw = importlib.import_module("boft_triton.kernels.wide")

pytestmark = pytest.mark.kernels


# DreamBooth's block_num=8 on a 1280-wide layer (b = 160: padded lanes, dMc and Delta held whole as
# four tiles, both gradients in one pass), b = 144 with N = 2 (the same for a strided level), b = 256
# with N = 2 (two interleaved wide levels), b = 512 (LLM block_num=8 on 4096: 8 slabs of 64 in the
# forward, 8 of 64 for dMc), a 192-wide block (dMc as four tiles, the rest 64 wide; fp32 512: the
# forward K-split), 330 (rows not 16-byte aligned at a block: the dMc slabs in 16-row steps), a
# partial last tile everywhere.
WIDE_CASES = [(37, 320, 160, 1, 1.0), (23, 576, 144, 2, 1.0), (9, 512, 256, 2, 1.0), (13, 1024, 512, 1, 1.0),
              (70, 384, 192, 1, 10.0), (19, 660, 330, 1, 1.0)]


@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("T,n,b,N,scale", WIDE_CASES, ids=[case_id(c) for c in WIDE_CASES])
def test_wide_levels(T, n, b, N, scale, transpose):
    groups = kb.plan(n, b, N)
    assert all(kw.is_wide(g) for g in groups) and len(groups) == N  # each level its own slab pass
    check_butterfly(T, n, b, N, scale, transpose, dtype=torch.float32)


WIDE_16BIT_CASES = [(320, 160, 1, False, torch.bfloat16), (320, 160, 1, True, torch.bfloat16),
                    (576, 144, 2, True, torch.bfloat16), (272, 136, 1, False, torch.float16),
                    (384, 192, 1, True, torch.bfloat16), (512, 256, 1, True, torch.bfloat16), (1024, 256, 2, False, torch.bfloat16),
                    (448, 224, 1, False, torch.float16), (1024, 1024, 1, True, torch.bfloat16)]


@pytest.mark.parametrize("n,b,N,transpose,dtype", WIDE_16BIT_CASES,
                         ids=[f"{n}-{b}x{N}-{'xMT' if t else 'xM'}-{str(d)[6:]}" for n, b, N, t, d in WIDE_16BIT_CASES])
def test_wide_levels_in_16_bits(monkeypatch, n, b, N, transpose, dtype):
    """Up to 256 wide dx comes out of the dMc pass (``wide_grads``: Delta made from Q in either
    orientation, 136 with 24 padded lanes; the interpreter routes as Hopper; at 193-256 the
    two-half kernel, 224 with 32 padded lanes, 256x2's strided level with its tiles' columns one
    chunk each); wider, it is the transposed forward, a pass of its
    own (K-split past 512 wide)."""
    applies = []
    apply = kw.wide_apply
    monkeypatch.setattr(kw, "wide_apply", lambda *args: applies.append(args[2]) or apply(*args))
    check_butterfly(21, n, b, N, 1.0, transpose, dtype=dtype)
    assert kw.takes_pair_dx(b, dtype) == (b <= 192) and kw.takes_halves(b, dtype) == (192 < b <= 256)
    assert kw.writes_dx(b, dtype) == (b <= 256)
    if b > 192:  # the two-half kernel writes dx before Hopper too
        assert kw.writes_dx(b, dtype, (8, 0)) == (b <= 256)
    # the forward's levels, then dx's (the transpose flipped)
    assert applies == [transpose] * N + ([] if b <= 256 else [not transpose] * N)


# Levels of 257-384 columns hold their forward Delta slab as two tiles (``wide.held_tail``): SD's
# block_num=4 on 1280-wide layers (320; 256 + 64 rows), a strided level with a 32-row tail (288x2),
# 384 (two 256 + 128-row tiles) in fp16 and transposed; dx is that forward on g, transpose flipped.
TAIL_CASES = [(640, 320, 1, False, torch.bfloat16), (1152, 288, 2, True, torch.bfloat16),
              (768, 384, 1, True, torch.float16)]


@pytest.mark.parametrize("n,b,N,transpose,dtype", TAIL_CASES,
                         ids=[f"{n}-{b}x{N}-{'xMT' if t else 'xM'}-{str(d)[6:]}" for n, b, N, t, d in TAIL_CASES])
def test_wide_forward_holds_a_tail_tile(monkeypatch, n, b, N, transpose, dtype):
    layouts = []  # what each forward launch (the forward's, dx's) takes
    layout = kw._layout
    monkeypatch.setattr(kw, "_layout", lambda grp, b, kind, dtype: (
        layouts.append({k: v for k, v in layout(grp, b, kind, dtype).items() if k in ("KP", "KC", "KT", "BN", "NS")})
        if kind == "fwd" else None) or layout(grp, b, kind, dtype))
    check_butterfly(21, n, b, N, 1.0, transpose, dtype=dtype)
    tail = kw.held_tail(b, dtype)
    assert tail == kw.next_pow2(b - 256) and (256 + tail) * 128 <= kw.TAIL_SLAB
    # every forward and dx launch held 256 + tail rows in 128-wide slabs: 3 slabs, not 5-6 of 64
    assert layouts and all(layout == {"KP": 256, "KC": 256, "KT": tail, "BN": 128, "NS": 3} for layout in layouts)
    assert len(layouts) == 2 * N
    assert kw.held_tail(b, torch.float32) == 0 and kw.held_tail(512) == 0 and kw.held_tail(400) == 0


def test_wide_dx_pass_before_hopper(monkeypatch):
    """Before Hopper the dMc pass writes dx only up to 160 wide (mma holds the tiles in registers:
    spills past it), so at 192 dx is the transposed forward there, with the same results."""
    assert [kw.takes_pair_dx(b, torch.bfloat16, (8, 0)) for b in (160, 192)] == [True, False]
    assert kw.default_config("bwd", 192, torch.bfloat16, (8, 0))["num_stages"] == 1  # two spill on sm_80
    assert kw.default_config("bwd", 192, torch.bfloat16, (9, 0))["num_stages"] == 2  # one spills with dx on sm_90
    monkeypatch.setattr(kw, "capability", lambda device: (8, 0))
    applies = []
    apply = kw.wide_apply
    monkeypatch.setattr(kw, "wide_apply", lambda *args: applies.append(args[2]) or apply(*args))
    check_butterfly(21, 384, 192, 1, 1.0, True, dtype=torch.bfloat16)
    assert applies == [True, False]
    assert kw.LAST_LAUNCH["butterfly_wide_bwd"] == ("default", {"num_warps": 8, "num_stages": 1})
    # consumer Blackwell's mma holds operands in registers as sm_80's does; datacenter Blackwell's does not
    assert not kw.takes_pair_dx(192, torch.bfloat16, (12, 0)) and kw.takes_pair_dx(192, torch.bfloat16, (10, 0))


# Blocks whose rows are not 16-byte aligned (b not a multiple of 8: 130, 164, 194, ...) take what
# the compile sweep found spill-free (bench/results/sm90-compile-2026-12-01-misaligned.*): a dx of
# its own pass at an odd number of column pairs past 160 on Hopper (162) and at unaligned 193-256
# before it (194), the dMc pass writing dx elsewhere (164: one stage).
UNALIGNED_CASES = [(324, 162, (9, 0), False), (328, 164, (9, 0), True), (388, 194, (8, 0), False),
                   (388, 194, (9, 0), True), (520, 130, (8, 0), True)]


@pytest.mark.parametrize("n,b,cap,one_pass", UNALIGNED_CASES,
                         ids=[f"b{b}-sm{cap[0]}{cap[1]}" for _, b, cap, _ in UNALIGNED_CASES])
def test_unaligned_wide_levels(monkeypatch, n, b, cap, one_pass):
    bf16 = torch.bfloat16
    assert kw.writes_dx(b, bf16, cap) == one_pass
    assert kw.default_config("fwd", b, bf16)["num_warps"] == 8  # 4 spilled 4-44 bytes
    assert kw.default_config("bwd", b, bf16, cap)["num_stages"] == 1  # two spilled 8-80 bytes with dx
    monkeypatch.setattr(kw, "capability", lambda device: cap)
    applies = []
    apply = kw.wide_apply
    monkeypatch.setattr(kw, "wide_apply", lambda *args: applies.append(args[2]) or apply(*args))
    check_butterfly(21, n, b, 1, 1.0, False, dtype=bf16)
    assert applies == ([False] if one_pass else [False, True])  # the forward, then dx's own pass where it has one


def test_aligned_wide_levels_keep_their_configs():
    bf16 = torch.bfloat16
    assert kw.wide_rc(320) == kw.WIDE_RC and kw.wide_rc(330) == kw.WIDE_RC // 2 == 16  # slab dMc row steps
    # a strided level's rows run b/2 columns: 168x2's second level is 8-byte aligned, 168x1 is not misaligned
    assert kw.aligned(168) and not kw.aligned(168, 2) and kw.aligned(160, 2)
    assert kw.default_config("bwd", 168, bf16, N=2)["num_stages"] == 1 and kw.default_config("bwd", 168, bf16)["num_stages"] == 2
    assert kw.whole_block_warps(160) == kw.WHOLE_BLOCK_WARPS and kw.whole_block_warps(256) == kw.WHOLE_BLOCK_WARPS
    assert kw.default_config("bwd", 160, bf16, (8, 0))["num_stages"] == 2  # four tiles with dx, aligned
    assert kw.default_config("bwd", 224, bf16)["num_stages"] == 1  # two halves below 256: one stage
    assert kw.default_config("bwd", 256, bf16)["num_stages"] == 2
    assert kw.writes_dx(200, bf16, (8, 0)) and kw.writes_dx(188, bf16) and not kw.writes_dx(190, bf16)
    assert kw.writes_dx(196, bf16) and not kw.writes_dx(196, bf16, (8, 0))  # 48 bytes on sm_80 under triton 3.6


# K-split levels (kernels wider than a slab holds: 16-bit past 512, fp32's forward past 256 and
# its dMc past 512) at the real tiles, forced on narrower levels by lowering what a slab holds:
# padded lanes and a partial last chunk (160, 320), strided levels (N = 2), both orientations.
SPLIT_CASES = [(37, 320, 160, 1, False, torch.float32), (9, 512, 256, 2, True, torch.float32),
               (11, 640, 320, 1, False, torch.bfloat16), (6, 512, 256, 2, True, torch.float16)]


@pytest.mark.parametrize("T,n,b,N,transpose,dtype", SPLIT_CASES,
                         ids=[f"{case_id(c[:4] + (1.0,))}-{'xMT' if c[4] else 'xM'}-{str(c[5])[6:]}" for c in SPLIT_CASES])
def test_k_split_levels(monkeypatch, T, n, b, N, transpose, dtype):
    for held in ("HELD_FWD", "HELD_FP32_FWD", "HELD_BWD"):
        monkeypatch.setattr(kw, held, 128)
    assert kw.splits_k("fwd", b, dtype) and kw.splits_k("bwd", b, dtype)
    assert kw.k_chunk("fwd", b, dtype) < b  # several chunks per row tile
    check_butterfly(T, n, b, N, 1.0, transpose, dtype=dtype)


def test_slabs_cover_the_block_and_fit():
    """Up to 256 wide the forward holds the whole block; wider it takes slabs; the dMc slabs hold
    at most BWD_SLAB values (fp32: FP32_BWD_SLAB); past what a slab holds (16-bit 512, fp32's
    forward 256) the kernels run K-split, tiles of SPLIT_TILES' size whatever the width."""
    assert kw.slab("fwd", 160) == (256, 256, 1) and kw.slab("fwd", 512) == (512, 64, 8)
    assert kw.slab("bwd", 160) == (256, 128, 2) and kw.slab("bwd", 512) == (512, 64, 8)
    assert kw.slab("fwd", 1024) == (1024, 64, 16) and kw.k_chunk("fwd", 1024) == 64
    assert kw.slab("bwd", 4096) == (4096, 128, 32) and kw.k_chunk("bwd", 4096) == 128
    assert kw.k_chunk("fwd", 512, torch.float32) == 32 and kw.k_chunk("bwd", 512, torch.float32) == 512
    for dtype in (torch.bfloat16, torch.float32):
        for b in (130, 160, 192, 256, 320, 384, 512, 640, 1024, 1536, 4096):
            for kind in ("fwd", "bwd"):
                kp, bn, ns = kw.slab(kind, b, dtype)
                kc = kw.k_chunk(kind, b, dtype)
                assert (ns - 1) * bn < b <= ns * bn and kp >= b and kp % kc == 0
                if kw.splits_k(kind, b, dtype):
                    assert (bn, kc) == kw.SPLIT_TILES[(kind, dtype == torch.float32)] and kp > 256
                elif dtype == torch.float32:
                    assert bn * kc <= (max(kw.FP32_BWD_SLAB, kb.MIN_BLOCK * kp) if kind == "bwd"
                                       else kw.FP32_FWD_COLUMNS * kw.HELD_FP32_FWD)
                elif kind == "fwd" and kw.held_tail(b, dtype):  # two held tiles: kp/2 + tail rows
                    assert (kp // 2 + kw.held_tail(b, dtype)) * bn <= kw.TAIL_SLAB
                else:
                    assert bn * kc <= (kp * kp if kind == "fwd" and kp <= kw.FWD_WHOLE else kw.FWD_SLAB)


def test_wide_dq_is_deterministic_over_row_splits(monkeypatch):
    """With several row splits each program writes its own partial dMc slab and a small kernel adds
    them in split order: dQ has the same bits in grid order and reversed, and agrees with the
    torch path."""
    n, b, N, T = 320, 160, 1, 600
    monkeypatch.setattr(kb, "num_sms", lambda device: 64)
    monkeypatch.setattr(kw, "num_sms", lambda device: 64)
    assert kb._splits(T, kb.group(n, b, N, 0), b, 64)[0] > 1
    check_grads_do_not_depend_on_program_order(monkeypatch, T, n, b, N)


def test_one_gradient_at_a_time():
    """Q frozen: dx alone (the transposed forward); x frozen: dQ alone."""
    n, b = 320, 160
    Q = rand_q(1, n // b, b).float().to(DEVICE)
    x = torch.randn(17, n, device=DEVICE)
    g = torch.randn(17, n, device=DEVICE)
    xr = x.clone().requires_grad_()
    Qr = Q.clone().requires_grad_()
    dx_ref, dq_ref = torch.autograd.grad(torch_ops.butterfly(xr, Qr), (xr, Qr), g)
    x1 = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(kb.butterfly(x1, Q), (x1,), g)
    Q1 = Q.clone().requires_grad_()
    (dq,) = torch.autograd.grad(kb.butterfly(x, Q1), (Q1,), g)
    assert rel_err(dx, dx_ref) <= 1e-5 and rel_err(dq, dq_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_segmented_batch_with_wide_levels(dtype):
    """Serving a mixed batch: a wide level runs its slab kernel segment by segment."""
    n, b, N, lengths = 320, 160, 1, [5, 0, 7]
    Q64 = torch.stack([rand_q(N, n // b, b) for _ in lengths])
    offsets = [0, 5, 5, 12]
    x = torch.randn(12, n, dtype=torch.float64).to(dtype).to(DEVICE)
    y = kb.segmented_butterfly(x, Q64.float().to(DEVICE), offsets)
    expected = torch.cat([x.double().cpu()[offsets[k]:offsets[k + 1]] @ reference.dense_rotation(Q64[k].float().double())
                          for k in range(len(lengths))])
    assert y.dtype == dtype and rel_err(y, expected) <= TOL[dtype]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts bytes in Triton's interpreter")
def test_wide_traffic():
    """b = 160 (DreamBooth's block_num=8 on 1280) and 192 (block_num=4 on 768): the forward reads x
    once; the backward's dMc pass holds the whole block's as four tiles (g and x read once) and
    writes dx too (Delta's four tiles held; at 192 on Hopper, as the interpreter routes); within the
    targets at T = 1024, and on the floor (bench/results/interp-wide-*)."""
    from boft_triton.bench import kernel_profile

    assert kw.takes_pair(160, torch.bfloat16) and kw.takes_pair(192, torch.bfloat16)
    assert not kw.takes_pair(256, torch.bfloat16)
    for n, b in ((640, 160), (768, 192)):
        row = kernel_profile.traffic(n, b, 1, 1024, "bf16")
        assert row["torch_bytes"] == 0, row
        assert row["fwd_ratio"] <= kernel_profile.TARGET_FWD, row
        assert row["fwd_bwd_ratio"] <= kernel_profile.TARGET_FWD_BWD, row
        assert row["fwd_bwd_ratio"] == pytest.approx(row["fwd_bwd_floor"], rel=1e-9), row  # x, g, Q: once each


# fp32 inputs wider than the block kernels' tf32x3 tiles fit (blocks over 32 wide) run level by
# level through the slab kernels on a GPU; forced here, where the interpreter has no such limit.
LEVEL_CASES = [(37, 256, 8, 4, 1.0, False), (21, 256, 64, 2, 1.0, True), (19, 320, 160, 1, 1.0, False),
               (5, 96, 6, 4, 10.0, True)]


@pytest.mark.parametrize("T,n,b,N,scale,transpose", LEVEL_CASES,
                         ids=[case_id(c) + ("-xMT" if c[-1] else "-xM") for c in LEVEL_CASES])
def test_fp32_level_by_level(monkeypatch, T, n, b, N, scale, transpose):
    assert kw.takes_levels(n, b, N, torch.float32) == (DEVICE.type == "cuda")  # the interpreter: block kernels
    with monkeypatch.context() as gpu:
        gpu.setattr(kb, "interpreting", lambda: False)  # what takes_levels sees on a GPU
        assert kw.takes_levels(n, b, N, torch.float32) and not kw.takes_levels(n, b, N, torch.bfloat16)
        assert kb.runs_on_gpu(n, b, N, torch.float32)
    monkeypatch.setattr(kw, "takes_levels", lambda n, b, N, dtype: dtype == torch.float32)
    launched = []
    monkeypatch.setattr(kw, "apply_into", lambda *a, _f=kw.apply_into: (launched.append(a[3]), _f(*a))[1])
    check_butterfly(T, n, b, N, scale, transpose)
    assert sorted(set(launched)) == list(range(N))  # every level its own slab pass


def test_fp32_segmented_level_by_level(monkeypatch):
    monkeypatch.setattr(kw, "takes_levels", lambda n, b, N, dtype: dtype == torch.float32)
    n, b, N = 256, 64, 2
    Q64 = torch.stack([rand_q(N, n // b, b) for _ in range(2)])
    x = torch.randn(9, n, dtype=torch.float64).float().to(DEVICE)
    y = kb.segmented_butterfly(x, Q64.float().to(DEVICE), [0, 4, 9])
    expected = torch.cat([x.double().cpu()[lo:hi] @ reference.dense_rotation(Q64[k].float().double())
                          for k, (lo, hi) in enumerate([(0, 4), (4, 9)])])
    assert rel_err(y, expected) <= 1e-5
