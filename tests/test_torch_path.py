"""The torch path of the functional ops against the dense fp64 reference of DESIGN.md section 1."""

import pytest
import torch

from boft_triton import geometry, torch_ops
from boft_triton.reference import dense_cayley, dense_group, dense_permutation, dense_rotation, group_blocks
from tiny_models import rel_err

CASES = [(8, 2, 1), (8, 2, 2), (12, 3, 1), (32, 2, 3), (32, 4, 3), (48, 6, 2), (64, 4, 4), (45, 45, 1)]


@pytest.mark.parametrize("scale", [1e-4, 1.0, 10.0], ids=lambda s: f"R{s:g}")
@pytest.mark.parametrize("n,b,N", CASES, ids=[f"n{n}-b{b}-N{N}" for n, b, N in CASES])
def test_cayley_matches_dense_and_is_orthogonal(n, b, N, scale):
    R = torch.randn(N, n // b, b, b, dtype=torch.float64) * scale
    Q = torch_ops.cayley(R)
    assert Q.dtype == torch.float32
    assert rel_err(Q, dense_cayley(R)) < 1e-5
    eye = torch.eye(b, dtype=torch.float64)
    assert (Q.double().transpose(-1, -2) @ Q.double() - eye).abs().max() < 1e-5


def test_cayley_mask_gives_identity():
    R = torch.randn(2, 4, 3, 3)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    Q = torch_ops.cayley(R, mask)
    assert torch.equal(Q[1, 2], torch.eye(3))
    assert not torch.allclose(Q[0, 2], torch.eye(3))


@pytest.mark.parametrize("transpose", [False, True], ids=["xM", "xMT"])
@pytest.mark.parametrize("n,b,N", CASES, ids=[f"n{n}-b{b}-N{N}" for n, b, N in CASES])
def test_butterfly_values_and_gradients_match_dense(n, b, N, transpose):
    T = 7
    R = (torch.randn(N, n // b, b, b, dtype=torch.float64) * 0.5).requires_grad_()
    x = torch.randn(3, T, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, T, n, dtype=torch.float64)

    M = dense_rotation(dense_cayley(R))
    ref = x @ (M.T if transpose else M)
    ref_grads = torch.autograd.grad(ref, (x, R), g)

    y = torch_ops.butterfly(x.float(), torch_ops.cayley(R), transpose).double()
    grads = torch.autograd.grad(y, (x, R), g)
    assert rel_err(y, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-4


def test_butterfly_keeps_dtype_and_is_orthogonal():
    n, b, N = 32, 4, 3
    Q = torch_ops.cayley(torch.randn(N, n // b, b, b))
    x = torch.randn(5, n)
    y = torch_ops.butterfly(x, Q)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # M is orthogonal
    assert torch.allclose(torch_ops.butterfly(y, Q, transpose=True), x, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch_ops.butterfly(x.to(dtype), Q).dtype == dtype
        assert rel_err(torch_ops.butterfly(x.to(dtype), Q), y) < 1e-2


def test_permutation_matches_design_description():
    # n=16, b=4, level 1: groups of 8, chunks of 2: [c0 c1 c2 c3] -> [c0 c2 c1 c3]
    perm = geometry.butterfly_perm(16, 4, 1)
    assert perm[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    P = dense_permutation(16, 4, 1)
    assert torch.equal(P[torch.arange(16), perm], torch.ones(16, dtype=P.dtype))
    assert torch.equal(geometry.butterfly_perm(16, 4, 0), torch.arange(16))


@pytest.mark.parametrize("N", [1, 3])
def test_butterfly_saves_one_row_of_input_per_row(N):
    """Activation memory of the op is x itself: the saved bytes grow by n floats per extra row
    whatever the number of factors (the rest is O(n L) rotation blocks, independent of T)."""
    n, b = 32, 2
    Q = torch_ops.cayley(torch.randn(N, n // b, b, b)).requires_grad_()

    def saved_numel(T):
        x = torch.randn(T, n, requires_grad=True)
        seen = {}

        def pack(t):  # count each saved storage once
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch_ops.butterfly(x, Q)
        return sum(seen.values()) // 4

    assert saved_numel(128) - saved_numel(64) == 64 * n


@pytest.mark.parametrize("n,b,N,k", [(32, 4, 3, 1), (48, 6, 3, 2), (64, 2, 5, 3)], ids=lambda v: str(v))
def test_group_blocks_are_the_factors_of_m(n, b, N, k):
    """The kernels' block layout: all factors at once gives M's coarse blocks; two groups (low
    levels 0..k-1 contiguous, high levels k..N-1 on interleaved columns) multiply back to M."""
    Q = dense_cayley(torch.randn(N, n // b, b, b, dtype=torch.float64))
    M = dense_rotation(Q)
    assert rel_err(group_blocks(Q.float(), 0, N), torch_ops.coarse_blocks(Q.float())) < 1e-6
    assert rel_err(dense_group(Q, k, N) @ dense_group(Q, 0, k), M) < 1e-12  # x M = (x M_high) M_low


def test_blocks_are_reused_without_gradients_and_never_stale():
    """Inference reuses one Q's packed coarse blocks; an in-place change, a new tensor (even at a
    freed address) or a call that needs gradients builds them anew."""
    from boft_triton import reference, torch_ops

    x = torch.randn(5, 32, dtype=torch.float64)
    for _ in range(20):  # fresh tensors, some at addresses just freed: each must give its own answer
        Q = torch_ops.cayley(torch.randn(2, 8, 4, 4))
        with torch.no_grad():
            y = torch_ops.butterfly(x.float(), Q)
        assert torch.allclose(y.double(), x @ reference.dense_rotation(Q.double()), atol=1e-5)
    with torch.no_grad():
        first = torch_ops.butterfly(x.float(), Q)
        assert torch.equal(torch_ops.butterfly(x.float(), Q), first)
        Q.mul_(0.5)  # in place: the version counter moves
        changed = torch_ops.butterfly(x.float(), Q)
        assert torch.equal(changed, torch_ops.butterfly(x.float(), Q.clone())) and not torch.allclose(changed, first)
    Qg = Q.clone().requires_grad_()
    y = torch_ops.butterfly(x.float(), Qg)
    assert y.requires_grad


def test_inference_memo_keys_by_kind_and_sees_storage_swaps():
    """Two things derived from one tensor never mix; a ``.data`` swap under the same Parameter
    (what ``module.to()`` may do) and an in-place change both rebuild; with gradients nothing is kept."""
    from boft_triton.inference_memo import memoised

    t = torch.nn.Parameter(torch.ones(3))
    with torch.no_grad():
        doubled = memoised("double", (t,), lambda: t * 2)
        assert memoised("double", (t,), lambda: "rebuilt") is doubled
        assert memoised("triple", (t,), lambda: t * 3)[0].item() == 3
        t.data = torch.full((3,), 5.0)
        assert memoised("double", (t,), lambda: t * 2)[0].item() == 10
        t.add_(1)
        assert memoised("double", (t,), lambda: t * 2)[0].item() == 12
    assert memoised("double", (t,), lambda: "built") == "built"
