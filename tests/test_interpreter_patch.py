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
