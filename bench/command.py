"""``boft-triton bench``: the training-step benchmark, written as JSON + Markdown under results/."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

HELP = "benchmark one training step: floor, PEFT LoRA/OFT/BOFT and boft_triton BOFT, side by side"


def _pairs(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        b, n = item.strip().split("x")
        out.append((int(b), int(n)))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="minilm", choices=("minilm", "tiny-llama"),
                   help="model and batch (default: the default training job's MiniLM on reviews)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--boft", default="4x1,4x2", help="BOFT shapes as BLOCKxFACTORS, comma-separated (default: 4x1,4x2)")
    p.add_argument("--lora-ranks", default="8", help="PEFT LoRA ranks, comma-separated (default: 8)")
    p.add_argument("--oft-block-sizes", default="", help="PEFT OFT block sizes, comma-separated (default: none)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", default="bench/results", help="where <device>-<date>.json/.md go")


def run(args: argparse.Namespace) -> int:
    from .methods import default_methods
    from .training_step import environment, markdown_table
    from .training_step import run as run_methods
    from . import workloads

    work = (workloads.minilm_reviews(args.batch_size, args.seq_len) if args.workload == "minilm"
            else workloads.tiny_llama(args.batch_size, args.seq_len))
    methods = default_methods(
        boft_shapes=_pairs(args.boft),
        lora_ranks=[int(r) for r in args.lora_ranks.split(",") if r],
        oft_block_sizes=[int(b) for b in args.oft_block_sizes.split(",") if b],
    )
    device = torch.device(args.device)
    rows = run_methods(work, methods, device, args.warmup, args.steps, progress=lambda m: print(f"  {m} ...", flush=True))
    env = environment(device)
    table = markdown_table(rows)
    print(f"\n{work.name}, batch {args.batch_size} x {args.seq_len} tokens, {env['device']}\n\n{table}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['device'].split(' (')[0].replace(' ', '-').lower()}-{work.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    payload = {"schema": 1, "environment": env, "workload": {"name": work.name, "batch_size": args.batch_size,
               "seq_len": args.seq_len, "tokens": work.tokens, "targets": work.targets}, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(f"# {work.name} on {env['device']}\n\n{env}\n\n{table}\n")
    print(f"\nwrote {out / stem}.json and .md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="boft-triton bench", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
