"""Serving many adapters over one base: a mixed-adapter batch against the alternatives.

    boft-triton bench --workload serve [--device cpu|cuda] [--output-dir DIR]
    python -m boft_triton.bench.serving

One batch of prompts (default 16) whose samples are spread over K adapters (K = 1, 4, 16), timed
as one forward and as a short greedy ``generate``, five ways in one process:

- ``base``: the base model alone (no adapter): the floor;
- ``boft mixed``: boft_triton, one call with ``adapter_names`` (one segmented butterfly per
  adapted layer, one base GEMM for all rows);
- ``boft loop``: boft_triton, K calls, one per adapter's sub-batch after ``set_adapter``;
- ``boft merged``: one adapter merged into the base (what serving a single adapter costs); K = 1 only;
- ``lora mixed``: PEFT LoRA r16 with ``adapter_names`` on the same base and batch, for scale.

The model is a Llama built from a config (tiny on CPU, Llama-3.2-1B dims on a GPU), random weights
and adapters: speed only. Writes ``<device>-<date>-serve.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

K_VALUES = (1, 4, 16)


def _timed(fn, device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build(device, workload: str, adapters: int, block_size: int, factors: int, lora_rank: int):
    """The base, a BOFTModel and a PEFT LoRA model with ``adapters`` adapters each (a0, a1, ...)."""
    import peft

    from boft_triton import BOFTConfig, adapt

    from . import workloads

    work = workloads.build(workload, batch_size=1, seq_len=8, device=device)
    base = work.model.to(device).eval()
    targets = list(work.targets)
    torch.manual_seed(0)
    boft = adapt(copy.deepcopy(base), BOFTConfig(target_modules=targets, boft_block_size=block_size,
                                                 boft_n_butterfly_factor=factors, init_weights=False),
                 adapter_name="a0")
    for k in range(1, adapters):
        boft.add_adapter(f"a{k}", BOFTConfig(target_modules=targets, boft_block_size=block_size,
                                             boft_n_butterfly_factor=factors, init_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=lora_rank, target_modules=targets,
                                                                          init_lora_weights=False), adapter_name="a0")
        for k in range(1, adapters):
            lora.add_adapter(f"a{k}", peft.LoraConfig(r=lora_rank, target_modules=targets, init_lora_weights=False))
    return base, boft.eval(), lora.eval(), work


def _add_merged(add, boft, ids, gen) -> None:
    """One adapter merged into a copy of the base (what serving a single adapter costs); the copy
    is freed on return."""
    merged = copy.deepcopy(boft)
    merged.set_adapter("a0")
    merged = merged.merge_and_unload()
    add("boft merged", 1, lambda: merged(input_ids=ids), lambda: merged.generate(input_ids=ids, **gen))


def measure(device, workload="tiny-llama", batch=16, seq_len=64, new_tokens=8, repeats=5, block_size=8,
            factors=2, lora_rank=16) -> dict:
    base, boft, lora, work = build(device, workload, max(K_VALUES), block_size, factors, lora_rank)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    rows = []

    def add(method, K, forward, generate):
        with torch.no_grad():
            f_ms = _timed(forward, device, repeats)
            g_ms = _timed(generate, device, max(1, repeats // 2))
        rows.append({"method": method, "K": K, "forward_ms": f_ms, "forward_tokens_per_s": batch * seq_len / f_ms * 1e3,
                     "generate_ms": g_ms, "generate_tokens_per_s": batch * new_tokens / g_ms * 1e3})
        print(f"  K={K:<2} {method:<12} forward {f_ms:8.2f} ms   generate {g_ms:8.1f} ms", flush=True)

    add("base", 0, lambda: base(input_ids=ids), lambda: base.generate(input_ids=ids, **gen))
    _add_merged(add, boft, ids, gen)
    for K in K_VALUES:
        names = [f"a{i % K}" for i in range(batch)]
        rows_of = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}

        def loop(call):
            for name, rows_k in rows_of.items():
                boft.set_adapter(name)
                call(ids[rows_k])

        add("boft mixed", K, lambda: boft(input_ids=ids, adapter_names=names),
            lambda: boft.generate(input_ids=ids, adapter_names=names, **gen))
        add("boft loop", K, lambda: loop(lambda x: boft(input_ids=x)),
            lambda: loop(lambda x: boft.generate(input_ids=x, **gen)))
        add("lora mixed", K, lambda: lora(input_ids=ids, adapter_names=names),
            lambda: lora.generate(input_ids=ids, adapter_names=names, **gen))
    from .training_step import environment

    env = environment(device)
    floor = next(r for r in rows if r["method"] == "base")
    for r in rows:
        r["forward_x_base"] = r["forward_ms"] / floor["forward_ms"]
        r["generate_x_base"] = r["generate_ms"] / floor["generate_ms"]
    return {"kind": "boft_triton.bench.serving", "environment": env,
            "settings": {"workload": work.name, "batch": batch, "seq_len": seq_len, "new_tokens": new_tokens,
                         "repeats": repeats, "boft": {"block_size": block_size, "factors": factors,
                                                      "targets": list(work.targets)},
                         "lora_rank": lora_rank, "K": list(K_VALUES)},
            "rows": rows}


def markdown(payload: dict) -> str:
    s, env = payload["settings"], payload["environment"]
    lines = [f"# Serving many adapters: {s['workload']} on {env['device']}", "",
             f"- batch {s['batch']} prompts x {s['seq_len']} tokens, generate {s['new_tokens']} new tokens (greedy); "
             f"median of {s['repeats']} forwards; BOFT b{s['boft']['block_size']} N{s['boft']['factors']} and LoRA "
             f"r{s['lora_rank']} on {', '.join(s['boft']['targets'])}; torch {env['torch']}, commit {env['commit']}, "
             f"{env['date']}", "",
             "| K adapters | method | forward ms | x base | forward tokens/s | generate ms | x base | generated tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['K'] or '-'} | {r['method']} | {r['forward_ms']:.2f} | {r['forward_x_base']:.2f} | "
                     f"{r['forward_tokens_per_s']:.0f} | {r['generate_ms']:.1f} | {r['generate_x_base']:.2f} | "
                     f"{r['generate_tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        workload = "llama-1b" if device.type == "cuda" else "tiny-llama"
        print(f"serving benchmark: {workload} on {device}", flush=True)
        payload = measure(device, workload=workload, batch=args.batch_size or 16, seq_len=args.seq_len or 64,
                          repeats=max(1, args.steps))
    finally:
        if getattr(args, "threads", None):  # only when set: see bench/command.py
            torch.set_num_threads(threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = payload["environment"]
    stem = args.name or f"{env['device_slug']}-{env['date']}-serve"
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(payload)
    (out / f"{stem}.md").write_text(table)
    print("\n" + table + f"\nwrote {out / stem}.json, .md", flush=True)
    return 0


def main(argv=None) -> int:
    from .command import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
