"""Microbenchmarks of the two ops, forward and forward + backward (pytest-benchmark).

    python -m pytest bench/test_micro_ops.py --benchmark-only
    python -m pytest bench/test_micro_ops.py --benchmark-only -k cuda --benchmark-json out.json

Every case first checks its op's result (and, for fwdbwd, its gradients) against the dense fp64
reference (``boft_triton.reference``), then times it. ``--benchmark-disable`` runs each case once,
checks only: that is how the test suite runs this file (``tests/test_micro_ops_checks.py``).
Implementations:

- ``torch``: the torch path (``boft_triton.torch_ops``), what CPU tensors use; on CPU and CUDA.
- ``triton``: the Triton kernels (``BOFT_TRITON_BACKEND=triton``); CUDA only, skipped without a GPU.
- ``dense``: PEFT's way, the rotation built as a dense n x n matrix (block_diag, permutation
  matrices, products) and multiplied in, for scale.

Each benchmark's ``extra_info`` holds the bytes an ideal kernel moves (activations in and out,
each once) and the bandwidth that implies at the median time, so kernels can be read as a
fraction of the device's memory bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from boft_triton import ops, reference, torch_ops
from boft_triton.geometry import resolve_geometry

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU: the Triton kernels are benchmarked on GPUs only")

# (T rows, n width, b block size, N factors)
BUTTERFLY_CPU = [(2048, 384, 4, 1), (2048, 384, 8, 2), (2048, 384, 4, 4), (2048, 1536, 16, 2)]
BUTTERFLY_CUDA = [(8192, 2048, 4, 1), (8192, 2048, 8, 2), (8192, 2048, 4, 4), (8192, 2048, 16, 4),
                  (8192, 8192, 8, 2), (16384, 3072, 32, 1)]
# (N factors, D blocks, b block size)
CAYLEY_CPU = [(1, 96, 4), (2, 48, 8), (4, 96, 4), (1, 12, 32)]
CAYLEY_CUDA = [(1, 512, 4), (2, 256, 8), (4, 512, 4), (4, 512, 16), (1, 64, 32), (1, 32, 64)]


def _ids(fmt, cases):
    return [fmt.format(*c) for c in cases]


def _butterfly_fn(impl: str):
    if impl == "torch":
        return torch_ops.butterfly
    if impl == "triton":
        return ops.butterfly  # with BOFT_TRITON_BACKEND=triton (set by the fixture)
    if impl == "dense":
        return _dense_butterfly
    raise ValueError(impl)


def _dense_butterfly(x, Q, transpose=False):
    """PEFT's computation: M = prod_i P_i blockdiag(Q_i) P_i^T as dense n x n, then x M."""
    N, D, b, _ = Q.shape
    n = D * b
    M = torch.eye(n, device=x.device, dtype=torch.float32)
    for level in range(N):
        P = _perm_matrix(n, b, level, x.device)
        M = P @ torch.block_diag(*Q[level].unbind(0)) @ P.T @ M
    return (x.float() @ (M.T if transpose else M)).to(x.dtype)


_PERMS: dict = {}


def _perm_matrix(n, b, level, device):
    from boft_triton.geometry import butterfly_perm

    key = (n, b, level, str(device))
    if key not in _PERMS:
        P = torch.zeros(n, n, device=device)
        P[torch.arange(n), butterfly_perm(n, b, level).to(device)] = 1
        _PERMS[key] = P
    return _PERMS[key]


def _cayley_fn(impl: str):
    if impl == "torch":
        return torch_ops.cayley
    if impl == "triton":
        return ops.cayley
    raise ValueError(impl)


@pytest.fixture
def backend(request, monkeypatch):
    impl = request.param
    if impl == "triton":
        monkeypatch.setenv("BOFT_TRITON_BACKEND", "triton")
    else:
        monkeypatch.delenv("BOFT_TRITON_BACKEND", raising=False)
    return impl


def _sync_after(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _assert_close(name, got, expected, dtype):
    """Relative error in norm against the fp64 reference, at the tolerance of the op's dtype."""
    got, expected = got.detach().double(), expected.detach().double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def _check_butterfly(fn, x, Q, g, mode):
    """``y = x M`` and, for fwdbwd, ``dl/dx`` and ``dl/dQ`` against the dense rotation in fp64."""
    x64 = x.detach().double().requires_grad_()
    Q64 = Q.detach().double().requires_grad_()
    y64 = x64 @ reference.dense_rotation(Q64)
    if mode == "fwd":
        with torch.no_grad():
            _assert_close("y", fn(x, Q), y64, x.dtype)
        return
    y = fn(x, Q)
    _assert_close("y", y, y64, x.dtype)
    dx, dQ = torch.autograd.grad(y, (x, Q), g)
    dx64, dQ64 = torch.autograd.grad(y64, (x64, Q64), g.double())
    _assert_close("dl/dx", dx, dx64, x.dtype)
    _assert_close("dl/dQ", dQ, dQ64, x.dtype)


def _check_cayley(fn, R, G, mode):
    """``Q = (I - S)(I + S)^-1`` and, for fwdbwd, ``dl/dR`` against the dense formula in fp64."""
    R64 = R.detach().double().requires_grad_()
    Q64 = reference.dense_cayley(R64)
    if mode == "fwd":
        with torch.no_grad():
            _assert_close("Q", fn(R), Q64, torch.float32)
        return
    Q = fn(R)
    _assert_close("Q", Q, Q64, torch.float32)
    (dR,) = torch.autograd.grad(Q, R, G)
    (dR64,) = torch.autograd.grad(Q64, R64, G.double())
    _assert_close("dl/dR", dR, dR64, torch.float32)


def _record(benchmark, nbytes: int) -> None:
    benchmark.extra_info["ideal_bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["ideal_GBps_at_median"] = nbytes / median / 1e9


def _butterfly_case(benchmark, backend, T, n, b, N, dtype, device, mode):
    resolve_geometry(n, b, 0, N)
    torch.manual_seed(0)
    D = n // b
    x = torch.randn(T, n, device=device, dtype=dtype, requires_grad=(mode == "fwdbwd"))
    Q = torch_ops.cayley(0.1 * torch.randn(N, D, b, b, device=device)).requires_grad_(mode == "fwdbwd")
    g = torch.randn(T, n, device=device, dtype=dtype)
    fn = _butterfly_fn(backend)
    _check_butterfly(fn, x, Q, g, mode)
    elem = x.element_size()
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, Q)
        nbytes = 2 * T * n * elem  # read x, write y
    else:
        def step():
            x.grad = Q.grad = None
            fn(x, Q).backward(g)
        nbytes = (2 + 3) * T * n * elem  # forward: x, y; backward: x, g, dx
    benchmark.extra_info.update(T=T, n=n, b=b, N=N, dtype=str(dtype).removeprefix("torch."), impl=backend, mode=mode)
    benchmark(_sync_after(step, torch.device(device)))
    _record(benchmark, nbytes)


def _cayley_case(benchmark, backend, N, D, b, device, mode):
    torch.manual_seed(0)
    R = (0.1 * torch.randn(N, D, b, b, device=device)).requires_grad_(mode == "fwdbwd")
    G = torch.randn(N, D, b, b, device=device)
    fn = _cayley_fn(backend)
    _check_cayley(fn, R, G, mode)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(R)
    else:
        def step():
            R.grad = None
            fn(R).backward(G)
    benchmark.extra_info.update(N=N, D=D, b=b, impl=backend, mode=mode)
    benchmark(_sync_after(step, torch.device(device)))
    _record(benchmark, (2 if mode == "fwd" else 5) * R.numel() * 4)


# ----------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", ["torch", "dense"], indirect=True)
@pytest.mark.parametrize("T,n,b,N", BUTTERFLY_CPU, ids=_ids("T{}-n{}-b{}-N{}", BUTTERFLY_CPU))
def test_butterfly_cpu(benchmark, backend, T, n, b, N, mode):
    if backend == "dense" and n > 512:
        pytest.skip("dense n x n products take seconds per call on a CPU at this width")
    benchmark.group = f"butterfly-cpu-T{T}-n{n}-b{b}-N{N}-{mode}"
    _butterfly_case(benchmark, backend, T, n, b, N, torch.float32, "cpu", mode)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", ["torch"], indirect=True)
@pytest.mark.parametrize("N,D,b", CAYLEY_CPU, ids=_ids("N{}-D{}-b{}", CAYLEY_CPU))
def test_cayley_cpu(benchmark, backend, N, D, b, mode):
    benchmark.group = f"cayley-cpu-{mode}"
    _cayley_case(benchmark, backend, N, D, b, "cpu", mode)


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", ["triton", "torch", "dense"], indirect=True)
@pytest.mark.parametrize("T,n,b,N", BUTTERFLY_CUDA, ids=_ids("T{}-n{}-b{}-N{}", BUTTERFLY_CUDA))
def test_butterfly_cuda(benchmark, backend, T, n, b, N, mode, dtype):
    benchmark.group = f"butterfly-cuda-T{T}-n{n}-b{b}-N{N}-{mode}-{str(dtype).removeprefix('torch.')}"
    _butterfly_case(benchmark, backend, T, n, b, N, dtype, "cuda", mode)


@needs_cuda
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("N,D,b", CAYLEY_CUDA, ids=_ids("N{}-D{}-b{}", CAYLEY_CUDA))
def test_cayley_cuda(benchmark, backend, N, D, b, mode):
    benchmark.group = f"cayley-cuda-N{N}-D{D}-b{b}-{mode}"
    _cayley_case(benchmark, backend, N, D, b, "cuda", mode)


