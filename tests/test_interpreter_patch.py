"""The interpreter's language patching once per launch (kernels/_interpreter.py): same results,
and a helper called in a loop no longer re-scans ``triton.language`` on every call."""

from __future__ import annotations

import os

import pytest
import torch

from boft_triton.kernels._common import tl, triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter only")


@triton.jit
def _twice(v):
    return v * 2.0


@triton.jit
def _kernel(x_ptr, y_ptr, STEPS: tl.constexpr):
    o = tl.arange(0, 16)
    v = tl.load(x_ptr + o)
    for _ in range(STEPS):
        v = _twice(v)
    tl.store(y_ptr + o, tl.sum(v[None, :], axis=0))  # tl.sum: a helper of another module's globals


def test_helpers_patch_the_language_once_per_launch(monkeypatch):
    from triton.runtime import interpreter

    from boft_triton.kernels import _interpreter

    assert _interpreter.install() and _interpreter.install()  # installed on import; idempotent
    assert interpreter._patch_lang._boft_triton_once_per_launch

    scans = []
    real = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: scans.append(a[0]) or real(*a))
    x = torch.randn(16)
    y = torch.empty(16)
    _kernel[(1,)](x, y, STEPS=2)  # the first launch rewrites the functions (a globals more to patch after it)
    counts = []
    for steps in (1, 10):
        scans.clear()
        _kernel[(2,)](x, y, STEPS=steps)
        torch.testing.assert_close(y, x * 2.0 ** steps)
        counts.append(len(scans))
    # the helper's 2 x 10 calls re-scan nothing: each globals patched once a launch (without
    # the wrapper: a scan set per call, 93 scans at 10 steps)
    assert counts[0] == counts[1] > 0
    assert not getattr(tl.load, "__name__", "").startswith("<lambda>")  # restored after each launch


def test_block_types_and_tensors_of_a_shape_are_built_once():
    """Installed on import; a shape's second block type and tensor get what Triton's own
    constructors give (attributes, name, equality); shapes Triton rejects are still rejected."""
    from triton.language import core

    from boft_triton.kernels import _interpreter

    assert _interpreter.install_shape_caches() and _interpreter.install_shape_caches()
    cached_block, cached_tensor = core.block_type.__init__, core.tensor.__init__
    real_block, real_tensor = cached_block._boft_triton_real, cached_tensor._boft_triton_real
    for shape in ([16, 32], core.tuple([core.constexpr(16), 32]), [64]):
        ref = core.block_type.__new__(core.block_type)
        real_block(ref, tl.bfloat16, shape)
        ref_tensor = core.tensor.__new__(core.tensor)
        real_tensor(ref_tensor, None, ref)
        for _ in range(2):  # the miss, then the hit
            block = core.block_type(tl.bfloat16, shape)
            tensor = core.tensor(None, block)
            assert vars(block).keys() == vars(ref).keys() and block == ref and block.name == ref.name
            assert block.numel == ref.numel and isinstance(block.shape, core.tuple)
            assert tensor.shape == ref_tensor.shape and tensor.numel == ref_tensor.numel and tensor.dtype == tl.bfloat16
    for _ in range(2):
        with pytest.raises(ValueError, match="power of 2"):
            core.block_type(tl.float32, [12])
    with pytest.raises(AssertionError):  # Triton's block_type takes lists and tl.tuples only
        core.block_type(tl.float32, (16,))


def test_the_shape_caches_are_not_installed_where_they_would_differ():
    from triton.language import core

    from boft_triton.kernels import _interpreter

    real_block = core.block_type.__init__._boft_triton_real
    real_tensor = core.tensor.__init__._boft_triton_real

    def renamed(self, element_ty, shape):
        real_block(self, element_ty, shape)
        self.name = "another"

    assert _interpreter._same_as_triton(core, real_block, real_tensor, real_block, real_tensor)
    assert not _interpreter._same_as_triton(core, real_block, real_tensor, renamed, real_tensor)


def test_numpy_dtypes_are_triton_s():
    import numpy as np
    from triton.runtime import interpreter

    from boft_triton.kernels import _interpreter

    assert _interpreter.install_dtype_table() and _interpreter.install_dtype_table()
    cached = interpreter._get_np_dtype
    types = [tl.float32, tl.bfloat16, tl.float16, tl.int1, tl.int64, tl.pointer_type(tl.float32),
             tl.block_type(tl.float16, [4]), tl.block_type(tl.pointer_type(tl.bfloat16), [2, 8])]
    for _ in range(2):
        assert [cached(t) for t in types] == [cached._boft_triton_real(t) for t in types]
    assert cached(tl.bfloat16) == np.uint16 and cached(tl.pointer_type(tl.float32)) == np.uint64
