"""``boft-triton bench`` (also ``python -m boft_triton.bench.command``): the training-step benchmark.

Runs floor, PEFT LoRA (r=16, 32), PEFT OFT (b=32) and BOFT at (block size, factors) = (4, 1),
(8, 2), (4, 4) three ways: PEFT's, PEFT's under ``boft_triton.patch_peft()`` and ours, on one
workload, side by side in one process, and writes

- ``<output-dir>/<device>-<date>-<workload>.json``: the results (schema: ``training_step``'s docstring),
- ``<stem>.md``: the same as a Markdown table,
- ``<stem>-time.png``, ``<stem>-memory.png``: step time and memory per method relative to the floor.

Examples::

    python -m boft_triton.bench.command                          # CPU: MiniLM on reviews
    python -m boft_triton.bench.command --workload tiny-llama
    python -m boft_triton.bench.command --workload llama-1b --targets all-linear --seq-len 2048  # GPU
    python -m boft_triton.bench.command --methods floor,peft-lora-r16,boft_triton-b4-N1 --steps 3
    python -m boft_triton.bench.command --workload tiny-llama --quantize nf4   # QBOFT against QLoRA

Method names: ``floor``, ``peft-lora-r<r>``, ``peft-oft-b<b>``, ``peft-boft-b<b>-N<N>``,
``peft-boft-patched-b<b>-N<N>``, ``boft_triton-b<b>-N<N>``. A shape that does not fit the workload's layers is skipped with the
reason printed (and recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HELP = ("benchmark one training step: floor, PEFT LoRA/OFT/BOFT, PEFT BOFT under patch_peft() and boft_triton BOFT, "
        "side by side")


def _pairs(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        if not item.strip():
            continue
        try:
            b, n = item.strip().lower().split("x")
            out.append((int(b), int(n)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"BOFT shape {item!r} is not BLOCKxFACTORS (e.g. 4x1)") from None
    return out


def _ints(spec: str) -> list[int]:
    try:
        return [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r} is not a comma-separated list of integers") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .methods import DEFAULT_BOFT_SHAPES, DEFAULT_LORA_RANKS, DEFAULT_OFT_BLOCK_SIZES
    from .workloads import QUANTIZE, WORKLOADS

    g = p.add_argument_group("workload")
    g.add_argument("--workload", default=None, choices=sorted(WORKLOADS) + ["serve"],
                   help="model and batch (default: minilm on CPU, llama-1b on a GPU); 'serve': the serving "
                        "benchmark instead (mixed-adapter batches over K = 1, 4, 16 adapters, bench/serving.py)")
    g.add_argument("--targets", default="default", choices=("default", "qv", "all-linear"),
                   help="modules to adapt: the workload's default (MiniLM: query,key,value; Llama: q/v), "
                        "q/v projections, or every linear layer of the blocks")
    g.add_argument("--batch-size", type=int, default=None,
                   help="examples per step (default: minilm 16, tiny-llama 4, llama-1b 4, llama-3b 2)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per example (default: minilm 128, tiny-llama 128, llama-1b 2048 (issue 5's setting), llama-3b 1024)")
    g.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="model dtype (default: fp32 for minilm/tiny-llama, bf16 for llama-*)")
    g.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="put the base's block linears in bitsandbytes (4-bit NF4/FP4 with double quantisation, "
                        "or 8-bit) before adapting: QLoRA (peft-lora-r16) against QBOFT (boft_triton-*); "
                        "PEFT's OFT and BOFT do not adapt bitsandbytes layers and are skipped")
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is steadier on a shared machine; "
                        "with torch 2.13 CPU, more than 1 set here breaks batched solves of blocks from ~150 wide)")

    g = p.add_argument_group("methods")
    default_boft = ",".join(f"{b}x{n}" for b, n in DEFAULT_BOFT_SHAPES)
    g.add_argument("--boft", type=_pairs, default=list(DEFAULT_BOFT_SHAPES),
                   help=f"BOFT shapes as BLOCKxFACTORS, comma-separated, each run by PEFT, by PEFT under patch_peft() "
                        f"and by us (default: {default_boft})")
    g.add_argument("--lora-ranks", type=_ints, default=list(DEFAULT_LORA_RANKS),
                   help="PEFT LoRA ranks (default: %s)" % ",".join(map(str, DEFAULT_LORA_RANKS)))
    g.add_argument("--oft-block-sizes", type=_ints, default=list(DEFAULT_OFT_BLOCK_SIZES),
                   help="PEFT OFT block sizes (default: %s; '' for none)" % ",".join(map(str, DEFAULT_OFT_BLOCK_SIZES)))
    g.add_argument("--no-peft-boft", action="store_true", help="leave PEFT's BOFT, patched and not, out (it is slow and memory-hungry)")
    g.add_argument("--methods", default=None,
                   help="run only these method names, comma-separated, out of the list the options above give")

    g = p.add_argument_group("run")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps per method (default: 2)")
    g.add_argument("--steps", type=int, default=5, help="timed steps per method; the median is reported (default: 5)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    g.add_argument("--strict", action="store_true", help="stop at the first method that fails (default: record it)")
    g.add_argument("--output-dir", default="bench/results", help="where the JSON, Markdown and PNGs go (default: bench/results)")
    g.add_argument("--name", default=None, help="file stem (default: <device>-<date>-<workload>)")
    g.add_argument("--no-plots", action="store_true", help="write no PNGs")


def select_methods(args: argparse.Namespace):
    from .methods import default_methods

    methods = default_methods(boft_shapes=args.boft, lora_ranks=args.lora_ranks,
                              oft_block_sizes=args.oft_block_sizes, peft_boft_too=not args.no_peft_boft)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = {m.name: m for m in methods}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            from boft_triton.cli.errors import CLIError

            raise CLIError(f"unknown method(s) {unknown}; with these options the methods are {sorted(known)} "
                             "(add shapes with --boft / --lora-ranks / --oft-block-sizes)")
        methods = [known[w] for w in wanted]
    return methods


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from boft_triton.cli.errors import CLIError

    for option, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                                 ("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 1),
                                 ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise CLIError(f"{option} must be at least {least}, got {value}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: no CUDA GPU is available here")
    # set (and restore) the thread count only when asked: with torch 2.13.0+cpu (MKL 2024.2) any
    # torch.set_num_threads call, even to the current count, leaves batched linalg.inv/solve of
    # matrices from about 150 wide wrong or hanging for the rest of the process
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        if args.threads:
            torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device) -> int:
    from . import workloads

    if args.workload == "serve":
        from . import serving

        return serving.run(argparse.Namespace(**{**vars(args), "device": str(device), "threads": None}))
    from .training_step import environment, markdown_table, results
    from .training_step import run as run_methods

    name = args.workload or ("llama-1b" if device.type == "cuda" else "minilm")
    spec = workloads.WORKLOADS[name]
    if spec.device != device.type:
        print(f"note: {name} is meant for {spec.device}; running it on {device.type} anyway", flush=True)
    methods = select_methods(args)
    print(f"building {name} ...", flush=True)
    if args.quantize:
        import importlib.util

        from boft_triton.cli.errors import CLIError

        if importlib.util.find_spec("bitsandbytes") is None:
            raise CLIError("--quantize needs bitsandbytes: pip install 'boft-triton[quant]'")
    work = workloads.build(name, args.batch_size, args.seq_len, args.targets, args.dtype, args.quantize, device)
    env = environment(device)
    print(f"{work.name}: batch {work.batch_size} x {work.seq_len} tokens, {work.dtype}, targets {work.targets}; "
          f"{env['device']}; {len(methods)} methods, {args.warmup} warm-up + {args.steps} timed steps each", flush=True)
    rows = run_methods(work, methods, device, args.warmup, args.steps, lr=args.lr, strict=args.strict,
                       progress=lambda m: print(f"  {m}", flush=True))
    payload = results(work, rows, env, args.warmup, args.steps, args.lr)
    payload["settings"]["argv"] = getattr(args, "argv", None)
    table = markdown_table(rows)
    print(f"\n{table}\n")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{env['device_slug']}-{env['date']}-{work.name}"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown_report(payload, table))
    written = [json_path, out / f"{stem}.md"]
    if not args.no_plots:
        from .plots import plot_results

        written += plot_results(json_path, out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def markdown_report(payload: dict, table: str) -> str:
    env, work, s = payload["environment"], payload["workload"], payload["settings"]
    lines = [
        f"# Training step: {work['name']} on {env['device']}",
        "",
        f"- workload: {work['description']}; batch {work['batch_size']} x {work['seq_len']} tokens "
        f"({work['tokens']} per step), {work['dtype']}, targets {', '.join(work['targets'])}",
        f"- base weights: {work['base_weights_mib']:.1f} MiB" if work.get("base_weights_mib") is not None else "",
        f"- {s['warmup']} warm-up + {s['steps']} timed steps per method (median), AdamW lr {s['lr']}",
        f"- torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, triton {env['triton']}, "
        f"boft_triton backend {env['boft_backend']}, commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}, "
        f"{env['datetime']}",
        f"- memory column: {payload['memory_metric']}; ratios against {', '.join(payload['baselines'])}",
    ]
    if env.get("cpu_rss_note"):
        lines.append(f"- RSS growth not measured: {env['cpu_rss_note']}")
    return "\n".join(line for line in lines if line) + "\n\n" + table + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="boft-triton bench", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from boft_triton.cli.errors import CLIError

    try:
        return run(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
