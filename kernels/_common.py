"""Plumbing shared by the kernel files: the Triton import guard, output allocation, timing,
launch bookkeeping and the tuning-cache lookup.

Importing this module raises ImportError when Triton is missing or older than 3.6 (or, in the
interpreter, Triton 3.6 meets numpy >= 2.4), so
``boft_triton.ops`` can fall back to the torch path with one warning.
"""

from __future__ import annotations

import functools
import os
import time

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel files)
except Exception as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"triton is not importable: {err}") from err


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# The oldest Triton the kernels are tested on (3.6: the GPU machine's image; also 3.7.1 and 3.9).
MIN_TRITON = (3, 6)
if _version_tuple(triton.__version__) < MIN_TRITON:  # pragma: no cover
    raise ImportError(f"boft_triton kernels need triton>=3.6, found {triton.__version__}")

TRITON_VERSION = triton.__version__


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_numpy_check() -> None:
    """Triton 3.6's interpreter breaks on numpy >= 2.4 (``only 0-dimensional arrays can be
    converted to Python scalars`` in most kernels; fixed in Triton 3.7.1): refuse it up front."""
    import numpy

    if _version_tuple(triton.__version__) < (3, 7) and _version_tuple(numpy.__version__) >= (2, 4):
        raise ImportError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with numpy {numpy.__version__}: "
            "pip install 'numpy<2.4', or triton>=3.7.1"
        )


if interpreting():
    _interpreter_numpy_check()
    # the language patched once per launch, not on every helper call (absolute: the import-guard
    # test loads this file on its own)
    from boft_triton.kernels._interpreter import install as _patch_the_language_once_per_launch
    from boft_triton.kernels._interpreter import install_dtype_table as _map_each_dtype_once
    from boft_triton.kernels._interpreter import install_shape_caches as _build_each_shape_once

    _patch_the_language_once_per_launch()
    _build_each_shape_once()
    _map_each_dtype_once()


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def prev_pow2(x: int) -> int:
    """The largest power of two at most x (x >= 1)."""
    return 1 << (x.bit_length() - 1)


# Outputs every kernel fully overwrites are allocated here, so tests can switch to NaN-filled
# buffers (fla's trick) and catch an element a kernel forgot to write.
NAN_FILL_OUTPUTS = False


def new_empty(*shape, dtype, device) -> torch.Tensor:
    if NAN_FILL_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device | str | None = None) -> str:
    """Name used in tuning-cache keys: the GPU's marketing name, or ``cpu-interpreter``."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return _cuda_name(device.index)
    if device is None and torch.cuda.is_available() and not interpreting():
        return _cuda_name(None)
    return "cpu-interpreter"


def capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability, or None off a GPU (the interpreter): the kernels' per-arch
    limits then take Hopper's, the arch the compile report and the traffic report describe."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def register_operand_mma(cap: tuple[int, int] | None) -> bool:
    """Whether ``tl.dot`` runs as mma.sync there, its operands in registers: before Hopper, and
    on consumer Blackwell (sm_120). Hopper's wgmma and datacenter Blackwell's tcgen05 read held
    operand tiles from shared memory, which is what lets some kernels hold more (None: the
    interpreter, as Hopper)."""
    return cap is not None and (cap < (9, 0) or cap[0] == 12)


def register_cap(maxnreg: int | None) -> dict:
    """Triton's ``maxnreg`` launch option (ptxas's register cap per thread) as launch kwargs, for
    eager launches. torch.compile's path into user kernels (``wrap_triton`` under ``triton_op``)
    lifts num_warps and num_stages into its launch configs by name, maxnreg not among them
    (``SPECIAL_CONFIG_NAMES`` in torch/_higher_order_ops/triton_kernel_wrap.py); whether it still
    reaches the launch cannot be checked without a GPU, so while tracing the cap is left to
    ptxas: the same arithmetic, with the few bytes ptxas's own guess spills outside the row loop
    (the compile report)."""
    if maxnreg is None or torch.compiler.is_compiling():
        return {}
    return {"maxnreg": maxnreg}


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits so the deterministic reduction is exercised


def cpu_do_bench(fn, warmup: int = 1, rep: int = 3, **_ignored) -> float:
    """Median wall-clock milliseconds of ``fn()``; the interpreter's stand-in for do_bench."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def do_bench(fn, device: torch.device) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on CUDA, a CPU timer otherwise."""
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    return cpu_do_bench(fn)


# What the last launch of each kernel family used: {"butterfly_fwd": ("cache"|"autotune"|
# "default", config dict)}. Read by tests and by the tune command's report.
LAST_LAUNCH: dict[str, tuple[str, dict]] = {}


def cached_config(kind: str, n: int, b: int, N: int, dtype: torch.dtype, device: torch.device) -> dict | None:
    """The tuned config for ``kind`` ("fwd" or "bwd") of this shape from the tuning cache, if any."""
    from boft_triton import tuning  # lazy: tuning imports the kernels for benchmarking

    entry = tuning.lookup(device_name(device), n, b, N, dtype)
    if entry is None:
        return None
    return entry.get(kind)


def kernel_op(name: str, fake):
    """Register a launcher as the custom op ``name`` (``boft_triton::...``).

    On GPUs this is ``torch.library.triton_op``: torch.compile traces into the launcher and sees
    the kernels through ``wrap_triton``, with no graph break. Under ``TRITON_INTERPRET=1``,
    ``wrap_triton`` hands back the raw interpreted kernel, and tracing the launcher with fake
    tensors would run it on data-less tensors; there the op is a plain opaque ``custom_op`` with
    the shape-only ``fake`` implementation, so eager runs the very same kernels and
    torch.compile(fullgraph=True) still traces it as one node. Chosen once, at import.
    """

    def register(fn):
        if interpreting():
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, mutates_args=())(fn)

    return register
