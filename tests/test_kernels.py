"""The Triton kernels (cayley, butterfly) against the torch path and the dense fp64 reference.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors: the variable
must be set before any ``@triton.jit`` decorator runs, i.e. before ``boft_triton.kernels.*`` is
first imported, hence at the very top of this module. With CUDA the same tests run the compiled
kernels on the GPU. Each interpreted program costs about a millisecond, so the shapes are small
and the cases a representative matrix, not the full product.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

import boft_triton  # noqa: E402,F401  (registers boft_triton.kernels from the source tree)
from boft_triton import reference, torch_ops  # noqa: E402

kc = importlib.import_module("boft_triton.kernels.cayley")
kb = importlib.import_module("boft_triton.kernels.butterfly")
kcommon = importlib.import_module("boft_triton.kernels._common")

pytestmark = pytest.mark.kernels
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch, tmp_path):
    """Kernel outputs start as NaN, so an element a kernel forgets to write fails the test; and
    no user tuning cache leaks in (default tiles)."""
    monkeypatch.setattr(kcommon, "NAN_FILL_OUTPUTS", True)
    monkeypatch.setenv("BOFT_TRITON_TUNE_CACHE", str(tmp_path / "no-cache.json"))
    from boft_triton import tuning

    tuning.clear_memo()
    yield
    tuning.clear_memo()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error in fp64; NaN anywhere never passes."""
    assert not torch.isnan(a).any(), "NaN in kernel output (unwritten element?)"
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rand_q(N, D, b, scale=1.0, mask=None):
    R = scale * torch.randn(N, D, b, b, dtype=torch.float64)
    Q = reference.dense_cayley(R)
    if mask is not None:
        Q = torch.where(mask[..., None, None], torch.eye(b, dtype=Q.dtype), Q)
    return Q


# ---------------------------------------------------------------------------------------------
# cayley

CAYLEY_CASES = [
    # (N, D, b, scale, masked)
    (1, 3, 2, 1.0, False),
    (2, 5, 3, 1e-4, True),
    (2, 3, 4, 10.0, True),
    (1, 4, 5, 1.0, False),
    (2, 2, 6, 1.0, True),
    (3, 2, 8, 10.0, False),
    (1, 2, 16, 1e-4, True),
    (1, 2, 32, 1.0, False),
    (1, 1, 45, 3.0, False),
    (1, 2, 64, 1.0, True),
]


@pytest.mark.parametrize(
    "N,D,b,scale,masked", CAYLEY_CASES, ids=[f"N{c[0]}-D{c[1]}-b{c[2]}-R{c[3]:g}-mask{int(c[4])}" for c in CAYLEY_CASES]
)
def test_cayley(N, D, b, scale, masked):
    R64 = scale * torch.randn(N, D, b, b, dtype=torch.float64)
    mask = (torch.rand(N, D) < 0.4) if masked else None
    if masked:
        mask[0, 0] = True
    R = R64.float().to(DEVICE).requires_grad_()
    m = mask.to(DEVICE) if masked else None
    Q = kc.cayley(R, m)
    assert Q.dtype == torch.float32 and Q.shape == R.shape
    Q_t = torch_ops.cayley(R, m)
    R_ref = R64.clone().requires_grad_()
    Q_ref = reference.dense_cayley(R_ref)
    if masked:
        Q_ref = torch.where(mask[..., None, None], torch.eye(b, dtype=Q_ref.dtype), Q_ref)
    assert rel_err(Q, Q_ref) <= 1e-5
    assert rel_err(Q, Q_t) <= 1e-5
    eye = torch.eye(b, dtype=torch.float64)
    assert rel_err(Q.double().cpu() @ Q.double().cpu().transpose(-1, -2), eye.expand(N, D, b, b)) <= 1e-5

    G = torch.randn(N, D, b, b, dtype=torch.float64)
    (dR,) = torch.autograd.grad(Q, R, G.float().to(DEVICE))
    (dR_t,) = torch.autograd.grad(Q_t, R, G.float().to(DEVICE))
    (dR_ref,) = torch.autograd.grad(Q_ref, R_ref, G)
    assert dR.dtype == R.dtype
    assert rel_err(dR, dR_ref) <= 1e-5
    assert rel_err(dR, dR_t) <= 1e-5
    if masked:
        assert (dR.cpu()[mask] == 0).all()


# Blocks wider than the register kernel holds: the blocked solve (kernels/cayley_blocked.py) at its
# tile (one 129-wide block: a 1-wide last tile row and column), and at 16-wide tiles on narrow
# blocks (MAX_REGISTER_BLOCK lowered; the same kernels, cheaper to interpret): masked blocks,
# several levels, a partial last tile, large rotations.
# The diagonal tile's inverse as on a GPU (each step's programs invert it themselves) in the
# forced cases, from a launch of its own (the interpreter's default) at the default tile.
BLOCKED_CAYLEY_CASES = [(1, 1, 129, 1.0, False, None), (1, 3, 40, 1.0, True, 16), (1, 2, 33, 3.0, False, 16)]


@pytest.mark.parametrize("N,D,b,scale,masked,tile", BLOCKED_CAYLEY_CASES,
                         ids=[f"N{c[0]}-D{c[1]}-b{c[2]}-R{c[3]:g}-mask{int(c[4])}-P{c[5] or 'default'}"
                              for c in BLOCKED_CAYLEY_CASES])
def test_blocked_cayley(monkeypatch, N, D, b, scale, masked, tile):
    kcb = importlib.import_module("boft_triton.kernels.cayley_blocked")
    if tile is not None:
        monkeypatch.setattr(kc, "MAX_REGISTER_BLOCK", tile)
        monkeypatch.setattr(kcb, "TILE", tile)
        monkeypatch.setattr(kcb, "INVERT_IN_STEP", True)
    test_cayley(N, D, b, scale, masked)
    assert kc.LAST_LAUNCH["cayley_fwd"][0] == "blocked" and kc.LAST_LAUNCH["cayley_bwd"][0] == "blocked"
    assert -(-b // kcb.tile()) > 1  # several block columns: the update of every tile kind


def test_blocked_cayley_inverts_the_diagonal_tiles_of_several_blocks_per_program(monkeypatch):
    """The interpreter's diagonal-inverse launch takes INVERSE_BLOCKS blocks a program: 5 masked
    and unmasked blocks at 2 a program (the last program half empty), 32-wide tiles; values and
    dl/dR against the dense reference."""
    kcb = importlib.import_module("boft_triton.kernels.cayley_blocked")
    monkeypatch.setattr(kc, "MAX_REGISTER_BLOCK", 32)
    monkeypatch.setattr(kcb, "TILE", 32)
    monkeypatch.setattr(kcb, "INVERT_IN_STEP", False)
    monkeypatch.setattr(kcb, "INVERSE_BLOCKS", 2)
    launches, wrap = [], kcb.wrap_triton
    monkeypatch.setattr(kcb, "wrap_triton", lambda fn: launches.append(fn.__name__) or wrap(fn))
    test_cayley(1, 5, 70, 1.0, True)
    assert launches.count("_diagonal_inverse_kernel") == 3  # a launch per tile column (3), 3 programs each


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cayley_low_precision_params(dtype):
    """R in bf16/fp16: maths in fp32 on the rounded values, Q fp32, dl/dR in R's dtype."""
    R = torch.randn(2, 3, 6, 6).to(dtype).to(DEVICE).requires_grad_()
    Q = kc.cayley(R)
    assert Q.dtype == torch.float32
    Q_t = torch_ops.cayley(R)
    assert rel_err(Q, Q_t) <= 1e-5
    G = torch.randn_like(Q)
    (dR,) = torch.autograd.grad(Q, R, G)
    (dR_t,) = torch.autograd.grad(Q_t, R, G)
    assert dR.dtype == dtype
    assert rel_err(dR, dR_t) <= TOL[dtype]


# ---------------------------------------------------------------------------------------------
# butterfly

# (T, n, b, N, R scale): every b in {2,4,6,8,16,32,64} and odd b {3,5,45} with N=1; N from 1 to
# its maximum for (n=32, b=4); T in {1, 7, 129}; coarse-block counts that do not divide the tile.
BUTTERFLY_CASES = [
    (7, 8, 2, 1, 1.0),
    (7, 16, 2, 4, 1.0),
    (1, 12, 4, 1, 10.0),
    (7, 32, 4, 1, 1.0),
    (7, 32, 4, 2, 1e-4),
    (7, 32, 4, 3, 1.0),
    (7, 32, 4, 4, 10.0),
    (129, 32, 4, 3, 1.0),
    (7, 18, 6, 1, 1.0),
    (7, 36, 6, 2, 1.0),
    (1, 48, 6, 3, 10.0),
    (7, 48, 8, 2, 1.0),
    (129, 64, 8, 2, 1.0),
    (7, 48, 16, 1, 1.0),
    (7, 64, 16, 2, 1.0),
    (7, 64, 32, 1, 10.0),
    (1, 64, 32, 2, 1.0),
    (7, 128, 64, 1, 1.0),
    (7, 9, 3, 1, 1.0),
    (7, 15, 5, 1, 1e-4),
    (129, 90, 45, 1, 1.0),
]


def case_id(c):
    return f"T{c[0]}-n{c[1]}-b{c[2]}-N{c[3]}"


def check_butterfly(T, n, b, N, scale, transpose, dtype=torch.float32, mask=None):
    """Values and both gradients against the torch path and the dense fp64 reference."""
    D = n // b
    Q64 = rand_q(N, D, b, scale, mask)
    x64 = torch.randn(T, n, dtype=torch.float64)
    g64 = torch.randn(T, n, dtype=torch.float64)
    x = x64.to(dtype).to(DEVICE).requires_grad_()
    Q = Q64.float().to(DEVICE).requires_grad_()
    g = g64.to(dtype).to(DEVICE)

    y = kb.butterfly(x, Q, transpose)
    assert y.dtype == dtype and y.shape == x.shape
    dx, dQ = torch.autograd.grad(y, (x, Q), g)
    assert dx.dtype == dtype and dQ.dtype == torch.float32

    # dense fp64 reference on the same (rounded) inputs
    xr = x.detach().double().cpu().requires_grad_()
    Qr = Q.detach().double().cpu().requires_grad_()
    M = reference.dense_rotation(Qr)
    yr = xr @ (M.T if transpose else M)
    dxr, dQr = torch.autograd.grad(yr, (xr, Qr), g.double().cpu())
    tol = TOL[dtype]
    assert rel_err(y, yr) <= tol
    assert rel_err(dx, dxr) <= tol
    assert rel_err(dQ, dQr) <= tol
    if dtype == torch.float32:  # the torch path, same fp32 algorithm
        yt = torch_ops.butterfly(x, Q, transpose)
        dxt, dQt = torch.autograd.grad(yt, (x, Q), g)
        assert rel_err(y, yt) <= 1e-5
        assert rel_err(dx, dxt) <= 1e-5
        assert rel_err(dQ, dQt) <= 1e-5


@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("T,n,b,N,scale", BUTTERFLY_CASES, ids=[case_id(c) for c in BUTTERFLY_CASES])
def test_butterfly(T, n, b, N, scale, transpose):
    check_butterfly(T, n, b, N, scale, transpose)


# Large coarse blocks run as groups of factors, each with its own dense blocks; forced on small
# shapes by lowering the widest block a program holds.
GROUP_CASES = [(7, 64, 4, 4, 1.0), (129, 48, 6, 3, 1.0), (7, 64, 8, 3, 10.0), (1, 64, 2, 5, 1.0)]


@pytest.fixture
def narrow_blocks(monkeypatch):
    monkeypatch.setattr(kb, "MAX_BLOCK", 16)
    kb.plan.cache_clear()
    kb.fused_groups.cache_clear()
    yield
    kb.plan.cache_clear()
    kb.fused_groups.cache_clear()


@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("T,n,b,N,scale", GROUP_CASES, ids=[case_id(c) for c in GROUP_CASES])
def test_butterfly_factor_groups(narrow_blocks, T, n, b, N, scale, transpose):
    assert len(kb.plan(n, b, N)) > 1 and any(g["S"] > 1 for g in kb.plan(n, b, N))
    assert kb.fused_groups(n, b, N) is None  # these keep one pass per group
    check_butterfly(T, n, b, N, scale, transpose)


@pytest.mark.parametrize("n,b,N", [(64, 4, 4), (48, 6, 3), (64, 2, 5), (64, 4, 1), (45, 45, 1)], ids=lambda v: str(v))
def test_each_group_kernel_builds_the_reference_blocks(narrow_blocks, n, b, N):
    """The layout the kernels gather Q into is reference.group_blocks's: one group's kernel on the
    identity's rows is that group's matrix, for packed, padded, odd-b and interleaved groups."""
    Q = rand_q(N, n // b, b, 1.0).float().to(DEVICE)
    eye = torch.eye(n, device=DEVICE)
    groups = kb.plan(n, b, N)
    assert any(g["pack"] > 1 for g in groups) or any(g["S"] > 1 for g in groups) or n == 45
    for grp in groups:
        q = Q[grp["k0"]:grp["k1"]].contiguous()
        got = kb.block_apply(eye, q, False, grp["k0"], n, b, N)
        assert rel_err(got, reference.dense_group(Q.double().cpu(), grp["k0"], grp["k1"])) <= 1e-5, grp


# Coarse blocks wider than a program's widest block (L > 128) run in one pass (fused_groups): the
# row tile stays in registers while each group of levels is applied in turn. Chunks padded to a
# power of two (b=40: 20 -> 32), two to four groups, one and several coarse blocks, a partial tile.
FUSED_CASES = [(17, 160, 40, 3, 1.0), (33, 256, 16, 5, 1.0), (7, 320, 80, 2, 10.0), (1, 320, 20, 4, 1.0),
               (33, 512, 8, 6, 1.0)]


@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("T,n,b,N,scale", FUSED_CASES, ids=[case_id(c) for c in FUSED_CASES])
def test_butterfly_one_pass_over_factor_groups(T, n, b, N, scale, transpose):
    groups = kb.fused_groups(n, b, N)
    assert groups is not None and len(groups) > 1
    # every level once, highest first; each group within the widths that compile without spills
    assert [k for k0, k1 in reversed(groups) for k in range(k0, k1)] == list(range(N))
    check_butterfly(T, n, b, N, scale, transpose)


def test_one_pass_forward_reads_x_once_and_saves_only_x():
    """The forward over several groups is one launch that reads x and writes y once, and autograd
    keeps x and Q only (no intermediate between groups): the backward recomputes them."""
    n, b, N, T = 160, 40, 3, 16
    x = torch.randn(T, n, device=DEVICE, requires_grad=True)
    Q = rand_q(N, n // b, b, 1.0).float().to(DEVICE).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kb.butterfly(x, Q)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(T, n), tuple(Q.shape)])


def test_one_pass_backward_reduces_dq_deterministically_over_row_splits(monkeypatch):
    """With several row splits each pass writes its partial dMc and a small kernel adds them in
    split order: dQ is the same, bit for bit, whether the programs run in grid order or reversed,
    and agrees with the torch path."""
    n, b, N, T = 256, 16, 5, 200  # three groups (32, 32 and 16 wide) of one 256-wide coarse block
    monkeypatch.setattr(kb, "num_sms", lambda device: 64)
    assert kb.fused_backward(n, b, N) and kb._fused_splits(T, n, b, N, 64)[0] > 1
    check_grads_do_not_depend_on_program_order(monkeypatch, T, n, b, N)


@pytest.mark.parametrize("T,n,b,N,transpose", [(40, 320, 40, 3, False), (70, 512, 64, 3, True)],
                         ids=["b40-N3", "b64-N3-T"])
def test_one_pass_backward_of_three_64_wide_groups(monkeypatch, T, n, b, N, transpose):
    """40x3 and 64x3 (16K dMc values a group) take one pass over (x, g) per group below the
    coarse route's row counts (they took plan()'s passes): bf16 values and both gradients against
    the dense reference, a pass per group."""
    coarse = importlib.import_module("boft_triton.kernels.coarse")
    assert kb.fused_backward(n, b, N) and not coarse.takes(n, b, N, T, torch.bfloat16, True)
    passes, run_pass = [], kb._fused_grad_pass
    monkeypatch.setattr(kb, "_fused_grad_pass", lambda *a, **k: (passes.append(a[6]), run_pass(*a, **k))[1])
    check_butterfly(T, n, b, N, 1.0, transpose, dtype=torch.bfloat16)
    assert passes == [0, 1, 2] and kb.LAST_LAUNCH["butterfly_bwd_route"] == ("model", "groups")


def check_grads_do_not_depend_on_program_order(monkeypatch, T, n, b, N):
    """dx and dQ against the torch path, then bit for bit the same with the programs run in
    reverse (interpreter) or again (GPU)."""
    Q = rand_q(N, n // b, b).float().to(DEVICE).requires_grad_()
    x = torch.randn(T, n, device=DEVICE, requires_grad=True)
    g = torch.randn(T, n, device=DEVICE)
    first = torch.autograd.grad(kb.butterfly(x, Q), (x, Q), g)
    expected = torch.autograd.grad(torch_ops.butterfly(x, Q), (x, Q), g)
    assert rel_err(first[0], expected[0]) <= 1e-5 and rel_err(first[1], expected[1]) <= 1e-5
    if DEVICE.type == "cpu":
        _interpreter_runs_programs_in_reverse(monkeypatch)
    again = torch.autograd.grad(kb.butterfly(x, Q), (x, Q), g)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_one_pass_groups_fall_back_where_blocks_do_not_fit():
    """Shapes whose blocks do not fit on chip keep plan()'s passes; one-group shapes keep theirs."""
    assert kb.fused_groups(1024, 64, 2) is None  # L = 128: one group already
    assert kb.fused_groups(1280, 160, 2) is None  # one level is 160 wide (b > 128)
    assert kb.fused_groups(4096, 8, 7) is None  # L = 512 of 4-wide chunks: no cut of 16..128-wide groups fits
    assert kb.fused_groups(1024, 64, 3) == ((2, 3), (1, 2), (0, 1))
    assert kb.fused_groups(1024, 8, 6) == ((3, 6), (0, 3))  # balanced: 32 + 32, not 128 + 16
    # the backward holds one group's dMc for the coarse block: up to 8K values it does (8x6: two
    # 32-wide groups, one pass per group), 16K where the chunks are multiples of 4 columns (64x3,
    # 40x3: three 64-wide groups, their batched products cut to cover the warps); odd chunks at
    # 16K (34x3) and 80x2's 128-wide groups (2 x 128 x 128) spilled, and take the coarse route or
    # plan()'s passes
    assert kb.fused_backward(1024, 8, 6) and kb.fused_backward(256, 16, 5)
    assert kb.fused_backward(1024, 64, 3) and kb.fused_backward(1280, 40, 3)
    assert not kb.fused_backward(1088, 34, 3) and not kb.fused_backward(1280, 80, 2)
    assert kb.chain_passes(1024, 64, 3) == ("first", "acc", "last")  # its chain still accumulates 16K


# Coarse blocks whose groups do not fit on chip together (PEFT's multi-concept block_num=8, N=3 on
# Stable Diffusion's 640- and 768-wide layers: 80x3, 96x3) run the low levels' one-pass prefix
# (split_prefix) and a pass per higher group: two passes over x instead of three. One and several
# coarse blocks, 128-wide blocks, four levels, and enough rows at 640 (200) for the prefix's
# backward to take the dense coarse blocks.
SPLIT_CASES = [(7, 320, 80, 3, 1.0), (200, 640, 80, 3, 1.0), (9, 512, 128, 3, 10.0), (5, 1280, 80, 4, 1.0)]


@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("T,n,b,N,scale", SPLIT_CASES, ids=[case_id(c) for c in SPLIT_CASES])
def test_butterfly_one_pass_prefix_where_groups_do_not_fit(T, n, b, N, scale, transpose):
    assert kb.fused_groups(n, b, N) is None and kb.split_prefix(n, b, N) == 2
    assert [(g["k0"], g["k1"]) for g in kb.high_groups(n, b, N)] == [(k, k + 1) for k in reversed(range(2, N))]
    check_butterfly(T, n, b, N, scale, transpose)
    if T == 200:  # the prefix's backward through the dense coarse blocks, in 16 bits
        assert kb._coarse().takes(n, b, 2, T, torch.bfloat16, True)
        check_butterfly(T, n, b, N, scale, transpose, torch.bfloat16)
        assert kb.LAST_LAUNCH["butterfly_bwd_route"][1] == "coarse"


@pytest.mark.parametrize("frozen", ["Q", "x"])
def test_one_pass_prefix_with_one_input_frozen(frozen):
    """The split shape's backward with only dx wanted (the prefix's dx is its one-pass forward on g
    with the transpose flipped) or only dQ (no dx pass), against the torch path."""
    T, n, b, N = 9, 320, 80, 3
    Q = rand_q(N, n // b, b).float().to(DEVICE).requires_grad_(frozen != "Q")
    x = torch.randn(T, n, device=DEVICE, requires_grad=frozen != "x")
    g = torch.randn(T, n, device=DEVICE)
    wanted = x if frozen == "Q" else Q
    for transpose in (False, True):
        got = torch.autograd.grad(kb.butterfly(x, Q, transpose), wanted, g)[0]
        expected = torch.autograd.grad(torch_ops.butterfly(x, Q, transpose), wanted, g)[0]
        assert rel_err(got, expected) <= 1e-5


def test_one_pass_prefix_only_where_it_saves_passes():
    assert kb.split_prefix(1024, 64, 3) is None  # one pass already
    assert kb.split_prefix(1280, 80, 2) is None
    # plan(): two 128-wide groups of two levels; a three-level prefix leaves one: two passes either way
    assert kb.split_prefix(1024, 64, 4) is None
    assert kb.split_prefix(1280, 160, 3) is None  # levels wider than 128: the slab kernels
    assert kb.split_prefix(1280, 80, 4) == 2  # 4 passes -> 3
    assert kb.tuning_keys(640, 80, 3) == ((640, 80, 2), (640, 80, 3))
    assert kb.tuning_keys(1024, 64, 3) == ((1024, 64, 3),)
    assert kb.path_name(640, 80, 3, 1024, torch.bfloat16) == "dot128+fused128+128-bwd-coarse"
    names = [spec["name"] for spec in kb.launch_specs(640, 80, 3)]
    assert "fused[prefix]" in names and "apply[g0]" in names and "segmented[g2]" in names
    assert "apply[g1]" not in names and "segmented[prefix]" not in names  # the prefix's levels: plan()'s mixed batch only


LOWP_CASES = [(7, 32, 4, 3, 1.0), (129, 64, 8, 2, 1.0), (7, 45, 45, 1, 1.0), (7, 24, 6, 2, 1.0), (7, 160, 40, 3, 1.0)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,n,b,N,scale", LOWP_CASES, ids=[case_id(c) for c in LOWP_CASES])
def test_butterfly_low_precision(T, n, b, N, scale, dtype):
    check_butterfly(T, n, b, N, scale, transpose=(T == 7), dtype=dtype)


def test_butterfly_low_precision_factor_groups(narrow_blocks):
    check_butterfly(7, 64, 4, 4, 1.0, transpose=False, dtype=torch.bfloat16)


def test_small_blocks_are_packed_into_16_wide_dots():
    """b=4, N=1 (L=4): four coarse blocks form one 16-wide block-diagonal dot operand."""
    (grp,) = kb.plan(64, 4, 1)
    assert grp["pack"] == 4 and grp["WB"] == 16 and grp["NB"] == 4
    check_butterfly(7, 64, 4, 1, 1.0, transpose=False)


def test_butterfly_with_dropout_mask():
    """Some blocks are the identity (multiplicative dropout): cayley(R, mask) -> butterfly, with
    gradients to R through both kernels, against the torch path."""
    N, D, b, T = 3, 8, 4, 7
    R = (0.5 * torch.randn(N, D, b, b)).to(DEVICE).requires_grad_()
    x = torch.randn(2, T, D * b, device=DEVICE, requires_grad=True)  # leading shape [2, T]
    mask = torch.zeros(N, D, dtype=torch.bool, device=DEVICE)
    mask[1, torch.randperm(D)[: D // 2]] = True
    y = kb.butterfly(x, kc.cayley(R, mask))
    yt = torch_ops.butterfly(x, torch_ops.cayley(R, mask))
    g = torch.randn_like(y)
    dx, dR = torch.autograd.grad(y, (x, R), g)
    dxt, dRt = torch.autograd.grad(yt, (x, R), g)
    assert y.shape == x.shape
    assert rel_err(y, yt) <= 1e-5 and rel_err(dx, dxt) <= 1e-5 and rel_err(dR, dRt) <= 1e-5
    assert (dR[mask] == 0).all()


@pytest.mark.parametrize("n,b,N", [(32, 4, 3), (45, 45, 1), (48, 6, 3)], ids=lambda v: str(v))
def test_rotation_is_orthogonal(n, b, N):
    """M from the kernel (rows of I through it) is orthogonal, and transpose gives M^T (merge use)."""
    Q = rand_q(N, n // b, b, 2.0).float().to(DEVICE)
    eye = torch.eye(n, device=DEVICE)
    M = kb.butterfly(eye, Q)
    MT = kb.butterfly(eye, Q, True)
    assert rel_err(M @ M.T, eye) <= 1e-5
    assert rel_err(MT, M.T) <= 1e-5
    assert rel_err(M, reference.dense_rotation(Q.double().cpu())) <= 1e-5


def test_frozen_q():
    """Only x needs a gradient: dl/dx through the forward kernel with the flipped transpose."""
    Q = rand_q(2, 8, 4).float().to(DEVICE)
    x = torch.randn(129, 32, device=DEVICE, requires_grad=True)
    g = torch.randn(129, 32, device=DEVICE)
    (dx,) = torch.autograd.grad(kb.butterfly(x, Q), x, g)
    assert rel_err(dx, torch_ops.butterfly(g, Q, transpose=True)) <= 1e-5


def _interpreter_runs_programs_in_reverse(monkeypatch) -> list:
    """Make Triton's interpreter run each launch's programs in reverse grid order; returns the list
    of program ids as they run. (It runs them one at a time in grid order, so getting the same bits
    twice under the interpreter would show nothing about a GPU, where programs run in any order.)"""
    import builtins

    from triton.runtime import interpreter

    executor_code = interpreter.GridExecutor.__call__.__code__

    def grid_range(*args):  # only the grid loops of GridExecutor.__call__ run backwards
        steps = builtins.range(*args)
        return reversed(steps) if sys._getframe(1).f_code is executor_code else steps

    order = []
    set_grid_idx = interpreter.interpreter_builder.set_grid_idx
    monkeypatch.setattr(interpreter, "range", grid_range, raising=False)
    monkeypatch.setattr(interpreter.interpreter_builder, "set_grid_idx",
                        lambda *idx: (order.append(idx), set_grid_idx(*idx))[1])
    return order


@pytest.mark.parametrize("groups", [1, 2], ids=["one-group", "factor-groups"])
def test_dq_reduction_does_not_depend_on_program_order(monkeypatch, request, groups):
    """The dQ reduction is deterministic: each program writes its own partial dQ (no float atomics,
    whose sum would change with the order programs finish in), so dQ has the same bits whatever
    order the programs run in. Under the interpreter: grid order, then reversed. On a GPU: repeated
    launches of many programs. Both with one group of factors and with two (each its own pass)."""
    N, D, b = (2, 8, 4) if groups == 1 else (4, 16, 4)
    if groups > 1:
        request.getfixturevalue("narrow_blocks")
    assert len(kb.plan(D * b, b, N)) == groups
    Q = rand_q(N, D, b).float().to(DEVICE).requires_grad_()
    x = torch.randn(1000, D * b, device=DEVICE)
    g = torch.randn(1000, D * b, device=DEVICE)
    first = torch.autograd.grad(kb.butterfly(x, Q), Q, g)[0]
    if DEVICE.type == "cuda":
        for _ in range(20):
            assert torch.equal(torch.autograd.grad(kb.butterfly(x, Q), Q, g)[0], first)
        return
    order = _interpreter_runs_programs_in_reverse(monkeypatch)
    reversed_order = torch.autograd.grad(kb.butterfly(x, Q), Q, g)[0]
    assert len(set(order)) > 1 and order[0] != (0, 0, 0), "the programs must have run in another order"
    assert torch.equal(reversed_order, first)


@pytest.mark.parametrize("n,b,N", [(256, 128, 1), (256, 64, 2), (256, 32, 3)], ids=lambda v: str(v))
def test_pre_hopper_row_step_of_128_wide_groups(monkeypatch, n, b, N):
    """On sm_80 a 128-wide group's backward steps 16 rows in one stage when untuned (its row loop
    spilled at 64 and 32 rows); Hopper and the interpreter step 64 in the config's stages. Forced
    here: values and both gradients against the dense reference, rows not a multiple of either
    step, several row splits; narrower groups keep 64."""
    steps = []
    row_step = kb.row_step
    monkeypatch.setattr(kb, "row_step", lambda grp, cap: steps.append(row_step(grp, (8, 0))) or steps[-1])
    monkeypatch.setattr(kb, "num_sms", lambda device: 16)
    wide, narrow = kb.plan(256, 128, 1)[0], kb.plan(256, 64, 1)[0]
    assert row_step(wide, (8, 0)) == 16 and row_step(wide, (9, 0)) == kb.RC
    assert row_step(narrow, (8, 0)) == kb.RC and row_step(wide, None) == kb.RC
    assert kb.RC % kb.RC_SM80_WIDE == 0  # row splits hold whole steps
    assert kb.backward_stages(wide, (8, 0), "default", 2) == 1
    assert kb.backward_stages(wide, (8, 0), "cache", 2) == 2  # a tuned config is kept
    assert kb.backward_stages(wide, (9, 0), "default", 2) == 2
    assert kb.backward_stages(narrow, (8, 0), "default", 2) == 2
    assert all(g["WP"] == 128 for g in kb.plan(n, b, N)) and kb.fused_groups(n, b, N) is None
    check_butterfly(301, n, b, N, 1.0, False, dtype=torch.bfloat16)
    assert steps and set(steps) == {16}


@pytest.mark.parametrize("cap", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
@pytest.mark.parametrize("n,b,N,dtype", [(232, 116, 1, torch.bfloat16), (264, 66, 2, torch.float32)],
                         ids=["116x1-bf16", "66x2-fp32"])
def test_unaligned_128_wide_groups(monkeypatch, n, b, N, dtype, cap):
    """128-wide groups whose rows are not 16-byte aligned at their blocks (116; 66x2's 33-wide
    chunks) step 32 rows on Hopper, and before it write dx with the forward kernel (their dMc
    pass spilled 32-68 bytes with dx in it): values and both gradients against the dense
    reference, rows not a multiple of the step, several row splits; which kernel made dx."""
    monkeypatch.setattr(kb, "device_capability", lambda device: cap)
    monkeypatch.setattr(kb, "num_sms", lambda device: 16)
    groups = kb.plan(n, b, N)
    assert all(g["WP"] == 128 and not kb.rows_aligned(g) for g in groups)
    assert kb.rows_aligned(kb.plan(256, 128, 2)[0]) and kb.rows_aligned(kb.plan(240, 120, 1)[0])
    assert {kb.row_step(g, cap) for g in groups} == ({16} if cap == (8, 0) else {kb.RC_UNALIGNED})
    assert {kb.writes_dx(g, cap) for g in groups} == {cap != (8, 0)}
    applies = []
    apply_into = kb.apply_into
    monkeypatch.setattr(kb, "apply_into", lambda *args: applies.append(args[2]) or apply_into(*args))
    check_butterfly(301, n, b, N, 1.0, False, dtype=dtype)  # fp32 66x2: one-pass forward, plan()'s backward
    assert applies.count(True) == (len(groups) if cap == (8, 0) else 0)  # dx's own passes (the transpose flipped)


def test_one_split_backward_at_unaligned_rows_lifts_the_register_cap(monkeypatch):
    """Where the backward makes dQ in its one split and the rows are unaligned (28x1), ptxas's
    register cap is lifted (its guess spilled in the row loop on sm_80): launched so, values and
    both gradients against the dense reference."""
    grp = kb.plan(112, 28, 1)[0]
    assert kb.grad_registers(grp, True) == kb.MAX_REGISTERS and kb.grad_registers(grp, False) is None
    assert kb.grad_registers(kb.plan(256, 32, 1)[0], True) is None  # aligned: ptxas's own
    caps = []
    real = kb.register_cap
    monkeypatch.setattr(kb, "register_cap", lambda cap: caps.append(cap) or real(cap))
    check_butterfly(20, 112, 28, 1, 1.0, False, dtype=torch.bfloat16)
    assert caps[0] == kb.MAX_REGISTERS  # the backward's launch (one split: no dQ kernel after it)


@pytest.mark.parametrize("T, n, b, N, transpose, dtype, route", [
    (40, 192, 6, 6, False, torch.float32, None),  # one-pass backward
    (40, 192, 6, 6, True, torch.bfloat16, "groups"),
    (400, 160, 10, 5, False, torch.bfloat16, "coarse"),  # Delta_c build, chain passes
    (400, 160, 10, 5, True, torch.bfloat16, "coarse"),
])
def test_one_pass_kernels_read_narrow_chunks_padded(monkeypatch, T, n, b, N, transpose, dtype, route):
    """Chunks of 3 and 5 columns (b = 6, 10): the one-pass kernels read Q with each block's
    halves padded to the lanes' power-of-two chunk (gathered in place, 6x6's builds and dQ sweeps
    spilled), and dQ comes back in Q's layout. Values and both gradients against the dense
    reference, with every launch's Q padded."""
    assert [b_ for b_ in range(2, 130, 2) if kb.q_block(b_) != b_] == [6, 10]
    assert kb.q_block(6) == 8 and kb.q_block(10) == 16
    q = torch.randn(2, 3, 6, 6)
    padded = kb.padded_q(q, 6)
    assert padded.shape == (2, 3, 8, 8) and torch.equal(kb.unpadded_dq(padded, 6), q)
    assert torch.equal(padded[:, :, 0:3, 0:3], q[:, :, 0:3, 0:3]) and torch.equal(padded[:, :, 4:7, 4:7], q[:, :, 3:, 3:])
    assert padded[:, :, 3].abs().sum() == 0 and padded[:, :, :, 7].abs().sum() == 0  # the pad lanes: zero
    assert kb.padded_q(q[:, :, :4, :4].contiguous(), 4).shape == (2, 3, 4, 4)  # power-of-two chunks: as is
    seen = []
    real = kb.padded_q
    monkeypatch.setattr(kb, "padded_q", lambda q_, b_: seen.append(real(q_, b_).shape[-1]) or real(q_, b_))
    check_butterfly(T, n, b, N, 1.0, transpose, dtype=dtype)
    if route is not None:
        assert kb.LAST_LAUNCH["butterfly_bwd_route"] == ("model", route)
    assert set(seen) == {kb.q_block(b)}
    assert len(seen) == (3 if route == "coarse" else 2)  # the forward; the backward (coarse: Delta_c, the chain)


@pytest.mark.parametrize("T, transpose, dtype", [(40, False, torch.float32), (40, True, torch.bfloat16),
                                                 (2000, False, torch.bfloat16)])
def test_dq_sweep_of_four_8k_levels_in_block_chunks(T, transpose, dtype):
    """4x7's first group, four levels of 8K values: its dQ sweep spilled 28-80 bytes in one
    program, so the row pass leaves it to the dq kernel even with one row split, and that sweeps
    half the group's blocks per program; 8x6's three levels of 8K are swept in its row pass, half
    a group a program in the dq kernel. Launch specs as
    launched, and values and both gradients against the dense reference (T = 2000 in bf16: the
    chain passes of the coarse route)."""
    assert kb.fused_groups(256, 4, 7) == ((4, 7), (0, 4))
    assert (kb.sweep_blocks(7, 2, 0, 4), kb.sweeps_in_pass(7, 2, 0, 4)) == (4, False)  # of 8 blocks
    assert (kb.sweep_blocks(7, 2, 4, 7), kb.sweeps_in_pass(7, 2, 4, 7)) == (16, True)
    assert all(kb.sweeps_in_pass(6, 4, k0, k1) for k0, k1 in kb.fused_groups(256, 8, 6))
    assert kb.sweep_blocks(6, 4, 0, 3) == 4  # 8x6's dq kernel: half a group a program (triton 3.6: 36-56 bytes whole)
    specs = {spec["name"]: spec for spec in kb.launch_specs(1024, 4, 7)}
    assert "fused_grad_dq[1]" not in specs and "coarse_chain_dq[1]" not in specs and "fused_grad_dq[0]" in specs
    assert specs["fused_dq[1]"]["constexprs"]["ZC"] == 4 and specs["fused_dq[0]"]["constexprs"]["ZC"] == 16
    check_butterfly(T, 256, 4, 7, 1.0, transpose, dtype=dtype)
    if T == 2000:
        assert kb.LAST_LAUNCH["butterfly_bwd_route"] == ("model", "coarse")


def test_group_kernels_of_one_pass_shapes_take_their_own_tiles():
    """plan()'s group kernels of a one-pass shape (the per-group backward's recompute forward, the
    mixed-batch forward) launch plan()'s default tiles, not the one-pass forward's (16 rows, two
    stages: 106x2-122x2's recompute spilled 12-44 bytes on sm_80, 110x2's and 26x4-28x4's
    mixed-batch kernel 8-24), forced or tuned one-pass configs included; as the launch specs say.
    Values against the dense reference."""
    n, b, N = 424, 106, 2
    assert kb.fused_groups(n, b, N) is not None and not kb.fused_backward(n, b, N)
    plan_tiles = kb.group_default_config(n, b, N)
    assert plan_tiles == {"BT": 64, "PPS": 4, "num_warps": 8, "num_stages": 3}
    specs = {spec["name"]: spec for spec in kb.launch_specs(n, b, N)}
    assert specs["apply[g1]"]["config"] == specs["segmented[g0]"]["config"] == plan_tiles
    assert specs["fused"]["config"]["BT"] == 16
    one_pass = {"BT": 32, "PPS": 2, "num_warps": 4, "num_stages": 2}
    with kb.forced_config("fwd", one_pass):
        assert kb.pick_config("fwd", n, b, N, torch.bfloat16, torch.device("cpu")) == ("forced", one_pass)
        assert kb.group_config(n, b, N, torch.bfloat16, torch.device("cpu")) == ("default", plan_tiles)
        for name in ("butterfly_fwd", "butterfly_fused", "butterfly_segmented"):
            kb.LAST_LAUNCH.pop(name, None)
        check_butterfly(40, n, b, N, 1.0, False, dtype=torch.bfloat16)  # per-group backward: its recompute
        assert kb.LAST_LAUNCH["butterfly_fused"] == ("forced", one_pass)
        assert kb.LAST_LAUNCH["butterfly_fwd"] == ("default", plan_tiles)
        Q64 = torch.stack([rand_q(N, n // b, b) for _ in range(2)])
        x = torch.randn(50, n).to(torch.bfloat16)
        y = kb.segmented_butterfly(x.to(DEVICE), Q64.float().to(DEVICE), [0, 20, 50])
        assert kb.LAST_LAUNCH["butterfly_segmented"] == ("default", plan_tiles)
    x64 = x.double()
    expected = torch.cat([x64[:20] @ reference.dense_rotation(Q64[0]), x64[20:] @ reference.dense_rotation(Q64[1])])
    assert rel_err(y, expected) <= TOL[torch.bfloat16]
    # a shape without a one-pass forward: its forward pick, as before
    assert kb.group_config(512, 16, 1, torch.bfloat16, torch.device("cpu"))[1] == kb.default_config(512, 16, 1, "fwd")


def test_one_pass_kernels_at_unaligned_chunks(monkeypatch):
    """Where the one-pass kernels' chunks (b/2 columns) are not 16-byte aligned, the untuned
    forward takes one stage and the backward's passes lift ptxas's register cap (12x5 and 24x4
    spilled at ptxas's 128-register guess): launched so, as the compile report compiles them, and
    values and both gradients against the dense reference at 24x4."""
    assert [kb.chunks_aligned(b) for b in (12, 20, 24, 32, 48)] == [False, False, False, True, True]
    assert kb.fused_stages(24, "default", 2) == 1 and kb.fused_stages(24, "cache", 2) == 2  # a tuned config is kept
    assert kb.fused_stages(32, "default", 2) == 2 and kb.fused_grad_registers(32) is None
    specs = {spec["name"]: spec for spec in kb.launch_specs(768, 24, 4)}
    assert specs["fused"]["num_stages"] == 1 and specs["fused_grad[3]"]["options"] == {"maxnreg": kb.MAX_REGISTERS}
    stages, caps = [], []
    real_cap, real_stages = kb.register_cap, kb.fused_stages
    monkeypatch.setattr(kb, "register_cap", lambda cap: caps.append(cap) or real_cap(cap))
    monkeypatch.setattr(kb, "fused_stages", lambda *a: stages.append(real_stages(*a)) or stages[-1])
    check_butterfly(40, 768, 24, 4, 1.0, False, dtype=torch.bfloat16)
    assert stages == [1] and caps[1:5] == [kb.MAX_REGISTERS] * 4  # the forward, then the four groups' passes


# 128-wide groups of several levels whose chunks fill them (``blockwise``): factor tiles laid out
# from Q's blocks in the builds and in the one-split dQ sweep. 12x4's 6-wide chunks (96 of 128
# lanes, four levels) build Delta in chunks padded to 8 (``padded_build``), compacted for the
# rows' frame; 24x3's 12-wide ones (three levels) keep the gathers; both sweep dQ in the
# row-slab kernel.
BLOCKWISE_CASES = [(7, 128, 16, 4), (33, 256, 32, 3), (7, 128, 64, 2), (7, 256, 8, 5), (7, 96, 12, 4), (9, 96, 24, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("T,n,b,N", BLOCKWISE_CASES, ids=[case_id(c) for c in BLOCKWISE_CASES])
def test_blockwise_factor_tiles_of_128_wide_groups(monkeypatch, T, n, b, N, transpose, dtype):
    """One split, so dQ comes out of the row pass's own program where ``fuses_dq`` (Hopper and
    the interpreter) and from the row-slab kernel elsewhere; values and both gradients against
    the dense reference either way."""
    grp = kb.plan(n, b, N)[-1]
    filled = b not in (12, 24)  # power-of-two chunks
    assert grp["WP"] == 128 and grp["k1"] - grp["k0"] > 1 and kb._splits(T, grp, b, 4)[0] == 1
    assert kb.blockwise(grp) == filled and kb.padded_build(grp) == (b == 12)
    assert kb.fuses_dq(grp, 1, None) == kb.fuses_dq(grp, 1, (9, 0)) == filled
    assert not kb.fuses_dq(grp, 1, (8, 0)) and not kb.fuses_dq(grp, 1, (12, 0)) and not kb.fuses_dq(grp, 2, None)
    launched = []
    monkeypatch.setattr(kb, "_launch_dq", lambda *a, _f=kb._launch_dq: (launched.append(a[3]), _f(*a))[1])
    check_butterfly(T, n, b, N, 1.0, transpose, dtype=dtype)
    assert bool(launched) == (not filled)  # the one split's partial goes to the row-slab kernel
    # on a GPU fp32's groups of several levels take it too (the interpreter keeps the epilogue)
    assert kb.fuses_dq(grp, 1, None, dtype) == filled
    assert kb.fuses_dq(grp, 1, (9, 0), dtype) == (filled and dtype != torch.float32)
    if dtype == torch.float32 and filled:  # as a GPU runs fp32: the partial, then the row-slab kernel
        launched.clear()
        with monkeypatch.context() as gpu:
            gpu.setattr(kb, "device_capability", lambda device: (9, 0))
            check_butterfly(T, n, b, N, 1.0, transpose, dtype=dtype)
        assert launched == [1] * len(launched) and launched
    if filled:  # as sm_80 runs it
        monkeypatch.setattr(kb, "device_capability", lambda device: (8, 0))
        check_butterfly(T, n, b, N, 1.0, transpose, dtype=dtype)
        assert launched == [1] * len(launched) and launched


def test_one_split_dq_specs_follow_fuses_dq():
    """The compile report's grad_dq kernels are the ones launched: blockwise 128-wide groups on
    sm_90 only, in one stage; gathered ones (12x4) never; narrower groups on both archs."""
    specs = {s["name"]: s for s in kb.launch_specs(2048, 16, 4)}
    assert specs["grad_dq"]["archs"] == (90,) and specs["grad_dq"]["num_stages"] == 1
    assert specs["grad"].get("archs") is None and specs["grad"]["num_stages"] == 2
    assert "grad_dq" not in {s["name"] for s in kb.launch_specs(1536, 12, 4)}
    narrow = {s["name"]: s for s in kb.launch_specs(1024, 16, 3)}  # 64 wide, three levels
    assert narrow["grad_dq"].get("archs") is None and narrow["grad_dq"]["num_stages"] == 2


@pytest.mark.parametrize(
    "cfg_fwd,cfg_bwd",
    [({"BT": 32, "PPS": 1, "num_warps": 4}, {"num_warps": 4}),
     ({"BT": 128, "PPS": 8, "num_warps": 8, "num_stages": 2}, {"num_warps": 8, "num_stages": 3})],
    ids=["few-programs", "many-programs"],
)
def test_tile_configs_agree(cfg_fwd, cfg_bwd):
    """Other configs (rows not a multiple of the tile, programs looping over several tiles) give
    the same result, and the same dQ bits (the reduction does not depend on the config)."""
    T, n, b, N = 1040, 24, 4, 2  # 3 coarse blocks of 8, packed 3 to a 24-wide block
    assert kb._splits(T, kb.group(n, b, N, 0), b, kb.num_sms(DEVICE))[0] > 1  # the backward's dMc sums several row splits
    Q = rand_q(N, n // b, b).float().to(DEVICE).requires_grad_()
    x = torch.randn(T, n, device=DEVICE, requires_grad=True)
    g = torch.randn(T, n, device=DEVICE)
    with kb.forced_config("fwd", cfg_fwd), kb.forced_config("bwd", cfg_bwd):
        y = kb.butterfly(x, Q)
        dx, dQ = torch.autograd.grad(y, (x, Q), g)
    assert kb.LAST_LAUNCH["butterfly_fwd"] == ("forced", cfg_fwd)
    assert kb.LAST_LAUNCH["butterfly_bwd"] == ("forced", cfg_bwd)
    yt = torch_ops.butterfly(x, Q)
    dxt, dQt = torch.autograd.grad(yt, (x, Q), g)
    assert rel_err(y, yt) <= 1e-5 and rel_err(dx, dxt) <= 1e-5 and rel_err(dQ, dQt) <= 1e-5
    dQ_default = torch.autograd.grad(kb.butterfly(x, Q), Q, g)[0]
    assert torch.equal(dQ, dQ_default)


def test_backward_skips_dx_when_x_is_frozen():
    """Only Q needs a gradient (the first adapted layer of a frozen model): the fused backward
    writes no dx (its bytes drop by one pass over x) and dQ is unchanged."""
    T, n, b, N = 129, 32, 4, 2
    Q = rand_q(N, n // b, b).float().to(DEVICE).requires_grad_()
    x = torch.randn(T, n, device=DEVICE)
    g = torch.randn(T, n, device=DEVICE)
    calls = []
    original = kb.grad

    def spy(*args):
        calls.append(args[6])  # need_dx
        return original(*args)

    kb.grad = spy
    try:
        (dQ,) = torch.autograd.grad(kb.butterfly(x, Q), Q, g)
    finally:
        kb.grad = original
    assert calls == [False]
    (dQt,) = torch.autograd.grad(torch_ops.butterfly(x, Q), Q, g)
    assert rel_err(dQ, dQt) <= 1e-5


def test_empty_rows():
    Q = rand_q(2, 4, 4).float().to(DEVICE)
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y = kb.butterfly(x, Q)
    assert y.shape == (0, 16)


def test_ops_dispatch_uses_kernels(monkeypatch):
    """boft_triton.ops with BOFT_TRITON_BACKEND=triton reaches these kernels."""
    from boft_triton import ops

    monkeypatch.setenv("BOFT_TRITON_BACKEND", "triton")
    kb.LAST_LAUNCH.clear()
    R = torch.randn(2, 4, 4, 4, device=DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    y = ops.butterfly(x, ops.cayley(R))
    assert "butterfly_fwd" in kb.LAST_LAUNCH and "cayley_fwd" in kc.LAST_LAUNCH
    assert rel_err(y, torch_ops.butterfly(x, torch_ops.cayley(R))) <= 1e-5


def test_compile_fullgraph_one_frame():
    """torch.compile(fullgraph=True) traces cayley + butterfly (forward and backward) as one
    frame. On CUDA the ops are triton_ops and Inductor sees the kernels; under the interpreter
    they are opaque custom ops with fake implementations (aot_eager backend)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("inductor" if DEVICE.type == "cuda" else "aot_eager")

    def f(x, R):
        return kb.butterfly(x, kc.cayley(R), False)

    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    R = (0.3 * torch.randn(2, 4, 4, 4, device=DEVICE)).requires_grad_()
    w = torch.randn(5, 16, device=DEVICE)  # not |y|^2: M is orthogonal, so that has no dl/dR
    y = torch.compile(f, fullgraph=True, backend=backend)(x, R)
    (y * w).sum().backward()
    assert backend.frame_count == 1
    x2, R2 = x.detach().requires_grad_(), R.detach().requires_grad_()
    yt = torch_ops.butterfly(x2, torch_ops.cayley(R2))
    (yt * w).sum().backward()
    assert rel_err(y, yt) <= 1e-5 and rel_err(x.grad, x2.grad) <= 1e-5 and rel_err(R.grad, R2.grad) <= 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "version, numpy_version, interpreting, refused",
    [(None, "2.3.5", False, "triton"), ("3.5.1", "2.3.5", False, "triton>=3.6"),
     ("3.6.0", "2.4.0", True, "numpy<2.4"), ("3.6.0", "2.4.0", False, None), ("3.6.0", "2.3.5", True, None),
     ("3.7.1", "2.5.2", True, None)],
    ids=["missing", "too-old", "3.6-interpreter-numpy2.4", "3.6-gpu-numpy2.4", "3.6-interpreter-numpy2.3",
         "3.7.1-interpreter-numpy2.5"],
)
def test_import_guard(monkeypatch, version, numpy_version, interpreting, refused):
    """No triton, triton < 3.6, or Triton 3.6's interpreter with numpy >= 2.4 (which breaks it):
    importing the kernels raises ImportError saying what to install (ops.py falls back, or with
    BOFT_TRITON_BACKEND=triton says why); the combinations that work import."""
    import importlib.util
    import types

    if version is None:
        monkeypatch.setitem(sys.modules, "triton", None)
    else:
        fake = types.ModuleType("triton")
        fake.__version__ = version
        fake.language = types.ModuleType("triton.language")
        monkeypatch.setitem(sys.modules, "triton", fake)
        monkeypatch.setitem(sys.modules, "triton.language", fake.language)
    fake_numpy = types.ModuleType("numpy")
    fake_numpy.__version__ = numpy_version
    monkeypatch.setitem(sys.modules, "numpy", fake_numpy)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreting else "0")
    spec = importlib.util.spec_from_file_location("_guard_probe", kcommon.__file__)
    if refused is None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    else:
        with pytest.raises(ImportError, match=refused.replace("+", "\\+")):
            spec.loader.exec_module(importlib.util.module_from_spec(spec))


_SM90_SCRIPT = r"""
import importlib, json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import boft_triton
from boft_triton.bench import kernel_profile
kc = importlib.import_module("boft_triton.kernels.cayley")

def compile_(fn, sig, consts):
    sig = {**sig, **{k: "constexpr" for k in consts}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

for b in (5, 64):
    bp = triton.next_power_of_2(b)
    cst = dict(B=b, BP=bp, BN=max(1, 2048 // (bp * bp)), HAS_MASK=True)
    compile_(kc._cayley_fwd_kernel, {"r_ptr": "*bf16", "mask_ptr": "*i8", "q_ptr": "*fp32", "ainv_ptr": "*fp32", "NBLK": "i32"}, cst)
    compile_(kc._cayley_bwd_kernel, {"dq_ptr": "*fp32", "ainv_ptr": "*fp32", "mask_ptr": "*i8", "dr_ptr": "*bf16", "NBLK": "i32"}, cst)
kcb = importlib.import_module("boft_triton.kernels.cayley_blocked")
rows = [dict(n=1000, b=1000, N=1, L=1000, width=1000, levels=1, dtype="fp32", kernel=spec["name"], **kernel_profile.compile_stats(spec, 80))
        for spec in kcb.launch_specs(1000) if spec["name"].endswith(("step", "dr"))]  # the blocked Cayley's products, sm_80
rows += kernel_profile.compile_rows([4096], [(32, 2)], archs=(90,))
rows += kernel_profile.compile_rows([1024], [(64, 3)], archs=(90,))  # L = 256: one pass forward and per group backward
rows += kernel_profile.compile_rows([1280], [(80, 2)], archs=(90,))  # L = 160: one-pass forward, plan()'s backward
rows += kernel_profile.compile_rows([1280], [(40, 3)], archs=(80,), kernels=("fused", "coarse"))
rows += kernel_profile.compile_rows([1024], [(8, 6)], archs=(90,), kernels=("coarse_chain",))  # 3-level accumulating chains
rows += kernel_profile.compile_rows([2048], [(64, 2), (128, 1)], archs=(90,))  # the widest one-group blocks (L = 128)
rows += kernel_profile.compile_rows([1280], [(160, 1)], archs=(90,))  # one level wider than 128: the slab kernels
rows += kernel_profile.compile_rows([1152], [(144, 2)], archs=(80,), kernels=("wide_dx",))  # both gradients in one pass
# 161-192 wide: both gradients in one pass on Hopper only (before it, dx takes a pass of its own)
kb = importlib.import_module("boft_triton.kernels.butterfly")
for n, b, N in ((768, 96, 2), (768, 192, 1)):
    hopper = [spec for spec in kb.launch_specs(n, b, N) if "dx_grad" in spec["name"]]
    assert len(hopper) == 2 and all(spec["archs"] == (90,) for spec in hopper), hopper  # with and without fused dQ
    rows += [dict(n=n, b=b, N=N, L=b << (N - 1), kernel=spec["name"], width=spec["width"], levels=spec["levels"],
                  dtype="bf16", **kernel_profile.compile_stats(spec, 90)) for spec in hopper]
rows += kernel_profile.compile_rows([512], [(16, 2)], archs=(90,), dtype_name="fp32")
# 12x4's 6-wide chunks: the Delta build laid out in padded chunks (the gathered one spilled 4-96 bytes)
rows += [r for r in kernel_profile.compile_rows([768], [(12, 4)], archs=(90, 80), kernels=("apply", "segmented"))
         if (r["kernel"], r["arch"]) in (("apply", "sm_90"), ("segmented", "sm_80"))]
# 48x3: the one-pass forward and the first chain pass with the register cap lifted (128: 4-12 bytes)
rows += [r for r in kernel_profile.compile_rows([768], [(48, 3)], archs=(90,), kernels=("fused_T", "coarse_chain_direct[0]"))
         if r["kernel"] in ("fused_T", "coarse_chain_direct[0]")]
# 193-256 wide: both gradients from the two-half dMc pass, on sm_80 too (64x3's are above, on sm_90)
rows += kernel_profile.compile_rows([512], [(256, 1)], archs=(80,), kernels=("wide_dx_grad",))
# rows not 16-byte aligned at a block (b not a multiple of 8): the forward on 8 warps, the dMc
# passes on one stage (164 on Hopper with dx; 196 before it, dx its own pass: 4-80 bytes at 4
# warps, 2 stages)
rows += kernel_profile.compile_rows([656], [(164, 1)], archs=(90,), kernels=("wide_dx", "wide_T"))
rows += kernel_profile.compile_rows([784], [(196, 1)], archs=(80,), kernels=("wide_dx", "wide"))
rows += kernel_profile.compile_rows([1320], [(330, 1)], archs=(80,), kernels=("wide_grad",))  # 16-row steps
rows += kernel_profile.compile_rows([1344], [(168, 2)], archs=(90,), kernels=("wide_dx",))  # strided: b/2-column runs
# 128-wide groups whose rows are not 16-byte aligned at their blocks (116, and 118x2's 59-wide
# chunks): 32-row steps on Hopper, dx its own pass before it (32-68 bytes in the loop otherwise);
# the Delta_c build with its one-level first group gathered and no held identity tile (8-32 bytes)
rows += kernel_profile.compile_rows([464], [(116, 2)], archs=(90, 80), kernels=("grad", "coarse_delta"))
rows += kernel_profile.compile_rows([472], [(118, 2)], archs=(90,), kernels=("grad",))
rows += kernel_profile.compile_rows([512], [(128, 2)], archs=(90, 80), kernels=("coarse_delta",))  # first group gathered
# chunks not 16-byte aligned in the one-pass kernels: 12x5's forward on one stage, 24x4's last
# backward pass with the register cap lifted (ptxas's 128-register guess spilled 16 and 8 bytes);
# 256x2's strided two-half pass with dx before Hopper (a tile's columns one chunk each: 4 bytes);
# fp32's slab dMc pass at 192x2's strided level on three stages (4-8 bytes at two)
def exact(n, b, N, names, arch, dtype_name="bf16"):
    return [dict(n=n, b=b, N=N, L=b << (N - 1), kernel=spec["name"], width=spec["width"], levels=spec["levels"],
                 dtype=dtype_name, strict=True, **kernel_profile.compile_stats(spec, arch))
            for spec in kb.launch_specs(n, b, N, dtype_name) if spec["name"] in names]
rows += exact(384, 12, 5, ("fused",), 90) + exact(768, 24, 4, ("fused_grad[3]",), 90)
rows += exact(1024, 256, 2, ("wide_dx_grad_halves[g0]",), 80) + exact(768, 192, 2, ("wide_grad[l1]",), 80, "fp32")
# 6x6's forward (3-column chunks) reading Q padded (gathered: 100-116 bytes); the kernel adding
# 8x6's row-split partials at its own 8 warps (at the row passes' 4: 356-460 bytes)
rows += exact(768, 6, 6, ("fused",), 90) + exact(768, 6, 6, ("fused",), 80)
rows += exact(1024, 8, 6, ("fused_dq[0]", "fused_dq[1]"), 80)
rows += exact(1024, 4, 7, ("fused_dq[1]",), 90)  # 4x7's four 8K levels swept in half-group chunks (28 bytes whole)
# 34x3's accumulating chain pass, a half coarse block a program and its batched products cut to
# cover the warps (whole and uncut: 24-76 bytes in the loop)
rows += exact(1088, 34, 3, ("coarse_chain[1]", "coarse_chain_dq[1]"), 90)
rows += exact(1088, 34, 3, ("coarse_chain[1]", "coarse_chain_dq[1]"), 80)
# plan()'s group kernels of one-pass shapes on plan()'s tiles (on the one-pass forward's: 44 and 8 bytes)
rows += exact(488, 122, 2, ("apply[g1]",), 80) + exact(440, 110, 2, ("segmented[g0]",), 90)
# 257-384-wide forwards holding their Delta slab as two tiles, 128 columns a slab (wide.held_tail);
# 376's dx on one stage (at two, 4 bytes on sm_80)
rows += exact(640, 320, 1, ("wide", "wide_T"), 80) + exact(752, 376, 1, ("wide_T",), 80)
# K-split levels: 16-bit past 512 wide, fp32's forward past 256
rows += [dict(r, kernel=r["kernel"] + "_ksplit") for r in kernel_profile.compile_rows([2048], [(1024, 1)], archs=(80,))
         + kernel_profile.compile_rows([1024], [(512, 1)], archs=(80,), dtype_name="fp32")
         if r["kernel"] == "wide" or (r["kernel"] == "wide_grad_dq" and r["dtype"] == "bf16")]
print("ROWS" + json.dumps([{k: r.get(k, False) for k in ("n", "b", "N", "L", "kernel", "width", "levels", "dtype", "spill_bytes", "smem_fits", "regs_fit", "tensor_core", "strict")} for r in rows]))
"""


# The compile script's process, started by conftest when the session begins (where this test is
# selected), so its minute of compiles runs on the other core beside the interpreted tests.
SM90_COMPILE: dict = {}


def start_sm90_compile():
    """``_SM90_SCRIPT`` in a subprocess without the interpreter (this module interprets)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", _SM90_SCRIPT], env=env, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kernels_compile_for_sm90():
    """Every kernel compiles ahead of time for an H100 (sm_90) down to a cubin (the interpreter
    accepts code a GPU compile rejects), at the launcher's config with launch-time alignment, and
    the butterfly kernels do not spill and use tensor cores (bf16, and fp32 via tf32x3) at
    L >= 32. A cheap subset of ``python -m boft_triton.bench.kernel_profile compile``; runs in a
    subprocess because this module interprets."""
    import json
    import subprocess

    pytest.importorskip("triton.backends.nvidia")
    proc = SM90_COMPILE.pop("proc", None) or start_sm90_compile()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode and "ptxas" in stderr and "not found" in stderr.lower():
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, stderr[-4000:]
    rows = json.loads(stdout.split("ROWS", 1)[1])
    assert {r["kernel"] for r in rows} >= {"apply", "apply_T", "grad", "grad_dq", "dq", "grad[g0]", "grad[g1]", "fused",
                                           "fused_T", "wide", "wide_T", "wide_grad_pair", "wide_grad_dq_pair", "wide_dq",
                                           "coarse_dmc_grad_pair", "coarse_chain_direct[0]", "coarse_chain_dq[1]",
                                           "coarse_dmc_dx_grad_pair", "coarse_delta", "coarse_delta_T",
                                           "wide_dx_grad_pair", "wide_dx_grad_dq_pair[g1]", "wide_ksplit",
                                           "wide_grad_dq_ksplit", "cayley_blocked_step", "cayley_blocked_dr",
                                           "coarse_dmc_dx_grad_halves", "wide_dx_grad_halves", "segmented"}
    assert {(r["b"], r["N"], r["dtype"]) for r in rows if r["strict"]} == {(12, 5, "bf16"), (24, 4, "bf16"),
                                                                          (256, 2, "bf16"), (192, 2, "fp32"),
                                                                          (6, 6, "bf16"), (8, 6, "bf16"),
                                                                          (4, 7, "bf16"), (122, 2, "bf16"),
                                                                          (110, 2, "bf16"), (320, 1, "bf16"),
                                                                          (376, 1, "bf16"), (34, 3, "bf16")}
    assert {r["kernel"] for r in rows if r["strict"] and r["b"] == 8} == {"fused_dq[0]", "fused_dq[1]"}
    for r in rows:
        assert r["smem_fits"] and r["regs_fit"], r  # else the launch fails on that GPU
        # zero spills, but in the dQ epilogue (once per program, after the row loop) where it holds
        # several fp32 tiles: in the backward of 128-wide blocks of several levels, and for fp32
        # inputs (tf32x3: three operand tiles per product)
        wide_backward = r["width"] > 64 and r["levels"] > 1 and not r["kernel"].startswith("apply")
        fp32_epilogue = r["dtype"] == "fp32" and r["kernel"].startswith(("grad_dq", "dq"))
        if r["strict"]:  # the rows picked for a spill fixed by config: none
            assert r["spill_bytes"] == 0, r
        elif r["kernel"].startswith("fused_grad"):  # one-pass backward: a group's dMc + the others' blocks
            assert r["spill_bytes"] <= 128, r
        elif r["kernel"].startswith("coarse_chain"):  # whatever the group's width: none
            assert r["spill_bytes"] == 0, r
        elif not (wide_backward or fp32_epilogue):
            assert r["spill_bytes"] == 0, r
        if r["L"] >= 32 and not (r["kernel"].startswith(("dq", "wide_dq", "coarse_dmc_dq", "fused_dq")) and r["levels"] == 1):  # dQ = dMc: no product
            assert r["tensor_core"] > 0, r


# Groups of several levels whose dMc comes in row splits: dQ in row slabs, one level per program
# (``_dq_rows_kernel``): two 128-wide groups (the second strided, S = 4), a strided 64-wide group of
# two levels (S = 8), packed blocks.
DQ_ROWS_CASES = [(300, 512, 64, 4, False, torch.float32), (400, 512, 32, 5, True, torch.bfloat16),
                 (400, 64, 2, 3, True, torch.float32)]


@pytest.mark.parametrize("T,n,b,N,transpose,dtype", DQ_ROWS_CASES,
                         ids=[f"T{c[0]}-n{c[1]}-b{c[2]}-N{c[3]}-{str(c[5])[6:]}" for c in DQ_ROWS_CASES])
def test_dq_of_several_levels_in_row_slabs(monkeypatch, T, n, b, N, transpose, dtype):
    monkeypatch.setattr(kb, "num_sms", lambda device: 64)  # several row splits at these row counts
    launched = []
    monkeypatch.setattr(kb, "_launch_dq", lambda *a, _f=kb._launch_dq: (launched.append(a[4]), _f(*a))[1])
    check_butterfly(T, n, b, N, 1.0, transpose, dtype=dtype)
    several = [grp for grp in launched if grp["k1"] - grp["k0"] > 1]
    assert several and (N == 3 or any(grp["S"] > 1 for grp in several)) and (N != 3 or several[0]["pack"] > 1)


def test_only_fp64_takes_the_torch_path_on_a_gpu():
    """On a GPU, ops.butterfly sends every bf16/fp16/fp32 layer shape to the kernels, however wide
    its blocks (levels past what a slab holds run K-split), and fp64 to the torch path."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, b, N in ((4096, 32, 2), (4096, 4, 4), (4096, 64, 3), (1280, 160, 1), (1536, 192, 3), (4096, 512, 1),
                        (4096, 1024, 1), (8192, 2048, 2), (16384, 4096, 1)):
            assert kb.runs_on_gpu(n, b, N, dtype), (n, b, N, dtype)
    assert not kb.runs_on_gpu(1024, 8, 2, torch.float64)


class _SeenAsCuda(torch.Tensor):
    """A CPU tensor that says it is on a GPU, to reach ops.butterfly's GPU routing here."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.skipif(DEVICE.type == "cuda", reason="routing is checked with a CPU tensor posing as CUDA")
def test_ops_routes_only_fp64_to_the_torch_path_on_a_gpu(monkeypatch):
    from boft_triton import ops

    monkeypatch.setenv("BOFT_TRITON_BACKEND", "triton")
    launched = []
    monkeypatch.setattr(kb, "butterfly", lambda *args: launched.append(args) or args[0])
    Q = rand_q(1, 1, 1024).float()  # one 1024-wide level
    x = torch.Tensor._make_subclass(_SeenAsCuda, torch.randn(3, 1024))
    ops.butterfly(x, Q)  # fp32 at 1024 wide: the slab kernels, K-split
    ops.butterfly(x.bfloat16(), Q)  # bf16 too
    ops.butterfly(x[:, :256], rand_q(2, 8, 32).float())  # fp32 at 32 x 2 (64 wide): level by level
    assert len(launched) == 3
    y = ops.butterfly(x.double(), Q.double())
    assert len(launched) == 3
    assert torch.allclose(y.as_subclass(torch.Tensor), torch_ops.butterfly(x.as_subclass(torch.Tensor).double(), Q.double()))


@pytest.mark.parametrize("width", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_block_products_keep_fp32_range_on_a_gpu(dtype, width):
    """dMc sums T rows of (loss-scaled) gradients: its products on a GPU never take fp16 operands
    (an fp16 dQ overflowed to inf at |dMc| ~ 2e5 in review), and up to 64 wide they stay fp32
    (tf32), which keeps large rotations as accurate as an exact build."""
    with kb._compiling():
        meta = kb._dot_meta(dtype, width)
    assert meta["BUILD_DTYPE"] in (kb.tl.float32, kb.tl.bfloat16)
    assert (meta["BUILD_DTYPE"] == kb.tl.float32) == (width <= 64 or dtype == torch.float32)


# (segment lengths, n, b, N): packed small blocks, several levels, an odd width, two factor
# groups (L = 256), an empty segment, K = 1 and K = 4
SEGMENTED_CASES = [
    ([7], 32, 4, 2),
    ([5, 0, 9, 3], 32, 4, 3),
    ([3, 70, 1], 48, 8, 2),
    ([2, 4, 6, 8], 15, 5, 1),
    ([9, 4], 256, 8, 6),
    ([1, 2, 3, 4], 64, 64, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths,n,b,N", SEGMENTED_CASES, ids=[f"K{len(c[0])}-n{c[1]}-b{c[2]}-N{c[3]}" for c in SEGMENTED_CASES])
def test_segmented_butterfly(lengths, n, b, N, dtype):
    """Rows of segment k times adapter k's M, every segment in one launch per factor group, against
    the dense fp64 reference per segment; every output element written (NaN-filled outputs)."""
    K = len(lengths)
    Q64 = torch.stack([rand_q(N, n // b, b) for _ in range(K)])
    x64 = torch.randn(sum(lengths), n, dtype=torch.float64)
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    x = x64.to(dtype).to(DEVICE)
    y = kb.segmented_butterfly(x, Q64.float().to(DEVICE), offsets)
    assert y.dtype == dtype and y.shape == x.shape
    assert kb.LAST_LAUNCH["butterfly_segmented"][0] == "default"
    expected = torch.cat([x.double().cpu()[offsets[k]:offsets[k + 1]] @ reference.dense_rotation(Q64[k].float().double())
                          for k in range(K)])
    assert rel_err(y, expected) <= TOL[dtype]


def test_segmented_butterfly_refuses_bounds_that_do_not_cover_the_rows():
    Q = torch.stack([rand_q(1, 4, 4).float() for _ in range(2)]).to(DEVICE)
    x = torch.randn(5, 16, device=DEVICE)
    for offsets in ([0, 5], [0, 2, 4], [1, 2, 5]):
        with pytest.raises(ValueError, match="K \\+ 1 bounds"):
            kb.segmented_butterfly(x, Q, offsets)
