"""The backward through dense coarse blocks (``kernels/coarse.py``): dMc of each ``L x L`` coarse
block in one pass, which up to 256 wide (except 161-192 before Hopper) writes dx too (else dx is
the transposed one-pass forward), dQ by the chain pass on identity rows.
Against the dense fp64 reference and the per-group backward, in Triton's interpreter on a CPU
(the conftest sets it), compiled on a GPU."""

import importlib
import os

import pytest
import torch
from test_kernels import (  # noqa: F401  (_nan_outputs: NaN-filled outputs, default tiles)
    DEVICE,
    TOL,
    _interpreter_runs_programs_in_reverse,
    _nan_outputs,
    case_id,
    check_butterfly,
    rand_q,
    rel_err,
)

kb = importlib.import_module("boft_triton.kernels.butterfly")
kc = importlib.import_module("boft_triton.kernels.coarse")
kw = importlib.import_module("boft_triton.kernels.wide")

pytestmark = pytest.mark.kernels


@pytest.fixture
def spy(monkeypatch):
    """Counts the backwards that take this route."""
    calls = []
    grad = kc.grad

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return grad(*args, **kwargs)

    monkeypatch.setattr(kc, "grad", counted)
    return calls


# DreamBooth's block_num=8 (40x3, L = 160: chunks of 20 padded to 32), 20x4 (four one-level
# groups), 36x3 (L = 144, dMc's second tile mostly padding), ControlNet's 80x2 (each group's two
# 128-wide blocks shared out between two chain programs), 72x2 and 68x2 (L = 136: 24 of the second
# tile's 32 lanes padding), and 48x3 (L = 192: on Hopper, as the interpreter routes), whose dMc
# pass also writes dx; 64x3 (L = 256: two programs hold half the dMc each and write dx's half).
# Enough rows that the route pays, a partial last row tile in each.
COARSE_CASES = [(300, 320, 40, 3, 1.0), (333, 320, 20, 4, 1.0), (301, 288, 36, 3, 10.0), (300, 320, 80, 2, 1.0),
                (250, 288, 72, 2, 1.0), (260, 272, 68, 2, 1.0), (401, 384, 48, 3, 1.0), (600, 512, 64, 3, 1.0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("T,n,b,N,scale", COARSE_CASES, ids=[case_id(c) for c in COARSE_CASES])
def test_coarse_backward(monkeypatch, spy, T, n, b, N, scale, transpose, dtype):
    assert kc.takes(n, b, N, T, dtype, True)
    dx_passes = []  # dx's own pass (the transposed forward), taken only where the dMc pass cannot write dx
    apply = kb.fused_apply_into
    monkeypatch.setattr(kb, "fused_apply_into", lambda x, *rest: dx_passes.append(x.shape) or apply(x, *rest))
    check_butterfly(T, n, b, N, scale, transpose, dtype=dtype)
    assert spy == [True]
    assert len(dx_passes) == 2 - kc.fuses_dx(kc.width(b, N), dtype)  # the forward, and dx's own pass
    assert kc.fuses_dx(kc.width(b, N), dtype)
    if kc.width(b, N) > 192:  # the two-half dMc pass wrote dx
        assert kw.takes_halves(kc.width(b, N), dtype) and not kw.takes_pair(kc.width(b, N), dtype)


def test_coarse_backward_before_hopper(monkeypatch, spy):
    """Before Hopper the four-tile dMc pass writes dx only up to L = 160 (past it, mma's
    register-held tiles spill): at 48x3 (L = 192) dx takes a pass of its own there, with the same
    results. The two-half pass (193-256) writes dx on every arch."""
    assert [kc.fuses_dx(L, torch.bfloat16, (8, 0)) for L in (160, 192, 256)] == [True, False, True]
    assert all(kc.fuses_dx(L, torch.bfloat16, cap) for L in (192, 256) for cap in ((9, 0), None))
    monkeypatch.setattr(kc, "capability", lambda device: (8, 0))
    monkeypatch.setattr(kw, "capability", lambda device: (8, 0))
    dx_passes = []
    apply = kb.fused_apply_into
    monkeypatch.setattr(kb, "fused_apply_into", lambda x, *rest: dx_passes.append(x.shape) or apply(x, *rest))
    assert kc.takes(384, 48, 3, 401, torch.bfloat16, True, (8, 0))
    check_butterfly(401, 384, 48, 3, 1.0, False, dtype=torch.bfloat16)
    assert spy == [True] and len(dx_passes) == 2  # the forward, and dx's own pass
    assert kb.LAST_LAUNCH["butterfly_wide_bwd"][1]["num_stages"] == 1  # sm_80's dMc pass past 160


@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("n,b,N", [(320, 40, 3), (320, 20, 4), (288, 36, 3), (320, 80, 2), (464, 116, 2), (256, 8, 6)],
                         ids=lambda v: str(v))
def test_coarse_delta_is_the_dense_block_minus_identity(n, b, N, transpose):
    """``Delta_c`` (what the dMc pass multiplies g by for dx) against the coarse blocks of the
    dense fp64 rotation: ``Mc - I``, or ``Mc^T - I`` with transpose, every group and padded chunk
    lane in its place; the first group's rows gathered from Q where it is one level (all but
    8x6's). Stored in bf16 it carries that rounding (3.3-3.6e-3 here), and on a GPU the
    build's own (its dots take bf16 operands: up to 5e-3 emulated, at 20x4); stored in fp32 in the
    interpreter (fp32 dots), only fp32's."""
    from boft_triton import reference

    Q = rand_q(N, n // b, b, 1.0).float().to(DEVICE)
    L = kc.width(b, N)
    delta = kc.coarse_delta(Q, transpose, (n, b, N), torch.bfloat16)
    M = reference.dense_rotation(Q.double().cpu())
    M = M.T if transpose else M
    eye = torch.eye(L, dtype=torch.float64)
    expected = torch.stack([M[c * L:(c + 1) * L, c * L:(c + 1) * L] - eye for c in range(n // L)])
    assert delta.shape == (n // L, L, L) and delta.dtype == torch.bfloat16
    assert rel_err(delta, expected) <= 2 ** -7
    if DEVICE.type == "cpu":  # the layout, exactly: no rounding but fp32's
        assert rel_err(kc.coarse_delta(Q, transpose, (n, b, N), torch.float32), expected) <= 1e-5


@pytest.mark.parametrize("need", ["x", "Q"])
def test_one_gradient_at_a_time(spy, need):
    """x frozen: dQ alone (no dx pass); Q frozen: dx alone, the transposed forward, as before."""
    T, n, b, N = 300, 320, 40, 3
    Q64 = rand_q(N, n // b, b)
    x = torch.randn(T, n, dtype=torch.float64).bfloat16().to(DEVICE)
    g = torch.randn(T, n, dtype=torch.float64).bfloat16().to(DEVICE)
    Q = Q64.float().to(DEVICE)
    xr = x.double().cpu().requires_grad_()
    Qr = Q.double().cpu().requires_grad_()
    from boft_triton import reference

    expected = dict(zip("xQ", torch.autograd.grad(xr @ reference.dense_rotation(Qr), (xr, Qr), g.double().cpu())))
    leaf = dict(x=x, Q=Q)[need].clone().requires_grad_()
    args = (leaf, Q) if need == "x" else (x, leaf)
    (grad,) = torch.autograd.grad(kb.butterfly(*args), (leaf,), g)
    assert rel_err(grad, expected[need]) <= TOL[torch.bfloat16]
    assert spy == ([False] if need == "Q" else [])


def test_route_moves_fewer_bytes_than_the_group_passes():
    """The route is taken where it moves fewer bytes: 16-bit inputs, enough rows, the one-pass
    backward's shapes with L past MAX_BLOCK; never fp32 (its own fp32-exact paths)."""
    bf16 = torch.bfloat16
    assert kc.takes(1280, 40, 3, 1024, bf16, True) and not kc.takes(1280, 40, 3, 16, bf16, True)
    assert not kc.takes(1280, 40, 3, 1 << 16, torch.float32, True)
    assert not kc.supported(1024, 64, 2, bf16)  # L = 128: one block kernel already
    assert not kc.supported(2560, 160, 2, bf16)  # one level past MAX_BLOCK: no one-pass forward
    assert not kc.supported(8192, 8, 8, bf16)  # L = 1024: past what the dMc pass holds
    # 80x2: no one-pass backward (each group's dMc is 2 x 128 x 128), but each group acts first
    # in y = I M or y = I M^T, so its chain pass stores rows and holds no dMc
    assert not kb.fused_backward(1280, 80, 2) and kb.chain_passes(1280, 80, 2) == ("first", "last")
    assert kb.chain_passes(1280, 40, 3) == ("first", "acc", "last")
    assert kb.chain_passes(1024, 8, 6) == ("acc", "acc")
    for b, N in ((40, 3), (80, 2)):
        per_group, coarse = kc.moved_bytes(1280, b, N, 1024, bf16, True)
        assert coarse < 0.8 * per_group and kc.takes(1280, b, N, 1024, bf16, True)


@pytest.mark.parametrize("b,N", [(40, 3), (80, 2)], ids=["40x3", "80x2"])
def test_chain_is_deterministic_over_row_splits(monkeypatch, spy, b, N):
    """The dMc and chain passes split rows the same fixed way whatever the tile config (the chain
    of 80x2 stores rows straight): dQ has the same bits with the programs run in
    reverse."""
    T, n = 600, 320
    monkeypatch.setattr(kb, "num_sms", lambda device: 64)
    monkeypatch.setattr(kc.kw, "num_sms", lambda device: 64)
    assert kb._fused_splits(kc.width(b, N), n, b, N, 64)[0] > 1
    Q = rand_q(N, n // b, b).float().to(DEVICE).requires_grad_()
    x = torch.randn(T, n, device=DEVICE).bfloat16().requires_grad_()
    g = torch.randn(T, n, device=DEVICE).bfloat16()
    first = torch.autograd.grad(kb.butterfly(x, Q), (x, Q), g)
    if DEVICE.type == "cpu":
        _interpreter_runs_programs_in_reverse(monkeypatch)
    again = torch.autograd.grad(kb.butterfly(x, Q), (x, Q), g)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert spy == [True, True]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts bytes in Triton's interpreter")
def test_coarse_traffic():
    """40x3 (DreamBooth's block_num=8 with N=3): three activation passes in the backward (dx
    written by the dMc pass), against seven for the per-group passes: within the issue's targets
    (bench/results/interp-wide-*: 1.42x; 1.56x with dx's own pass, 2.0x per group)."""
    from boft_triton.bench import kernel_profile

    row = kernel_profile.traffic(640, 40, 3, 1024, "bf16")
    assert row["torch_bytes"] == 0, row
    assert row["fwd_ratio"] <= kernel_profile.TARGET_FWD, row
    assert row["fwd_bwd_ratio"] <= kernel_profile.TARGET_FWD_BWD, row  # parameters included


def _backward(n, b, N, T):
    Q = rand_q(N, n // b, b).float().to(DEVICE).requires_grad_()
    x = torch.randn(T, n, device=DEVICE).bfloat16().requires_grad_()
    torch.autograd.grad(kb.butterfly(x, Q), (x, Q), torch.randn(T, n, device=DEVICE).bfloat16())


def test_tune_times_both_routes_and_the_backward_takes_the_cached_one(cache_file, spy):
    """``tune`` times the coarse and the per-group backward as candidates; the cached winner is the
    route the backward takes, whatever the byte model would say; without a usable entry, the
    model decides."""
    import json

    from boft_triton import tuning
    from boft_triton.kernels import _common

    n, b, N, bf16 = 320, 80, 2, torch.bfloat16
    assert {c["route"] for c in kb.candidates(n, b, N, "bwd", bf16)} == set(kc.ROUTES)
    assert "route" not in kb.candidates(1024, 64, 2, "bwd", bf16)[0]  # L = 128: one route only
    rows = tuning.tune([(n, b, N)], tokens_per_step=32, dtype=bf16, device=DEVICE, max_configs=2, verbose=False)
    won = next(r for r in rows if r["kind"] == "bwd")["config"]["route"]
    assert won in kc.ROUTES and spy and all(spy)  # the coarse route was timed (dx and dQ, as training runs)
    spy.clear()
    _backward(n, b, N, 32)
    assert kb.LAST_LAUNCH["butterfly_bwd_route"] == ("cache", won) and spy == ([True] if won == "coarse" else [])

    key = tuning.cache_key(_common.device_name(DEVICE), _common.TRITON_VERSION, bf16, n, b, N)
    for route, T, expected in (("coarse", 32, [True]), ("groups", 300, []), ("sideways", 300, [True])):
        assert kc.takes(n, b, N, T, bf16, True) == (T == 300)  # the model: coarse from 121 rows
        entry = {"bwd": {"num_warps": 4, "num_stages": 2, "route": route}}
        cache_file.write_text(json.dumps({"format": tuning.CACHE_FORMAT, "entries": {key: entry}}))
        tuning.clear_memo()
        spy.clear()
        _backward(n, b, N, T)
        assert spy == expected, route


# Chains the route cases above do not reach: accumulating passes over groups of several levels
# (8x6: two 3-level groups; 6x6), and a gathered one-level group feeding a 2-level one (10x5).
CHAIN_CASES = [(256, 8, 6), (192, 6, 6), (320, 10, 5), (320, 40, 3)]


# The interpreter computes in fp32 (tight), a GPU with bf16 operands.
CHAIN_TOL = 1e-5 if DEVICE.type == "cpu" else TOL[torch.bfloat16]


def _chain_inputs(n, b, N):
    """Q of the shape and a random bf16 dMc ``[n/L, L, L]``."""
    L = kc.width(b, N)
    Q = rand_q(N, n // b, b).float().to(DEVICE)
    return Q, torch.randn(n // L, L, L, dtype=torch.float64).bfloat16().to(DEVICE)


def _chain_reference(Q, dmc):
    """dl/dQ of ``l = sum_c <Mc_c, dmc_c>`` over the coarse blocks of the dense rotation, fp64."""
    from boft_triton import reference

    Qr = Q.detach().double().cpu().requires_grad_()
    M = reference.dense_rotation(Qr)
    L = dmc.shape[-1]
    blocks = torch.stack([M[c * L:(c + 1) * L, c * L:(c + 1) * L] for c in range(dmc.shape[0])])
    (dq,) = torch.autograd.grad((blocks * dmc.double().cpu()).sum(), Qr)
    return dq


@pytest.mark.parametrize("n,b,N", CHAIN_CASES, ids=lambda v: str(v))
def test_chain_rule_from_dmc_to_every_factor(n, b, N):
    """``fused_chain_dq`` against autograd through the dense rotation, every pass mode included
    (direct, accumulating over one or several levels, the first group's rows gathered from Q)."""
    Q, dmc = _chain_inputs(n, b, N)
    assert rel_err(kb.fused_chain_dq(dmc, Q, (n, b, N)), _chain_reference(Q, dmc)) <= CHAIN_TOL


def test_accumulating_chain_passes_take_half_a_coarse_block_a_program(monkeypatch):
    """Where the first-acting group is the top level alone (gathered), an accumulating chain pass
    runs a program per half coarse block (HALF: only that level mixes the halves); not in ``y =
    I M^T`` nor under a multi-level first group. The batched products it holds are cut so their
    batch covers the program's warps (Triton puts a batched dot's warps on the batch axis only):
    40x3's half holds 2 blocks of 64, cut in 4 at 8 warps. CHAIN_CASES check the values."""
    g40, g10, g8 = kb.fused_groups(320, 40, 3), kb.fused_groups(320, 10, 5), kb.fused_groups(256, 8, 6)
    assert kb.chain_halves(g40, 1, False) and not kb.chain_halves(g40[::-1], 1, True)
    assert kb.chain_halves(g10, 1, False) and kb.chain_halves(g10, 2, False)  # 10x5: B before S within the half
    assert not kb.chain_halves(g8, 1, False)  # 8x6: a 3-level first group, held
    assert [kb._batch_parts(z, wp, 8) for z, wp in ((2, 64), (4, 64), (8, 32), (1, 32), (2, 16))] == [4, 2, 1, 2, 1]
    assert kb._batch_parts(2, 64, 1) == 1  # BW = 1 (the Delta_c build): uncut
    grids, wrap = [], kb.wrap_triton

    class Recorded:  # wrap_triton(kernel)[grid](...), with each chain pass's grid and HALF kept
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = wrap(self.kernel)[grid]
            return lambda *args, **kw: (grids.append((grid, kw.get("HALF"))), launch(*args, **kw))[1]

    n, b, N = 320, 40, 3
    Q, dmc = _chain_inputs(n, b, N)
    monkeypatch.setattr(kb, "wrap_triton", Recorded)
    dq = kb.fused_chain_dq(dmc, Q, (n, b, N))
    blocks = n // kc.width(b, N)
    assert [(grid[1], half) for grid, half in grids if half is not None] == [(blocks, False), (2 * blocks, True),
                                                                             (blocks, False)]
    assert rel_err(dq, _chain_reference(Q, dmc)) <= CHAIN_TOL
    # one row split: the halves sweep dQ in the pass (FUSED_DQ) rather than writing partials
    monkeypatch.setattr(kb, "num_sms", lambda device: 1)
    grids.clear()
    assert rel_err(kb.fused_chain_dq(dmc, Q, (n, b, N)), _chain_reference(Q, dmc)) <= CHAIN_TOL
    assert [grid for grid, half in grids if half] == [(1, 2 * blocks)]


def test_chain_pass_in_the_transposed_orientation():
    """The accumulating pass of 40x3's middle level run in ``y = I M^T`` with dMc^T (the groups
    reversed; ``fused_chain_dq`` takes that orientation only for a last one-level group) gives the
    same dQ: the gather of the first group's rows transposed (``_chain_factor_rows`` with TRANS)."""
    n, b, N = 320, 40, 3
    Q, dmc = _chain_inputs(n, b, N)
    groups = kb.fused_groups(n, b, N)
    assert groups[1] == (1, 2) and kb.chain_passes(n, b, N)[1] == "acc"
    dq = torch.full(Q.shape, float("nan"), device=DEVICE)
    x = torch.empty(1, 1, dtype=torch.bfloat16, device=DEVICE).expand(kc.width(b, N), n)  # never read
    kb._fused_grad_pass(x, dmc, Q, None, dq, groups[::-1], 1, True, False, (n, b, N), kb.CHAIN_CONFIG,
                        torch.bfloat16, chain=True, direct=False)
    assert rel_err(dq[1], _chain_reference(Q, dmc)[1]) <= CHAIN_TOL
