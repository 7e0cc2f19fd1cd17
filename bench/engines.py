"""Step time and peak memory per rank under each engine: boft_triton BOFT against PEFT LoRA.

    python -m boft_triton.bench.engines                       # every engine this machine runs
    python -m boft_triton.bench.engines --engines ddp,zero3 --steps 3

For each engine (DDP and FSDP2 through ``torchrun``; DeepSpeed ZeRO-2 and ZeRO-3 through
``accelerate launch`` with ``configs/accelerate_deepspeed_zero{2,3}.yaml``, when deepspeed is
installed) and each method (``peft-lora-r16``, ``boft_triton-b8-N2`` on q/v of a tiny Llama),
two processes (``--nproc``) train the same global batch, each rank on its share. Every rank times ``--steps``
steps after ``--warmup`` (median) and then measures one step's peak resident-set growth (the
CPU probe of ``training_step``; ``torch.cuda.max_memory_allocated`` on GPUs). The table gives
both per rank and boft_triton's ratio to LoRA under the same engine, all measured in one run.
Writes ``<device>-<date>-engines.json`` and ``.md`` into --output-dir (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
METHODS = ("peft-lora-r16", "boft_triton-b8-N2")
GLOBAL_BATCH, SEQ_LEN = 4, 128
ROOT = Path(__file__).resolve().parent.parent


def _method(name: str):
    from .methods import ours, peft_lora

    return peft_lora(16) if name == "peft-lora-r16" else ours(8, 2)


# ----------------------------------------------------------------------------- one rank


def _device():
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


def _backend() -> str:
    return "nccl" if _device().type == "cuda" else "gloo"


def _wrap(model, engine: str, world: int):
    """The engine's model and optimizer wrapping (what a user's script does)."""
    import torch
    import torch.distributed as dist

    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group(_backend())
        model = DistributedDataParallel(model)
        return model, torch.optim.AdamW(params(model), lr=1e-3), None
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group(_backend())
        for layer in [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
            fully_shard(layer)  # per transformer block, as accelerate's FSDP2 plugin wraps
        fully_shard(model)
        return model, torch.optim.AdamW(params(model), lr=1e-3), None
    from accelerate import Accelerator

    from boft_triton.deepspeed_support import fix_accelerate_process_count

    accelerator = Accelerator()  # the DeepSpeed plugin comes from the launch config
    fix_accelerate_process_count()  # accelerate counts one process per rank under DeepSpeed on CPU
    # no dataloader is prepared, so DeepSpeed is told the per-process batch
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // world
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(params(model), lr=1e-3))
    return model, optimizer, accelerator


def worker(engine: str, method_name: str, steps: int, warmup: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from .training_step import cpu_rss
    from .workloads import tiny_llama

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    work = tiny_llama(batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN)
    method = _method(method_name)
    torch.manual_seed(1)
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = method.build(work.model, list(work.targets), list(work.heads)).to(device)
    model.train()
    model, optimizer, accelerator = _wrap(model, engine, world)
    share = GLOBAL_BATCH // world
    batch = {k: v[rank * share:(rank + 1) * share].to(device) for k, v in work.batch.items()}

    def step() -> float:
        loss = model(**batch).loss
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(steps):
        dist.barrier()
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    memory: dict = {}
    if device.type == "cuda":  # the step's own peak: allocated at its peak less at its start
        torch.cuda.reset_peak_memory_stats(device)
        begin = torch.cuda.memory_allocated(device)
        step()
        memory["rss_peak_growth_mib"] = (torch.cuda.max_memory_allocated(device) - begin) / 2**20
    else:
        with cpu_rss().measure(memory):
            step()
    row = {"engine": engine, "method": method_name, "rank": rank, "world": world,
           "step_ms": 1e3 * statistics.median(times), "step_ms_all": [1e3 * t for t in times],
           "rss_peak_growth_mib": memory.get("rss_peak_growth_mib"),
           "rss_at_step_start_mib": memory.get("rss_at_step_start_mib"),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    (out / f"{engine}-{method_name}-rank{rank}.json").write_text(json.dumps(row) + "\n")
    from boft_triton.cli.process_group import end_process_group, exit_without_finalizing

    del model, optimizer
    if end_process_group(accelerator):
        exit_without_finalizing(0)


# ----------------------------------------------------------------------------- the launcher


def available_engines() -> list[str]:
    import importlib.util

    return [e for e in ENGINES if not e.startswith("zero") or importlib.util.find_spec("deepspeed")]


def launch(engine: str, method: str, steps: int, warmup: int, out: Path, nproc: int = 2) -> None:
    """``nproc`` processes of ``worker`` under the engine's launcher (loopback, a free port)."""
    args = ["-m", "boft_triton.bench.engines", "--worker", "--engine", engine, "--method", method,
            "--steps", str(steps), "--warmup", str(warmup), "--output-dir", str(out)]
    if engine.startswith("zero"):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / f"accelerate_deepspeed_{engine}.yaml"), "--num_processes", str(nproc),
               "--main_process_port", "0", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    # run outside the checkout: from its root, the kernels/ folder would answer `import kernels`
    # (bitsandbytes probes Hugging Face's package of that name)
    paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(paths)}
    subprocess.run(cmd, check=True, env=env, cwd=out)


def markdown(rows: list[dict], env: dict) -> str:
    nproc = env["nproc"]
    memory = "peak allocated growth" if env["device"] != "cpu" else "peak RSS growth"
    per_rank = " / ".join(str(k) for k in range(nproc))
    lines = [f"# Engines: step time and peak memory per rank, tiny Llama (q/v), global batch {GLOBAL_BATCH} x "
             f"{SEQ_LEN}, {nproc} process(es) ({env['device']}, torch {env['torch']}, {env['date']}, commit "
             f"{env['commit']})", "",
             f"| engine | method | step ms (rank {per_rank}) | {memory} MiB (rank {per_rank}) | step vs LoRA | "
             "memory vs LoRA |",
             "|---|---|---|---|---|---|"]
    by = {(r["engine"], r["method"], r["rank"]): r for r in rows}
    for engine in dict.fromkeys(r["engine"] for r in rows):
        for method in METHODS:
            ranks = [by.get((engine, method, k)) for k in range(nproc)]
            lora = [by.get((engine, METHODS[0], k)) for k in range(nproc)]
            if None in ranks or None in lora:
                continue
            step = " / ".join(f"{r['step_ms']:.1f}" for r in ranks)
            mem = " / ".join("n/a" if r["rss_peak_growth_mib"] is None else f"{r['rss_peak_growth_mib']:.1f}"
                             for r in ranks)
            ratio_t = statistics.mean(r["step_ms"] / lo["step_ms"] for r, lo in zip(ranks, lora))
            mems = [(r["rss_peak_growth_mib"], lo["rss_peak_growth_mib"]) for r, lo in zip(ranks, lora)]
            ratio_m = (f"{statistics.mean(a / b for a, b in mems):.2f}x"
                       if all(a is not None and b for a, b in mems) else "n/a")
            lines.append(f"| {engine} | {method} | {step} | {mem} | {ratio_t:.2f}x | {ratio_m} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=None, help=f"comma-separated, of {', '.join(ENGINES)} (default: all installed)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2, help="processes per engine (1 on a single GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output-dir", default="bench/results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.engine, args.method, args.steps, args.warmup, Path(args.output_dir))
        return 0
    engines = args.engines.split(",") if args.engines else available_engines()
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {unknown}: choose from {', '.join(ENGINES)}")
    import torch

    from .training_step import source_commit

    scratch = Path(tempfile.mkdtemp(prefix="boft-engines-"))
    rows = []
    try:
        for engine in engines:
            for method in METHODS:
                launch(engine, method, args.steps, args.warmup, scratch, args.nproc)
        rows = [json.loads(p.read_text()) for p in sorted(scratch.glob("*.json"))]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    env = {"device": device, "nproc": args.nproc, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "commit": source_commit()[0]}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device.replace(' ', '-').lower()}-{env['date']}-engines"
    table = markdown(rows, env)
    (out / f"{stem}.json").write_text(json.dumps({"kind": "boft_triton.bench.engines", **env, "rows": rows}, indent=1)
                                      + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
