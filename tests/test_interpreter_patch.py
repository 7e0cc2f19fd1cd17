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
    """Installed on import; a shape's block type and tensor carry what Triton's own constructors
    give (attribute types and values, in order), built once: a second block type of the shape
    shares its tuple. Shapes Triton rejects are still rejected, and bools stay bools."""
    from triton.language import core

    from boft_triton.kernels import _interpreter
    from boft_triton.kernels._interpreter import attributes

    assert _interpreter.install_shape_caches() and _interpreter.install_shape_caches()
    cached_block, cached_tensor = core.block_type.__init__, core.tensor.__init__
    real_block, real_tensor = cached_block._boft_triton_real, cached_tensor._boft_triton_real
    for shape in ([16, 32], core.tuple([core.constexpr(16), 32]), [64, 2], [True], [1]):
        ref = core.block_type.__new__(core.block_type)
        real_block(ref, tl.bfloat16, shape)
        ref_tensor = core.tensor.__new__(core.tensor)
        real_tensor(ref_tensor, None, ref)
        for _ in range(2):  # a miss where the shape is new (the install's own check saw [16, 32]), then a hit
            block = core.block_type(tl.bfloat16, shape)
            assert attributes(block) == attributes(ref) and block == ref
            assert attributes(core.tensor(None, block)) == attributes(ref_tensor)
    assert core.block_type(tl.float32, [64, 2]).shape is core.block_type(tl.float16, [64, 2]).shape  # a hit
    scalar, ref_scalar = core.tensor(None, tl.float32), core.tensor.__new__(core.tensor)
    real_tensor(ref_scalar, None, tl.float32)
    assert attributes(scalar) == attributes(ref_scalar)
    for _ in range(2):
        with pytest.raises(ValueError, match="power of 2"):
            core.block_type(tl.float32, [12])
    with pytest.raises(AssertionError):  # Triton's block_type takes lists and tl.tuples only
        core.block_type(tl.float32, (16,))


def test_the_shape_caches_are_not_installed_where_they_would_differ(monkeypatch):
    """A cached constructor that leaves anything else than Triton's (here an int where Triton keeps
    a constexpr) fails the install's check, and the install then leaves Triton's constructors."""
    from triton.language import core

    from boft_triton.kernels import _interpreter

    real_block = core.block_type.__init__._boft_triton_real
    real_tensor = core.tensor.__init__._boft_triton_real

    def int_numel(self, handle, type):
        real_tensor(self, handle, type)
        self.numel = self.numel.value

    assert _interpreter._same_as_triton(core, real_block, real_tensor, real_block, real_tensor)
    assert not _interpreter._same_as_triton(core, real_block, real_tensor, real_block, int_numel)
    monkeypatch.setattr(core.block_type, "__init__", real_block)  # as before the install
    monkeypatch.setattr(core.tensor, "__init__", real_tensor)
    monkeypatch.setattr(_interpreter, "_same_as_triton", lambda *a: False)
    assert not _interpreter.install_shape_caches()
    assert core.block_type.__init__ is real_block and core.tensor.__init__ is real_tensor


def test_numpy_dtypes_are_triton_s():
    import numpy as np
    from triton.runtime import interpreter

    from boft_triton.kernels import _interpreter

    assert _interpreter.install_dtype_table() and _interpreter.install_dtype_table()
    cached = interpreter._get_np_dtype
    types = [tl.float32, tl.bfloat16, tl.float16, tl.float8e4nv, tl.float8e5, tl.int1, tl.int64, tl.uint16,
             tl.pointer_type(tl.float32), tl.pointer_type(tl.float32, const=True), tl.pointer_type(tl.int8, 3),
             tl.block_type(tl.float16, [4]), tl.block_type(tl.pointer_type(tl.bfloat16), [2, 8])]
    for _ in range(2):
        assert [cached(t) for t in types] == [cached._boft_triton_real(t) for t in types]
    assert cached(tl.bfloat16) == np.uint16 and cached(tl.pointer_type(tl.float32)) == np.uint64
    assert cached(tl.float8e4nv) == np.uint8 and cached(tl.block_type(tl.float16, [4])) == np.float16
