"""Kernel microbenchmarks for the one prepared GPU call (``bench/gpu_run.sh``), checked before timed.

Run from the source tree on the device machine (nothing installed there):

    PYTHONPATH=. python -m boft_triton.bench.gpu_check --out "$OUT"

1. butterfly forward and forward+backward at T=16384, n=4096, bf16, (b, N) in
   {(4,1), (8,2), (4,4), (32,2), (64,1)} (packed 16-wide dots, 16/32/64-wide tensor-core blocks)
   and the 256-wide coarse blocks {(64,3), (8,6)} (one pass over factor groups):
   Triton kernels vs the torch path vs torch.compile of the torch path (those rows last: inductor
   compiles each shape anew), as time and as a fraction
   of the measured device copy bandwidth (issue 8's targets: forward >= 80%, backward >= 60%).
   Before timing, each implementation's y, dx and dQ are compared with the torch path in fp64 on
   the same inputs (relative norm error, recorded; bf16's bound is 1e-2);
2. Cayley forward+backward for 1024 blocks of 8x8 and 128 of 32x32 vs torch.linalg.solve.

The kernel tests on CUDA are a separate step of ``gpu_run.sh`` (its own time limit), so these
numbers are saved even when the tests run out of time. ``--preflight`` runs the same code on the
CPU at tiny sizes with the kernels in Triton's interpreter (``bench/gpu_preflight.sh``): what
can break on the GPU machine's image before any timing (imports, versions, the cache) breaks
there first. Writes ``gpu-check-<card>-<date>.json`` and ``.md`` into --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .training_step import source_commit

BUTTERFLY_SHAPES = [(4, 1), (8, 2), (4, 4), (32, 2), (64, 1)]
# coarse blocks wider than 128: L = 256 as the one-pass forward over factor groups and its backward
# (64x3 at these rows through the dense coarse blocks, 8x6 one pass per group), and single levels of
# 256 and 512 (the slab kernels, kernels/wide.py); not in the torch.compile rows, which compile each
# shape anew
WIDE_SHAPES = [(64, 3), (8, 6), (256, 1), (512, 1)]
# DreamBooth's block_num=8 with N=3 and ControlNet's block_num=4 with N=2 on 1280-wide layers
# (L = 160): the backward through dense coarse blocks (kernels/coarse.py), as (n, b, N)
COARSE_SHAPES = [(1280, 40, 3), (1280, 80, 2)]
CAYLEY_SHAPES = [(1024, 8), (128, 32)]
# preflight: the same code paths (packed, multi-level, wide block, coarse backward) at interpreter
# sizes (the coarse backward needs a few L rows)
PREFLIGHT = dict(T=64, n=256, butterfly=[(4, 1), (8, 2), (64, 1)], wide=[(8, 6), (256, 1)], cayley=[(8, 8), (2, 32)],
                 coarse_T=320, coarse=[(320, 40, 3), (320, 80, 2)])
BF16_BOUND = 1e-2


def copy_bandwidth(device, numel: int) -> float:
    """Device copy bandwidth in GB/s (read + write of a bf16 tensor)."""
    from boft_triton.kernels._common import do_bench

    x = torch.empty(numel, dtype=torch.bfloat16, device=device)
    ms = do_bench(lambda: x.clone(), device)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative norm error in fp64; NaN or inf is reported as inf (never passes)."""
    a = a.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def bench_butterfly(T: int, n: int, b: int, N: int, bandwidth: float, device, impls=("triton", "torch")) -> list[dict]:
    from boft_triton import torch_ops
    from boft_triton.kernels import butterfly as kb
    from boft_triton.kernels._common import do_bench

    x = torch.randn(T, n, device=device, dtype=torch.bfloat16, requires_grad=True)
    Q = torch_ops.cayley(torch.randn(N, n // b, b, b, device=device) * 0.3).requires_grad_()
    g = torch.randn_like(x)
    # the fp64 answer on the very inputs every implementation gets
    x64, Q64 = x.detach().double().requires_grad_(), Q.detach().double().requires_grad_()
    y64 = torch_ops.butterfly(x64, Q64)
    dx64, dQ64 = torch.autograd.grad(y64, (x64, Q64), g.double())
    known = {"triton": kb.butterfly, "torch": torch_ops.butterfly,
             "torch.compile": lambda: torch.compile(torch_ops.butterfly)}
    rows = []
    io_bytes = 2 * x.numel() * x.element_size()  # one read and one write of x
    for name in impls:
        fn = known[name]() if name == "torch.compile" else known[name]
        y = fn(x, Q)
        dx, dQ = torch.autograd.grad(y, (x, Q), g)
        err = {"y": _rel(y, y64), "dx": _rel(dx, dx64), "dQ": _rel(dQ, dQ64)}
        fwd = do_bench(lambda: fn(x.detach(), Q.detach()), device)
        both = do_bench(lambda: torch.autograd.grad(fn(x, Q), (x, Q), g), device)
        rows.append({"op": "butterfly", "impl": name, "T": T, "n": n, "b": b, "N": N, "fwd_ms": fwd,
                     "fwd_bwd_ms": both, "fwd_bw_fraction": io_bytes / fwd / 1e6 / bandwidth,
                     # backward reads x and g and writes dx: 3 passes over x-sized tensors
                     "bwd_bw_fraction": 1.5 * io_bytes / max(both - fwd, 1e-6) / 1e6 / bandwidth,
                     "rel_err": err, "correct": max(err.values()) <= BF16_BOUND})
    return rows


def bench_cayley(blocks: int, b: int, device) -> list[dict]:
    from boft_triton import reference
    from boft_triton.kernels import cayley as kc
    from boft_triton.kernels._common import do_bench

    R = (torch.randn(1, blocks, b, b, device=device) * 0.3).requires_grad_()
    G = torch.randn(1, blocks, b, b, device=device)
    R64 = R.detach().double().requires_grad_()
    Q64 = reference.dense_cayley(R64)
    (dR64,) = torch.autograd.grad(Q64, R64, G.double())

    def solve(R):
        S = 0.5 * (R - R.transpose(-1, -2))
        eye = torch.eye(b, device=R.device).expand_as(S)
        return torch.linalg.solve(eye + S, eye - S, left=False)

    rows = []
    for name, fn in {"triton": kc.cayley, "torch.linalg.solve": solve}.items():
        Q = fn(R)
        (dR,) = torch.autograd.grad(Q, R, G)
        err = {"Q": _rel(Q, Q64), "dR": _rel(dR, dR64)}
        ms = do_bench(lambda: torch.autograd.grad(fn(R), R, G), device)
        rows.append({"op": "cayley", "impl": name, "blocks": blocks, "b": b, "fwd_bwd_ms": ms,
                     "rel_err": err, "correct": max(err.values()) <= 1e-4})  # fp32 (tf32-free) solve
    return rows


def _err(r: dict) -> str:
    worst = max(r["rel_err"].values())
    return f"{worst:.1e}" + ("" if r["correct"] else " **WRONG**")


def markdown(card: str, bandwidth: float, rows: list[dict], env: dict) -> str:
    lines = [f"# GPU check on {card}", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}; "
             f"copy bandwidth {bandwidth:.0f} GB/s; worst relative error of y/dx/dQ (Q/dR) against fp64", "",
             "| op | impl | shape | fwd ms | fwd+bwd ms | fwd % copy BW | bwd % copy BW | rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "butterfly":
            shape = f"T={r['T']} n={r['n']} b={r['b']} N={r['N']}"
            lines.append(f"| butterfly | {r['impl']} | {shape} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{100 * r['fwd_bw_fraction']:.0f}% | {100 * r['bwd_bw_fraction']:.0f}% | {_err(r)} |")
        else:
            lines.append(f"| cayley | {r['impl']} | {r['blocks']} x {r['b']}x{r['b']} | | {r['fwd_bwd_ms']:.3f} | | | "
                         f"{_err(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--preflight", action="store_true",
                        help="the same steps on the CPU at tiny sizes, kernels in Triton's interpreter")
    args = parser.parse_args(argv)
    if args.preflight:
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit runs (the kernels import lazily)
        device, T, n = torch.device("cpu"), PREFLIGHT["T"], PREFLIGHT["n"]
        butterfly_shapes, cayley_shapes, copy_numel = PREFLIGHT["butterfly"], PREFLIGHT["cayley"], 1 << 16
        wide_shapes = PREFLIGHT["wide"]
        coarse_T, coarse_shapes = PREFLIGHT["coarse_T"], PREFLIGHT["coarse"]
    elif torch.cuda.is_available():
        device, T, n = torch.device("cuda"), args.T, args.n
        butterfly_shapes, cayley_shapes, copy_numel = BUTTERFLY_SHAPES, CAYLEY_SHAPES, 1 << 28
        wide_shapes = WIDE_SHAPES
        coarse_T, coarse_shapes = args.T, COARSE_SHAPES
    else:
        print("gpu_check needs a CUDA device (or --preflight)", file=sys.stderr)
        return 2
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu-interpreter"
    env = {"torch": torch.__version__, "triton": triton.__version__, "commit": source_commit()[0],
           "date": time.strftime("%Y-%m-%d")}
    stem = f"gpu-check-{card.replace(' ', '-').lower()}-{env['date']}"
    bandwidth = copy_bandwidth(device, copy_numel)
    rows: list[dict] = []

    def write() -> str:  # after every shape: a timeout keeps what was measured
        payload = {"card": card, **env, "copy_bandwidth_gbs": bandwidth, "rows": rows}
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
        table = markdown(card, bandwidth, rows, env)
        (out / f"{stem}.md").write_text(table)
        return table

    for b, N in butterfly_shapes + wide_shapes:
        rows += bench_butterfly(T, n, b, N, bandwidth, device)
        write()
    for blocks, b in cayley_shapes:
        rows += bench_cayley(blocks, b, device)
        write()
    # after the Cayley rows (a time limit cuts these first; 64x3 above already takes the coarse
    # backward on a GPU)
    for coarse_n, b, N in coarse_shapes:
        rows += bench_butterfly(coarse_T, coarse_n, b, N, bandwidth, device)
        write()
    # last: inductor compiles each shape anew (tens of seconds), so a time limit cuts these rows only
    for b, N in butterfly_shapes:
        rows += bench_butterfly(T, n, b, N, bandwidth, device, impls=("torch.compile",))
        write()
    print(write())
    wrong = [r for r in rows if not r["correct"]]
    if wrong:
        print(f"{len(wrong)} implementation(s) computed a wrong result (rel err column)", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
