"""One-call GPU check for the kernels (issue 3): CUDA tests, then microbenchmarks and a table.

Run from the source tree on the device machine (nothing installed there):

    PYTHONPATH=. python -m boft_triton.bench.gpu_check --out "$OUT"

1. butterfly forward and forward+backward at T=16384, n=4096, bf16, (b, N) in
   {(4,1), (8,2), (4,4), (32,2), (64,1)} (packed 16-wide dots, 16/32/64-wide tensor-core blocks):
   Triton kernels vs the torch path vs torch.compile of the torch path, as time and as a fraction
   of the measured device copy bandwidth (issue 8's targets: forward >= 80%, backward >= 60%);
2. Cayley forward+backward for 1024 blocks of 8x8 and 128 of 32x32 vs torch.linalg.solve;
3. pytest of the kernel tests on CUDA (fp32/bf16/fp16 cases are in the tests themselves), last,
   so the measurements are saved even if the tests run out of the call's time.
Writes ``gpu-check-<card>-<date>.json`` and ``.md`` into --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BUTTERFLY_SHAPES = [(4, 1), (8, 2), (4, 4), (32, 2), (64, 1)]
CAYLEY_SHAPES = [(1024, 8), (128, 32)]


def copy_bandwidth(numel: int = 1 << 28) -> float:
    """Device copy bandwidth in GB/s (read + write of a bf16 tensor)."""
    from triton.testing import do_bench

    x = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: x.clone())
    return 2 * x.numel() * x.element_size() / ms / 1e6


def bench_butterfly(T: int, n: int, b: int, N: int, bandwidth: float) -> list[dict]:
    from triton.testing import do_bench

    from boft_triton import torch_ops
    from boft_triton.kernels import butterfly as kb

    x = torch.randn(T, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    Q = torch_ops.cayley(torch.randn(N, n // b, b, b, device="cuda") * 0.3).requires_grad_()
    g = torch.randn_like(x)
    compiled = torch.compile(torch_ops.butterfly)
    impls = {"triton": kb.butterfly, "torch": torch_ops.butterfly, "torch.compile": compiled}
    rows = []
    io_bytes = 2 * x.numel() * x.element_size()  # one read and one write of x
    for name, fn in impls.items():
        fwd = do_bench(lambda: fn(x.detach(), Q.detach()))
        both = do_bench(lambda: torch.autograd.grad(fn(x, Q), (x, Q), g))
        rows.append({"op": "butterfly", "impl": name, "T": T, "n": n, "b": b, "N": N, "fwd_ms": fwd,
                     "fwd_bwd_ms": both, "fwd_bw_fraction": io_bytes / fwd / 1e6 / bandwidth,
                     # backward reads x and g and writes dx: 3 passes over x-sized tensors
                     "bwd_bw_fraction": 1.5 * io_bytes / max(both - fwd, 1e-6) / 1e6 / bandwidth})
    return rows


def bench_cayley(blocks: int, b: int) -> list[dict]:
    from triton.testing import do_bench

    from boft_triton.kernels import cayley as kc

    R = (torch.randn(1, blocks, b, b, device="cuda") * 0.3).requires_grad_()
    G = torch.randn(1, blocks, b, b, device="cuda")

    def solve(R):
        S = 0.5 * (R - R.transpose(-1, -2))
        eye = torch.eye(b, device=R.device).expand_as(S)
        return torch.linalg.solve(eye + S, eye - S, left=False)

    rows = []
    for name, fn in {"triton": kc.cayley, "torch.linalg.solve": solve}.items():
        ms = do_bench(lambda: torch.autograd.grad(fn(R), R, G))
        rows.append({"op": "cayley", "impl": name, "blocks": blocks, "b": b, "fwd_bwd_ms": ms})
    return rows


def markdown(card: str, bandwidth: float, rows: list[dict], tests_rc: int | None) -> str:
    lines = [f"# GPU check on {card}", "", f"copy bandwidth {bandwidth:.0f} GB/s; kernel tests exit code {'not run yet' if tests_rc is None else tests_rc}", "",
             "| op | impl | shape | fwd ms | fwd+bwd ms | fwd % copy BW | bwd % copy BW |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["op"] == "butterfly":
            shape = f"T={r['T']} n={r['n']} b={r['b']} N={r['N']}"
            lines.append(f"| butterfly | {r['impl']} | {shape} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{100 * r['fwd_bw_fraction']:.0f}% | {100 * r['bwd_bw_fraction']:.0f}% |")
        else:
            lines.append(f"| cayley | {r['impl']} | {r['blocks']} x {r['b']}x{r['b']} | | {r['fwd_bwd_ms']:.3f} | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--T", type=int, default=16384)
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # measurements first, written at once: the tests compile every kernel variant they touch, and
    # if they run out the device call's time the numbers must already be saved
    card = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    rows = []
    for b, N in BUTTERFLY_SHAPES:
        rows += bench_butterfly(args.T, args.n, b, N, bandwidth)
    for blocks, b in CAYLEY_SHAPES:
        rows += bench_cayley(blocks, b)
    import triton

    payload = {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
               "copy_bandwidth_gbs": bandwidth, "tests_exit_code": None, "rows": rows}
    stem = f"gpu-check-{card.replace(' ', '-').lower()}-{payload['date']}"

    def write(tests_rc):
        payload["tests_exit_code"] = tests_rc
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
        table = markdown(card, bandwidth, rows, tests_rc)
        (out / f"{stem}.md").write_text(table)
        return table

    write(None)
    tests_rc = 0
    if not args.skip_tests:
        tests = ["tests/test_kernels.py", "tests/test_kernel_layers.py", "tests/test_torch_path.py"]
        # (the ahead-of-time sm_90 compile test is for machines without a GPU: skipped here)
        tests_rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", *tests, "-k", "not compile_for_sm90",
                                    f"--junitxml={out / 'gpu-tests.xml'}"])
    print(write(tests_rc))
    return tests_rc


if __name__ == "__main__":
    raise SystemExit(main())
