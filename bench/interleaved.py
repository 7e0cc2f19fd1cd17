"""Step times on a busy machine: one training step of each method in turn, round after round.

``boft-triton bench`` times each method's steps back to back, so load from other processes that
comes and goes lands on whichever method runs at that moment. Interleaving the methods step by
step spreads it evenly; the medians are comparable even when the absolute times are not.
Time only: memory and the full report come from ``boft-triton bench``.

    python -m boft_triton.bench.interleaved --workload tiny-llama --quantize nf4 \\
        --methods floor,peft-lora-r16,boft_triton-b4-N1,boft_triton-b8-N2 --rounds 15 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from . import workloads
    from .command import add_arguments, select_methods
    from .methods import peft_butterfly_without_cuda_extension

    parser = argparse.ArgumentParser(prog="python -m boft_triton.bench.interleaved", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default: 15, after 2 untimed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or "cpu")
    work = workloads.build(args.workload or "tiny-llama", args.batch_size, args.seq_len, args.targets, args.dtype,
                           args.quantize, device)
    batch = {k: v.to(device) for k, v in work.batch.items()}
    runs = {}
    with peft_butterfly_without_cuda_extension():
        for method in select_methods(args):
            reason = method.skip_reason(work.model, work.targets)
            if reason is None and work.quantization and not method.quantized_base:
                reason = "does not adapt bitsandbytes layers"
            if reason:
                print(f"{method.name}: skipped, {reason}")
                continue
            torch.manual_seed(0)
            model = method.build(copy.deepcopy(work.model), list(work.targets), list(work.heads)).to(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            runs[method.name] = (model, torch.optim.AdamW(params, lr=args.lr) if params else None, [])

        for round_index in range(args.rounds + 2):
            for model, optimizer, times in runs.values():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(**batch).loss.backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_index >= 2:
                    times.append(1e3 * (time.perf_counter() - start))
    print(f"{work.name}: batch {work.batch_size} x {work.seq_len}, {work.dtype}, targets {work.targets}, "
          f"{args.rounds} interleaved rounds, {torch.get_num_threads()} thread(s) on {device}")
    base = statistics.median(next(iter(runs.values()))[2]) if runs else None
    for name, (_, _, times) in runs.items():
        median = statistics.median(times)
        print(f"  {name:24s} median {median:8.1f} ms  (x{median / base:.2f} of the first)  min {min(times):8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
