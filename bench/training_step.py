"""One training step (forward + backward + AdamW), method against method, in one process.

Each method is built on a fresh copy of the same base model and timed on the same batch: a few
warm-up steps, then the median of the timed ones. Memory is CUDA's peak allocation on a GPU; on
the CPU it is the bytes autograd saves for backward during the forward (the activation memory a
method adds), which is exact and repeatable where process RSS is not. Ratios are to the floor
(frozen base, no adapter) measured in the same run.
"""

from __future__ import annotations

import copy
import gc
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass

import torch

from .methods import Method, peft_butterfly_without_cuda_extension


@dataclass
class Workload:
    name: str
    model: torch.nn.Module  # the base model, never trained itself
    batch: dict
    targets: list[str]
    heads: list[str]

    @property
    def tokens(self) -> int:
        return int(self.batch["input_ids"].numel())


def _saved_bytes():
    """Context that counts the bytes autograd saves for backward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: Method, work: Workload, device: torch.device, warmup: int, steps: int, lr: float = 1e-3) -> dict:
    torch.manual_seed(0)
    with peft_butterfly_without_cuda_extension():
        model = method.build(copy.deepcopy(work.model), list(work.targets), list(work.heads)).to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        batch = {k: v.to(device) for k, v in work.batch.items()}

        def step():
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        hooks, saved = _saved_bytes()
        for i in range(steps):
            _sync(device)
            start = time.perf_counter()
            if i == 0:
                with hooks:
                    losses.append(step())
            else:
                losses.append(step())
            _sync(device)
            times.append(time.perf_counter() - start)
    row = {
        "method": method.name,
        "family": method.family,
        "step_ms": 1e3 * statistics.median(times),
        "tokens_per_s": work.tokens / statistics.median(times),
        "trainable_params": sum(p.numel() for p in params),
        "saved_activations_mib": sum(saved.values()) / 2**20,
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
    }
    if device.type == "cuda":
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    del model, optimizer
    gc.collect()
    return row


def add_ratios(rows: list[dict], baseline_names=("floor",)) -> list[dict]:
    by_name = {r["method"]: r for r in rows}
    memory_key = "peak_mem_mib" if "peak_mem_mib" in rows[0] else "saved_activations_mib"
    for base in baseline_names:
        ref = by_name.get(base)
        if ref is None:
            continue
        for r in rows:
            r[f"time_vs_{base}"] = r["step_ms"] / ref["step_ms"]
            r[f"memory_vs_{base}"] = r[memory_key] / max(ref[memory_key], 1e-9)
    return rows


def environment(device: torch.device) -> dict:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }


def run(work: Workload, methods: list[Method], device: torch.device, warmup: int = 2, steps: int = 5,
        progress=None) -> list[dict]:
    rows = []
    for method in methods:
        if progress:
            progress(method.name)
        row = measure(method, work, device, warmup, steps)
        row["workload"] = work.name
        rows.append(row)
    return add_ratios(rows, ("floor",) + tuple(r["method"] for r in rows if r["family"] == "lora")[:1])


def markdown_table(rows: list[dict]) -> str:
    memory_key = "peak_mem_mib" if "peak_mem_mib" in rows[0] else "saved_activations_mib"
    lora = next((r["method"] for r in rows if r["family"] == "lora"), None)
    head = ["method", "step ms", "x floor", "tokens/s", f"{'peak' if memory_key == 'peak_mem_mib' else 'saved act.'} MiB",
            "mem x floor", "trainable", "loss first -> last"]
    if lora:
        head.insert(3, f"x {lora}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['step_ms']:.1f}", f"{r['time_vs_floor']:.2f}", f"{r['tokens_per_s']:.0f}",
                 f"{r[memory_key]:.1f}", f"{r['memory_vs_floor']:.2f}", f"{r['trainable_params']:,}",
                 f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"]
        if lora:
            cells.insert(3, f"{r[f'time_vs_{lora}']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
