"""Triton kernels of boft_triton, installed as ``boft_triton.kernels``.

One file per op (``cayley``, ``butterfly``), each holding its kernels, host launchers, autotune
configs and the ``torch.autograd.Function`` registered under ``torch.ops.boft_triton``. Importing a
submodule imports triton; importing this package alone does not.
"""
