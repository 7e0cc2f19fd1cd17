"""What the butterfly kernels cost, measured without a GPU.

Reports, one tool (``python -m boft_triton.bench.kernel_profile
traffic|wide|segmented|compile|compile-wide|cayley|roofline|accuracy``):

- **traffic**: runs the forward and the backward in Triton's interpreter and counts the bytes every
  kernel loads and stores (masked lanes excluded), the multiply-adds done by ``tl.dot`` and the
  elementwise multiplies. Bytes are compared with the ideal of a bandwidth-bound rotation: the
  forward reads x and writes y (2 passes over x), the backward reads x and g and writes dx
  (3 passes). Everything the kernels read or write is counted, parameters (coarse blocks, their
  gradient partials) included, and against the *floor*, the least any kernel moves (the ideal
  plus Q read once each way and dQ written once). **wide** does this for the wide-block shapes
  of PEFT's ``block_num`` examples;
- **segmented**: the same count for the mixed-adapter (serving) forward, T rows split among K
  adapters, every adapter's Q read included;
- **compile**: compiles every kernel at the config its launcher picks, for sm_90 and sm_80, with
  the 16-byte alignment / divisible-by-16 specialisation a real launch gives, and reads the cubin
  Triton built: registers (``cuobjdump -res-usage``), spill bytes (its local stores, as ``ptxas
  -v`` counts them), shared memory, tensor-core instructions and global-load widths (``cuobjdump
  -sass``). The tools ship inside Triton's NVIDIA backend; no GPU is needed.
  **compile-wide** does it for the wide report's shapes, **cayley** for the blocked Cayley solve
  of blocks wider than 64;
- **accuracy**: y of 16-bit inputs against the exact product, with a GPU's rounding emulated op
  by op in float64 (the interpreter computes every dot in fp32, so it cannot show it);
- **roofline**: per shape on an H100, the microseconds the bytes need at full bandwidth against
  those the tensor-core flops need at peak (``--traffic-json`` scales the bytes by a measured
  traffic report).

The torch ops on the parameter side (building the coarse blocks from Q, mapping their gradient
back, casts, partial sums) are counted separately by a dispatch mode: they cost O(n L) bytes per
call, independent of the row count T.

``--out DIR`` writes ``<report>-<date>.json`` and ``.md`` there (the committed ones live in
bench/results/). The traffic report needs ``TRITON_INTERPRET=1`` before Triton is imported; this
module sets it when run as a script.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# (b, N) shapes of the issue; T >= 512 rows so the per-program parameter reads are amortised the
# way they are in training (T is batch x sequence, thousands of rows).
SHAPES = [(4, 1), (8, 1), (8, 2), (4, 4), (16, 1), (32, 1), (32, 2), (64, 1)]
# More shapes the traffic report covers: wider coarse blocks (L = 128, the widest a program holds),
# more levels, and L = 256 (two factor groups, two passes over x).
MORE_SHAPES = [(16, 2), (8, 3), (16, 3), (2, 6), (64, 2), (128, 1), (32, 3), (16, 4), (64, 3), (8, 6)]
# Issue 20's wide shapes (width, b, N): PEFT's examples set boft_block_num, so blocks grow with
# the layer: DreamBooth's block_num=8, N=1 and the multi-concept / ControlNet scripts' 8x3 and 4x2
# on Stable Diffusion's 320/640/1280-wide layers (768 for cross-attention keys and values).
WIDE_SHAPES = [(1280, 160, 1), (1280, 40, 3), (1280, 80, 2), (1024, 64, 3), (1024, 8, 6), (4096, 512, 1)] + sorted(
    {(n, n // num, N) for n in (320, 640, 768, 1280) for num in (4, 8) for N in (1, 2, 3)
     if (n // num) % 2 == 0 and num % (1 << (N - 1)) == 0} - {(1280, 160, 1)})
WIDE_T = 1024
TARGET_FWD = 1.25
TARGET_FWD_BWD = 1.5


# ---------------------------------------------------------------------------------------------
# traffic (interpreter)


@contextlib.contextmanager
def count_traffic():
    """Count loads, stores, elementwise multiplies and tl.dot multiply-adds of interpreted kernels.

    Wraps the interpreter's builder methods for the duration of the block (restored after)."""
    import numpy as np
    import triton.runtime.interpreter as interp

    builder = interp.InterpreterBuilder
    counts = {"load_bytes": 0, "store_bytes": 0, "mul": 0, "dot_macs": 0}

    def nbytes(ptrs, mask):
        lanes = int(np.count_nonzero(mask.data)) if mask is not None else int(np.size(ptrs.data))
        return lanes * np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize

    def on_dot(a, b, *rest):
        return "dot_macs", int(np.prod(np.shape(a.data))) * int(np.shape(b.data)[-1])

    hooks = {
        "create_load": lambda ptr, *r: ("load_bytes", nbytes(ptr, None)),
        "create_masked_load": lambda ptrs, mask, *r: ("load_bytes", nbytes(ptrs, mask)),
        "create_store": lambda ptr, *r: ("store_bytes", nbytes(ptr, None)),
        "create_masked_store": lambda ptrs, value, mask, *r: ("store_bytes", nbytes(ptrs, mask)),
        "create_fmul": lambda lhs, *r: ("mul", int(np.size(lhs.data))),
        "create_fma": lambda a, *r: ("mul", int(np.size(a.data))),
        "create_dot": on_dot,
    }
    originals = {name: getattr(builder, name) for name in hooks}
    # The interpreter's unmasked load and store call its masked ones with an all-true mask: only
    # the outermost hooked call of an op counts, so they are not counted twice.
    depth = [0]

    def wrap(name):
        original, account = originals[name], hooks[name]

        def counted(self, *args, **kwargs):
            if depth[0] == 0:
                key, amount = account(*args)
                counts[key] += amount
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    for name in hooks:
        setattr(builder, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(builder, name, original)


@contextlib.contextmanager
def count_torch_bytes():
    """Bytes the torch ops run in the block read and write (every tensor argument and result,
    views excluded), outside the boft_triton custom ops (their kernels are counted by
    count_traffic): the coarse-block builder, its backward, casts and partial sums."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counts = {"bytes": 0}

    def size(t):
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace == "boft_triton":
                return out
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            storages = {t.untyped_storage().data_ptr() for t in inputs}
            if outputs and all(t.untyped_storage().data_ptr() in storages for t in outputs):
                return out  # a view (or in-place): no new bytes
            counts["bytes"] += sum(map(size, inputs)) + sum(map(size, outputs))
            return out

    with Counter():
        yield counts


def traffic(n: int, b: int, N: int, T: int, dtype_name: str = "bf16", x_grad: bool = True) -> dict:
    """Bytes and multiply-adds of one forward and one forward+backward, against the ideal."""
    import torch

    from boft_triton import torch_ops
    from boft_triton.kernels import butterfly as kb

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, n, generator=gen).to(dtype).requires_grad_(x_grad)
    g = torch.randn(T, n, generator=gen).to(dtype)
    Q = torch_ops.cayley(0.3 * torch.randn(N, n // b, b, b, generator=gen)).requires_grad_()
    with count_traffic() as fwd, count_torch_bytes() as fwd_torch:
        y = kb.butterfly(x, Q)
    with count_traffic() as bwd, count_torch_bytes() as bwd_torch:
        torch.autograd.grad(y, (x, Q) if x_grad else (Q,), g)
    es = x.element_size()
    ideal_fwd = 2 * T * n * es
    ideal_bwd = (3 if x_grad else 2) * T * n * es
    moved_fwd = fwd["load_bytes"] + fwd["store_bytes"]
    moved_bwd = bwd["load_bytes"] + bwd["store_bytes"]
    macs = fwd["dot_macs"] + bwd["dot_macs"]
    # the least any kernel moves (the floor): the ideal, plus Q (fp32) read once by the forward
    # and once by the backward (dx needs the rotation; a multi-level dQ its factors), and dQ
    # written once. Q has N b values per column against T per activation pass, so at wide blocks
    # and few rows it alone can put the targets out of reach (b x N = 512 at T = 1024: fwd 1.5x)
    q_bytes = Q.numel() * 4
    floor_fwd = ideal_fwd + q_bytes
    floor_fwd_bwd = floor_fwd + ideal_bwd + q_bytes * ((x_grad or N > 1) + 1)
    return {
        "n": n, "b": b, "N": N, "L": b << (N - 1), "T": T, "dtype": dtype_name,
        "fwd_bytes": moved_fwd, "fwd_ideal": ideal_fwd, "fwd_ratio": moved_fwd / ideal_fwd,
        "fwd_bwd_bytes": moved_fwd + moved_bwd, "fwd_bwd_ideal": ideal_fwd + ideal_bwd,
        "fwd_bwd_ratio": (moved_fwd + moved_bwd) / (ideal_fwd + ideal_bwd),
        "q_bytes": q_bytes, "fwd_floor": floor_fwd / ideal_fwd,
        "fwd_bwd_floor": floor_fwd_bwd / (ideal_fwd + ideal_bwd),
        # torch ops on the parameter side (block builder and its backward, casts, partial sums):
        # independent of T, so their share falls as 1/T
        "torch_bytes": fwd_torch["bytes"] + bwd_torch["bytes"],
        "fwd_ratio_with_torch": (moved_fwd + fwd_torch["bytes"]) / ideal_fwd,
        "fwd_bwd_ratio_with_torch": (moved_fwd + moved_bwd + fwd_torch["bytes"] + bwd_torch["bytes"]) / (ideal_fwd + ideal_bwd),
        "dot_macs": macs, "elementwise_mul": fwd["mul"] + bwd["mul"],
        "dot_fraction": macs / max(1, macs + fwd["mul"] + bwd["mul"]),
        "path": kb.path_name(n, b, N, T, dtype),
    }


# Mixed-adapter batches (serving): adapters per batch, and the shapes and rows the report uses.
SEGMENTED_K = (1, 4, 16)
SEGMENTED_SHAPES = [(4, 1), (8, 2), (16, 1), (32, 2)]
SEGMENTED_T = 4096


def segmented_traffic(n: int, b: int, N: int, T: int, K: int, dtype_name: str = "bf16") -> dict:
    """Bytes of one segmented forward (K adapters, T rows split evenly among them) against one
    read + one write of x; every adapter's Q read counts (fp32, once per program)."""
    import torch

    from boft_triton import torch_ops
    from boft_triton.kernels import butterfly as kb

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, n, generator=gen).to(dtype)
    Q = torch.stack([torch_ops.cayley(0.3 * torch.randn(N, n // b, b, b, generator=gen)) for _ in range(K)])
    offsets = [T * k // K for k in range(K + 1)]
    with count_traffic() as fwd, count_torch_bytes() as fwd_torch:
        kb.segmented_butterfly(x, Q, offsets)
    moved = fwd["load_bytes"] + fwd["store_bytes"]
    ideal = 2 * T * n * x.element_size()
    return {"n": n, "b": b, "N": N, "L": b << (N - 1), "T": T, "K": K, "dtype": dtype_name,
            "fwd_bytes": moved, "fwd_ideal": ideal, "fwd_ratio": moved / ideal,
            "q_bytes_ideal": K * Q[0].numel() * 4, "torch_bytes": fwd_torch["bytes"],
            # against the least any kernel moves: x once, y once, every adapter's Q once
            "fwd_ratio_to_floor": moved / (ideal + K * Q[0].numel() * 4),
            "dot_macs": fwd["dot_macs"], "elementwise_mul": fwd["mul"], "path": kb.path_name(n, b, N)}


def segmented_markdown(rows: list[dict]) -> str:
    lines = ["| b x N | L | path | T | n | adapters K | fwd bytes / ideal | Q bytes (all adapters, once) / ideal | "
             "fwd bytes / (ideal + Q once) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['b']} x {r['N']} | {r['L']} | {r['path']} | {r['T']} | {r['n']} | {r['K']} | "
                     f"{r['fwd_ratio']:.3f} | {r['q_bytes_ideal'] / r['fwd_ideal']:.3f} | {r['fwd_ratio_to_floor']:.3f} |")
    return "\n".join(lines) + "\n"


def traffic_markdown(rows: list[dict]) -> str:
    lines = [
        "| b x N | L | path | T | n | fwd bytes / ideal | fwd+bwd bytes / ideal | floor: fwd / fwd+bwd | "
        "torch-op bytes (param side) | fwd / ideal incl. torch ops | fwd+bwd / ideal incl. torch ops | tl.dot MACs | "
        "elementwise mul | dot share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        torch_cols = (f"{r['torch_bytes']:.3g} | {r['fwd_ratio_with_torch']:.3f} | {r['fwd_bwd_ratio_with_torch']:.3f}"
                      if "torch_bytes" in r else " | | ")
        lines.append(
            f"| {r['b']} x {r['N']} | {r['L']} | {r['path']} | {r['T']} | {r['n']} | {r['fwd_ratio']:.3f} | "
            f"{r['fwd_bwd_ratio']:.3f} | {r['fwd_floor']:.3f} / {r['fwd_bwd_floor']:.3f} | {torch_cols} | "
            f"{r['dot_macs']:.3g} | {r['elementwise_mul']:.3g} | "
            f"{100 * r['dot_fraction']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# compile (ptxas / cuobjdump, no GPU)


def compile_rows(widths, shapes, archs=(90, 80), T: int = 8192, dtype_name: str = "bf16",
                 kernels: tuple[str, ...] = ("",)) -> list[dict]:
    """Every kernel the launcher would run for each (width, b, N), at the launcher's config (those
    whose names start with one of ``kernels``)."""
    from boft_triton.kernels import butterfly as kb

    rows = []
    for n in widths:
        for b, N in shapes:
            if n % (b << (N - 1)):
                continue
            for arch in archs:
                for spec in kb.launch_specs(n, b, N, dtype_name):
                    if arch not in spec.get("archs", (arch,)):  # a kernel the launchers run on some archs only
                        continue
                    if not spec["name"].startswith(kernels):
                        continue
                    stats = compile_stats(spec, arch)
                    rows.append({"n": n, "b": b, "N": N, "L": b << (N - 1), "arch": f"sm_{arch}", "dtype": dtype_name,
                                 "kernel": spec["name"], "width": spec["width"], "levels": spec["levels"],
                                 "config": {**spec["config"], **spec.get("options", {}),
                                            **spec.get("arch_options", {}).get(arch, {})}, **stats})
    return rows


CAYLEY_BLOCKS = [96, 128, 160, 192, 256, 320, 512, 1024, 2048]


def cayley_compile_rows(blocks=CAYLEY_BLOCKS, archs=(90, 80)) -> list[dict]:
    """The blocked Cayley solve's kernels (``kernels/cayley_blocked.py``) for each block width."""
    from boft_triton.kernels import cayley_blocked

    return [{"n": b, "b": b, "N": 1, "L": b, "arch": f"sm_{arch}", "dtype": "fp32", "kernel": spec["name"], "width": b,
             "levels": 1, "config": spec["config"], **compile_stats(spec, arch)}
            for b in blocks for arch in archs for spec in cayley_blocked.launch_specs(b)]


# Shared memory one block may use (opt-in maximum): H100 227 KB, A100 163 KB. A kernel asking for
# more does not launch.
SMEM_LIMIT = {90: 232448, 80: 166912}
# 32-bit registers of an SM (sm_80 and sm_90), shared by the programs resident on it.
REGISTER_FILE = 64 * 1024


def _spill_store_bytes(sass: str) -> int:
    """ptxas -v's "bytes spill stores": the bytes of the SASS's local-memory stores (STL: 4 bytes,
    .64 8, .128 16, .U16/.S16 2, .U8/.S8 1)."""
    import re

    widths = {"128": 16, "64": 8, "16": 2, "8": 1}
    return sum(widths.get(m.group(1) or "", 4) for m in re.finditer(r"\bSTL(?:\.[US]?(\d+))?\b", sass))


def compile_stats(spec: dict, arch: int) -> dict:
    """Compile one kernel spec for ``sm_<arch>`` and read what the GPU would run."""
    import collections
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature = spec["fn"], spec["signature"]
    constexprs = {**spec["constexprs"], **spec.get("arch_constexprs", {}).get(arch, {})}  # as launched there
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    # a launch specialises pointers (16-byte aligned) and ints divisible by 16 the same way
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, t in signature.items() if t.startswith("*") or k in spec.get("divisible", ())}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = {"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3), **spec.get("options", {}),
               **spec.get("arch_options", {}).get(arch, {})}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    # Read the cubin Triton built (its ptxas flags, not a second ptxas run's): registers from its
    # resource usage, spill bytes as ptxas -v counts them, the bytes of its local-memory stores.
    sass = disassemble(compiled.asm["cubin"], Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    regs = re.search(r"REG:(\d+)", sass)
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)(\.[A-Z0-9_.]+)?", sass)
    count = collections.Counter(op for op, _ in ops)
    widths = collections.Counter(op + (sfx or "") for op, sfx in ops if op in ("LDG", "STG", "LDGSTS"))
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_bytes": _spill_store_bytes(sass),
        "smem": compiled.metadata.shared,
        "smem_fits": compiled.metadata.shared <= SMEM_LIMIT[arch],
        # a program needing more than the SM's 64K registers does not launch (a register cap
        # .maxnreg past 64K / threads is not refused by ptxas)
        "regs_fit": regs is None or int(regs.group(1)) * 32 * spec["num_warps"] <= REGISTER_FILE,
        "num_warps": spec["num_warps"],
        "tensor_core": sum(count[o] for o in ("HMMA", "HGMMA", "IMMA", "WGMMA")),
        "ffma": count["FFMA"],
        "ldg": dict(widths),
        "spill_ops_in_loops": _spill_ops_in_loops(sass),
    }


SASS_CACHE_ENV = "BOFT_TRITON_SASS_CACHE"


def sass_cache_dir() -> Path | None:
    """Where ``disassemble`` keeps what it read: ``$BOFT_TRITON_SASS_CACHE``, else ``sass`` in the
    user cache dir (platformdirs); None (nothing kept) if there is neither."""
    if os.environ.get(SASS_CACHE_ENV):
        return Path(os.environ[SASS_CACHE_ENV])
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("boft_triton")) / "sass"
    except Exception:  # platformdirs missing, or no home directory
        return None


@functools.lru_cache(maxsize=None)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes, once per (path, size, mtime) in a process."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disassemble(cubin: bytes, cuobjdump: Path) -> str:
    """``cuobjdump -res-usage -sass`` of a cubin. The disassembler spends about 0.4 s of CPU
    starting, whatever the kernel: 67 of the compile test's 80 CPU-seconds (185 kernels) where
    Triton's own cache holds the cubins. So its output is kept, under the hash of the cubin and
    of the cuobjdump that read it (its bytes: the same Triton in another virtual environment
    shares the entries), which fix it; a cache that cannot be read or written is skipped."""
    import subprocess
    import tempfile

    from boft_triton.io_utils import atomic_write_text

    tool = cuobjdump.stat()
    key = hashlib.sha256(cubin)
    key.update(_file_hash(cuobjdump, tool.st_size, tool.st_mtime_ns).encode())
    folder = sass_cache_dir()
    kept = folder / f"{key.hexdigest()}.txt" if folder is not None else None
    with contextlib.suppress(OSError):
        if kept is not None and kept.is_file():
            return kept.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        run = subprocess.run([str(cuobjdump), "-res-usage", "-sass", str(path)], capture_output=True, text=True)
    if run.returncode == 0 and kept is not None:
        with contextlib.suppress(OSError):
            atomic_write_text(kept, run.stdout)
    return run.stdout


def _spill_ops_in_loops(sass: str) -> int:
    """Local-memory loads and stores (spill traffic) inside a loop of the SASS: between a
    backward branch and its target. Spills outside every loop (a block build before the row loop,
    an epilogue after it) run once per program; those inside run every row step."""
    import re

    addr = re.compile(r"/\*([0-9a-f]{4,})\*/")
    lines = [(int(m.group(1), 16), line) for line in sass.splitlines() if (m := addr.search(line))]
    loops = [(int(t.group(1), 16), a) for a, line in lines
             if (t := re.search(r"\bBRA\b[^;]*?\b0x([0-9a-f]+)", line)) and int(t.group(1), 16) < a]
    return sum(1 for a, line in lines if re.search(r"\b(?:STL|LDL)\b", line) and any(lo <= a <= hi for lo, hi in loops))


def compile_markdown(rows: list[dict]) -> str:
    lines = ["| n | b x N | L | arch | kernel | config | regs | spill B | spill ops in loops | smem B | tensor-core instr | "
             "FFMA | global ld/st |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        ldg = " ".join(f"{k}x{v}" for k, v in sorted(r["ldg"].items()))
        lines.append(f"| {r['n']} | {r['b']} x {r['N']} | {r['L']} | {r['arch']} | {r['kernel']} | {cfg} | {r['regs']} | "
                     f"{r['spill_bytes']} | {r.get('spill_ops_in_loops', '')} | {r['smem']} | {r['tensor_core']} | "
                     f"{r['ffma']} | {ldg} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# roofline estimate (H100 SXM)

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3
H100_BF16_TENSOR = 989e12  # dense bf16 tensor-core flop/s
H100_SMS = 132


def roofline_rows(T: int = 8192, n: int = 2048, ratios: dict | None = None) -> list[dict]:
    """Per shape, bf16: microseconds the bytes need at full bandwidth against what the tensor-core
    flops need at peak (``ratios[(b, N)] = (fwd, fwd_bwd)``: bytes are the ideal times these
    interpreter-measured ratios). Flops: the row products at the padded/packed dot width, plus
    the block products every program spends building its Delta tile (and, backward, dQ), at the
    default config's program and split counts on an H100."""
    from boft_triton.kernels import butterfly as kb

    rows = []
    for b, N in SHAPES:
        fwd_flops = bwd_flops = build_fwd = build_bwd = 0
        fwd_cfg = kb.default_config(n, b, N, "fwd")
        for grp in kb.plan(n, b, N):
            wp, nb = grp["WP"], grp["NB"]
            build, dq = kb.block_products(grp)
            programs = kb._programs(T, fwd_cfg["BT"], fwd_cfg["PPS"], grp, b, H100_SMS)
            splits, _ = kb._splits(T, grp, b, H100_SMS)
            fwd_flops += 2 * T * n * wp
            bwd_flops += 4 * T * n * wp  # dx and dMc, one product each
            build_fwd += 2 * wp**3 * build * programs * nb
            build_bwd += 2 * wp**3 * (build * splits + dq) * nb
        fwd_ratio, both_ratio = (ratios or {}).get((b, N), (1.0, 1.0))
        fwd_bytes, both_bytes = 2 * T * n * 2 * fwd_ratio, 5 * T * n * 2 * both_ratio
        row = {"b": b, "N": N, "L": b << (N - 1), "T": T, "n": n, "dot_width": sum(g["WP"] for g in kb.plan(n, b, N)),
               "fwd_us_bytes": 1e6 * fwd_bytes / H100_BANDWIDTH,
               "fwd_us_flops": 1e6 * (fwd_flops + build_fwd) / H100_BF16_TENSOR,
               "fwd_bwd_us_bytes": 1e6 * both_bytes / H100_BANDWIDTH,
               "fwd_bwd_us_flops": 1e6 * (fwd_flops + bwd_flops + build_fwd + build_bwd) / H100_BF16_TENSOR,
               "build_share": (build_fwd + build_bwd) / max(1, fwd_flops + bwd_flops + build_fwd + build_bwd)}
        row["bound"] = "bandwidth" if row["fwd_bwd_us_bytes"] >= row["fwd_bwd_us_flops"] else "compute"
        rows.append(row)
    return rows


def roofline_markdown(rows: list[dict]) -> str:
    lines = ["| b x N | L | dot width | fwd us: bytes / flops | fwd+bwd us: bytes / flops | block-build share of flops | bound |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['b']} x {r['N']} | {r['L']} | {r['dot_width']} | {r['fwd_us_bytes']:.1f} / {r['fwd_us_flops']:.1f} | "
                     f"{r['fwd_bwd_us_bytes']:.1f} / {r['fwd_bwd_us_flops']:.1f} | {100 * r.get('build_share', 0):.0f}% | "
                     f"{r['bound']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# accuracy (GPU rounding emulated, no GPU needed)


def _rounder(dtype):
    """Round float64 values as a GPU stores them in ``dtype`` (round to nearest; tf32: 10-bit
    mantissa)."""
    import torch

    from boft_triton.kernels import butterfly as kb

    if dtype == kb.tl.float32:  # tf32 operands of the block products
        def tf32(t):
            mantissa, exponent = torch.frexp(t)
            return torch.ldexp(torch.round(mantissa * 2048) / 2048, exponent)
        return tf32
    torch_dtype = {kb.tl.bfloat16: torch.bfloat16, kb.tl.float16: torch.float16}[dtype]
    return lambda t: t.to(torch_dtype).to(torch.float64)


def accuracy(n: int, b: int, N: int, scale: float, T: int = 1024, dtype_name: str = "bf16") -> dict:
    """Relative error of the kernels' y against the exact ``x M`` for 16-bit x, with a GPU's
    rounding emulated op by op in float64: Delta built in residual form with the block products'
    operands rounded as ``_dot_meta`` chooses for this width, the row product on Delta rounded to
    x's dtype, fp32 accumulation, y rounded once. Compared with a product by a rounded M (what
    a dense merge in x's dtype gives) and with one rounding of the exact y (the floor)."""
    import torch

    from boft_triton import reference, torch_ops
    from boft_triton.kernels import butterfly as kb

    x_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    Q = torch_ops.cayley(scale * torch.randn(N, n // b, b, b, generator=gen)).double()
    eye = torch.eye(b, dtype=torch.float64).expand_as(Q[0])
    eye_n = torch.eye(n, dtype=torch.float64)
    width = max(g["WP"] for g in kb.plan(n, b, N))
    with kb._compiling():
        meta = kb._dot_meta(x_dtype, width)
    build, low = _rounder(meta["BUILD_DTYPE"]), _rounder(meta["DOT_DTYPE"])
    fp32 = lambda t: t.float().double()  # noqa: E731
    residuals = [reference.dense_rotation(torch.stack([Q[k] if j == k else eye for j in range(N)])) - eye_n
                 for k in range(N)]
    delta = fp32(residuals[0])  # the kernels' build order: D <- E_k + D + E_k D
    for k in range(1, N):
        e = fp32(residuals[k])
        delta = fp32(e + delta + build(e) @ build(delta))
    M = reference.dense_rotation(Q)
    x = low(torch.randn(T, n, generator=gen, dtype=torch.float64))
    exact = x @ M

    def rel(y):
        return ((y - exact).norm() / exact.norm()).item()

    return {"n": n, "b": b, "N": N, "R": scale, "dtype": dtype_name, "width": width,
            "kernels": rel(low(fp32(x + x @ low(delta)))), "rounded_M": rel(low(x @ low(M))), "one_rounding": rel(low(exact))}


def accuracy_markdown(rows: list[dict]) -> str:
    lines = ["| b x N | R | kernels (residual form) | product with M rounded to x's dtype | one rounding of y |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['b']} x {r['N']} | {r['R']} | {r['kernels']:.2e} | {r['rounded_M']:.2e} | {r['one_rounding']:.2e} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# command line


def _write(out: Path, stem: str, rows: list[dict], table: str, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(f"# {title}\n\n{table}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Interpreter traffic and sm_90/sm_80 compile reports of the butterfly kernels.")
    parser.add_argument("report", choices=["traffic", "wide", "segmented", "compile", "compile-wide", "cayley",
                                           "roofline", "accuracy"])
    parser.add_argument("--n", type=int, default=1024, help="traffic: layer width")
    parser.add_argument("--T", type=int, default=512, help="traffic: rows (batch x sequence)")
    parser.add_argument("--widths", default="2048,3072,4096,512,1024", help="compile: layer widths")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", default=None, help="write JSON + Markdown into this folder")
    parser.add_argument("--tag", default="", help="suffix of the result file names (e.g. 'before')")
    parser.add_argument("--traffic-json", default=None, help="roofline: a traffic report whose byte ratios to use")
    parser.add_argument("--shapes", default=None,
                        help="traffic/compile: b x N shapes instead of the issue's, e.g. 64x2,32x3")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    date = time.strftime("%Y-%m-%d")
    tag = f"-{args.tag}" if args.tag else ""
    if args.report == "traffic":
        rows = [traffic(args.n, b, N, args.T, args.dtype) for b, N in shapes or SHAPES + MORE_SHAPES
                if args.n % (b << (N - 1)) == 0]
        table = traffic_markdown(rows)
        title = f"Interpreter traffic, {args.dtype}, n={args.n}, T={args.T} (targets: fwd <= {TARGET_FWD}x, fwd+bwd <= {TARGET_FWD_BWD}x)"
        stem = f"interp-traffic-{date}{tag}"
    elif args.report == "wide":
        T = args.T if args.T != 512 else WIDE_T
        rows = [traffic(n, b, N, T, args.dtype) for n, b, N in WIDE_SHAPES]
        table = traffic_markdown(rows)
        title = (f"Interpreter traffic of wide blocks (PEFT's block_num examples), {args.dtype}, T={T} "
                 f"(targets: fwd <= {TARGET_FWD}x, fwd+bwd <= {TARGET_FWD_BWD}x; floor: the least any kernel "
                 f"moves, the ideal plus Q read once each way and dQ written once)")
        stem = f"interp-wide-{date}{tag}"
    elif args.report == "segmented":
        T = args.T if args.T != 512 else SEGMENTED_T
        rows = [segmented_traffic(args.n, b, N, T, K, args.dtype) for b, N in shapes or SEGMENTED_SHAPES
                for K in SEGMENTED_K if args.n % (b << (N - 1)) == 0]
        table = segmented_markdown(rows)
        title = (f"Interpreter traffic of the segmented (mixed-adapter) forward, {args.dtype}, n={args.n}, T={T}, "
                 f"rows split evenly among K adapters (target: <= {TARGET_FWD}x with every Q read)")
        stem = f"interp-segmented-{date}{tag}"
    elif args.report == "accuracy":
        rows = [accuracy(256, b, N, scale, dtype_name=args.dtype if args.dtype != "fp32" else "bf16")
                for b, N in [(8, 2), (4, 4), (32, 2), (64, 1), (64, 2)] for scale in (0.01, 0.1, 0.5)]
        table = accuracy_markdown(rows)
        title = ("y against the exact product, 16-bit x, GPU rounding emulated in float64 (relative Frobenius error, "
                 "n=256, T=1024)")
        stem = f"accuracy-{date}{tag}"
    elif args.report == "roofline":
        ratios = None
        if args.traffic_json:
            data = json.loads(Path(args.traffic_json).read_text())["rows"]
            ratios = {(r["b"], r["N"]): (r["fwd_ratio"], r["fwd_bwd_ratio"]) for r in data}
        rows = roofline_rows(ratios=ratios)
        table = roofline_markdown(rows)
        title = "Roofline estimate, H100 SXM (3.35 TB/s, 989 bf16 TFLOP/s), bf16, T=8192, n=2048"
        stem = f"roofline-h100-{date}{tag}"
    elif args.report == "compile-wide":  # the wide report's (width, b, N) shapes
        rows = [row for n, b, N in WIDE_SHAPES for row in compile_rows([n], [(b, N)], dtype_name=args.dtype)]
        table = compile_markdown(rows)
        title = (f"Compile report of the wide report's shapes (PEFT's block_num examples on Stable Diffusion's "
                 f"widths, and the issue's; ptxas/cuobjdump, launch-time specialisation), {args.dtype}")
        stem = f"sm90-compile-wide-shapes-{date}{tag}"
    elif args.report == "cayley":
        rows = cayley_compile_rows()
        table = compile_markdown(rows)
        title = "Compile report of the blocked Cayley solve (blocks wider than 64; ptxas/cuobjdump), fp32 maths"
        stem = f"sm90-compile-cayley-{date}{tag}"
    else:
        widths = [int(w) for w in args.widths.split(",")]
        rows = compile_rows(widths, shapes or SHAPES, dtype_name=args.dtype)
        table = compile_markdown(rows)
        title = f"Compile report (ptxas/cuobjdump, launch-time specialisation), {args.dtype}"
        stem = f"sm90-compile-{date}{tag}"
    print(table)
    if args.out:
        _write(Path(args.out), stem, rows, table, title)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("traffic", "wide", "segmented"):
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    raise SystemExit(main())
