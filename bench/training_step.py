"""One training step (forward + backward + AdamW), method against method, in one process.

Each method is built on a fresh copy of the same base model and run on the same batch: ``warmup``
untimed steps, ``steps`` timed ones (the median is reported), then one more step that measures
memory. Ratios are to the floor (frozen base, no adapter) and to PEFT LoRA r=16 (the first LoRA
row when r=16 is not in the run), all measured in the same run.

Memory
------
- GPU: ``peak_mem_mib`` is ``torch.cuda.max_memory_allocated`` over the timed and memory steps
  (weights, optimizer state, activations, everything); ``peak_mem_growth_mib`` is that peak less
  what was allocated when the step began (the step's own transient memory).
- Both devices: ``saved_activations_mib``, the bytes autograd saves for backward during the
  forward (each storage once, parameters and buffers excluded): exact and repeatable, the
  activation memory a method adds.
- CPU: ``rss_peak_growth_mib``, the growth of the process's resident set during one step (peak
  less the resident set when it began), the CPU analogue of ``peak_mem_growth_mib``. Plain RSS
  says little, because glibc keeps freed memory for reuse; so for the measured step only, large
  allocations (>= 64 KiB) are forced to ``mmap`` (returned to the OS on free), the heap is trimmed
  first, and the peak is read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``.
  Timed steps run with glibc's thresholds pinned to the values its dynamic tuning settles at
  (mmap 32 MiB, trim 64 MiB), the same for every method. Where this is not possible (not Linux or
  not glibc) the field is null and ``environment.cpu_rss_note`` says why.

Results JSON (``schema`` 2)
---------------------------
::

    {
      "schema": 2,
      "kind": "boft_triton.bench.training_step",
      "environment": {"device": "CPU (...)" | GPU name, "device_type": "cpu" | "cuda",
                      "device_slug": "cpu" | "nvidia-h100-80gb-hbm3" ..., "cpu": str, "threads": int,
                      "gpu_memory_gib": float | null, "python", "torch", "transformers", "peft",
                      "triton": str | null, "cuda": str | null, "boft_backend": "torch" | "triton",
                      "commit": str | null, "dirty": bool | null, "date": "YYYY-MM-DD",
                      "datetime": ISO 8601, "platform": str, "cpu_rss_note": str | null},
      "workload": {"name", "description", "batch_size", "seq_len", "tokens" (per step, padding
                   included), "dtype", "targets": [module names], "targets_preset", "heads",
                   "base_params"},
      "settings": {"warmup", "steps", "lr", "argv": the command's arguments | null},
      "memory_metric": the row key charts and "mem" columns use ("peak_mem_mib" on GPU,
                       "rss_peak_growth_mib" on CPU, "saved_activations_mib" if RSS is unavailable),
      "baselines": ["floor", "peft-lora-r16"] (those present),
      "rows": [{
        "method": "floor" | "peft-lora-r16" | "peft-oft-b32" | "peft-boft-b4-N1" | "peft-boft-patched-b4-N1"
                  | "boft_triton-b4-N1" ...,
        "label": short name, "family": "floor" | "lora" | "oft" | "boft", "config": {hyper-parameters},
        "status": "ok" | "skipped" | "error", "reason": why skipped / the error (else null),
        # when status == "ok":
        "step_ms": median, "step_ms_min": fastest, "step_ms_all": [every timed step],
        "tokens_per_s": tokens / median,
        "trainable_params", "saved_activations_mib", "rss_peak_growth_mib" (CPU) | null,
        "rss_at_step_start_mib" (CPU) | null, "peak_mem_mib" (GPU) | null, "peak_mem_growth_mib" (GPU) | null,
        "losses": [every step's loss, warm-up first], "loss_first", "loss_last",
        "ratios": {"floor": {metric: row / floor}, "peft-lora-r16": {...}}  # metrics: step_ms,
                  tokens_per_s and the memory keys above, null where either side is null or 0
      }]
    }

Every method starts from the same weights and the same random state before its first step, so
``loss_first`` agrees across methods (all adapters start at the identity): a cheap check that the
methods train the same model on the same batch.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .methods import Method, peft_butterfly_without_cuda_extension

SCHEMA = 2
KIND = "boft_triton.bench.training_step"
RATIO_METRICS = ("step_ms", "tokens_per_s", "saved_activations_mib", "rss_peak_growth_mib",
                 "peak_mem_mib", "peak_mem_growth_mib")
LORA_BASELINE = "peft-lora-r16"
MIB = 2**20


@dataclass
class Workload:
    name: str
    model: torch.nn.Module  # the base model, never trained itself
    batch: dict
    targets: list[str]
    heads: list[str]
    batch_size: int = 0
    seq_len: int = 0
    dtype: str = "fp32"
    description: str = ""
    targets_preset: str = "default"
    quantization: Optional[str] = None  # nf4 | fp4 | int8: the base's linears are bitsandbytes layers

    @property
    def tokens(self) -> int:
        """Tokens per step: input ids (padding included), or batch x seq_len for other inputs
        (a UNet's latent pixels)."""
        if "input_ids" in self.batch:
            return int(self.batch["input_ids"].numel())
        return self.batch_size * self.seq_len

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "tokens": self.tokens, "dtype": self.dtype,
                "targets": list(self.targets), "targets_preset": self.targets_preset, "heads": list(self.heads),
                "base_params": sum(p.numel() for p in self.model.parameters()),
                "quantization": self.quantization,
                # what the base's weights take (4-bit weights count as stored, packed; their
                # per-block scales are not parameters and are left out)
                "base_weights_mib": sum(p.numel() * p.element_size() for p in self.model.parameters()) / MIB}


# ----------------------------------------------------------------------------- memory probes


def _saved_bytes(exclude: set[int]):
    """Context counting the bytes autograd saves for backward (each storage once), leaving out
    the storages in ``exclude`` (parameters and buffers, resident anyway)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


class CpuRss:
    """Peak resident-set growth of this process during a block (Linux + glibc); see the module
    docstring. ``available`` is False, with ``why``, elsewhere."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    TIMING = (32 * MIB, 64 * MIB)  # glibc's dynamic mmap threshold maximum, and twice it for trim
    MEASURE = (64 * 1024, 128 * 1024)

    def __init__(self) -> None:
        self.libc, self.why = None, None
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            self.why = f"needs Linux with glibc (this is {platform.system()} {platform.libc_ver()[0] or ''})".strip()
            return
        try:
            libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._status()
        except OSError as err:
            self.why = f"cannot reset or read the resident-set peak ({err})"
            return
        self.libc = libc

    @property
    def available(self) -> bool:
        return self.libc is not None

    @staticmethod
    def _status() -> dict[str, float]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024 / MIB
        return out

    def _thresholds(self, mmap: int, trim: int) -> None:
        self.libc.mallopt(self.M_MMAP_THRESHOLD, mmap)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, trim)

    def timing_regime(self) -> None:
        if self.available:
            self._thresholds(*self.TIMING)

    @contextlib.contextmanager
    def measure(self, result: dict):
        """Fills ``result`` with ``rss_at_step_start_mib`` and ``rss_peak_growth_mib``."""
        if not self.available:
            yield
            return
        gc.collect()
        self._thresholds(*self.MEASURE)
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = self._status()["VmRSS"]
        try:
            yield
        finally:
            end = self._status()
            self._thresholds(*self.TIMING)
        result["rss_at_step_start_mib"] = start
        result["rss_peak_growth_mib"] = max(end["VmHWM"] - start, 0.0)


_CPU_RSS: Optional[CpuRss] = None


def cpu_rss() -> CpuRss:
    global _CPU_RSS
    if _CPU_RSS is None:
        _CPU_RSS = CpuRss()
    return _CPU_RSS


# ----------------------------------------------------------------------------- one method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: Method, work: Workload, device: torch.device, warmup: int = 2, steps: int = 5,
            lr: float = 1e-3) -> dict:
    """Build ``method`` on a copy of ``work.model`` and time ``steps`` training steps; one row."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    rss = cpu_rss() if device.type == "cpu" else None
    torch.manual_seed(0)
    # PEFT's N > 1 path without its CUDA extension; a method's own context (patch_peft()) goes inside.
    with peft_butterfly_without_cuda_extension(), (method.context or contextlib.nullcontext)():
        model = method.build(copy.deepcopy(work.model), list(work.targets), list(work.heads)).to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # A floor without a head has nothing to train: its step is forward + backward.
        optimizer = torch.optim.AdamW(params, lr=lr) if params else None
        batch = {k: v.to(device) for k, v in work.batch.items()}
        resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

        def step():
            loss = model(**batch).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        torch.manual_seed(1234)  # same dropout draws for every method from here on
        losses = [step() for _ in range(warmup)]
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            losses.append(step())
            _sync(device)
            times.append(time.perf_counter() - start)

        # The memory step: untimed, with the saved-tensor hooks and the RSS probe on.
        memory: dict = {}
        hooks, saved = _saved_bytes(resident)
        step_start_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        with rss.measure(memory) if rss is not None else contextlib.nullcontext():
            with hooks:
                losses.append(step())
        _sync(device)
    median = statistics.median(times)
    row = {
        "step_ms": 1e3 * median,
        "step_ms_min": 1e3 * min(times),
        "step_ms_all": [1e3 * t for t in times],
        "tokens_per_s": work.tokens / median,
        "trainable_params": sum(p.numel() for p in params),
        "saved_activations_mib": sum(saved.values()) / MIB,
        "rss_peak_growth_mib": memory.get("rss_peak_growth_mib"),
        "rss_at_step_start_mib": memory.get("rss_at_step_start_mib"),
        "peak_mem_mib": None,
        "peak_mem_growth_mib": None,
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_mem_mib"] = peak / MIB
        row["peak_mem_growth_mib"] = (peak - step_start_alloc) / MIB
    del model, optimizer, params, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- a run


def _method_fields(method: Method, work: Workload) -> dict:
    return {"method": method.name, "label": method.label or method.name, "family": method.family,
            "config": dict(method.config), "workload": work.name}


def run(work: Workload, methods: list[Method], device: torch.device, warmup: int = 2, steps: int = 5,
        progress: Optional[Callable[[str], None]] = None, lr: float = 1e-3, strict: bool = False) -> list[dict]:
    """Every method on ``work``: rows with ``status`` ok / skipped (does not fit, or PEFT missing) /
    error (the exception, e.g. out of memory; re-raised with ``strict``). Ratios added."""
    say = progress or (lambda message: None)
    if device.type == "cpu":
        cpu_rss().timing_regime()
    rows = []
    for method in methods:
        row = _method_fields(method, work)
        reason = method.skip_reason(work.model, work.targets)
        if reason is None and work.quantization and not method.quantized_base:
            reason = f"{method.label or method.name} does not adapt bitsandbytes layers"
        if reason is None and method.name.startswith("peft-"):
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                reason = "peft is not installed"
        if reason is not None:
            say(f"{method.name}: skipped, {reason}")
            rows.append({**row, "status": "skipped", "reason": reason})
            continue
        say(f"{method.name} ...")
        message = None
        try:
            row.update(measure(method, work, device, warmup, steps, lr))
            row.update(status="ok", reason=None)
        except Exception as err:  # noqa: BLE001 - one failing method must not lose the others
            if strict:
                raise
            text = str(err).strip()
            message = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        if message is not None:  # outside the except block: the traceback (and the model) is gone
            say(f"{method.name}: error, {message}")
            row.update(status="error", reason=message)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return add_ratios(rows)


def baselines(rows: list[dict]) -> list[str]:
    """``floor`` and the LoRA reference (r=16, else the first LoRA row), those measured."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    names = [r["method"] for r in ok]
    out = ["floor"] if "floor" in names else []
    lora = LORA_BASELINE if LORA_BASELINE in names else next((r["method"] for r in ok if r["family"] == "lora"), None)
    return out + ([lora] if lora else [])


def add_ratios(rows: list[dict], baseline_names: Optional[list[str]] = None) -> list[dict]:
    by_name = {r["method"]: r for r in rows if r.get("status", "ok") == "ok"}
    names = baseline_names if baseline_names is not None else baselines(rows)
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        r["ratios"] = {}
        for base in names:
            ref = by_name.get(base)
            if ref is None:
                continue
            ratios = {}
            for key in RATIO_METRICS:
                a, b = r.get(key), ref.get(key)
                ratios[key] = a / b if a is not None and b else None
            r["ratios"][base] = ratios
    return rows


def memory_metric(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    for key in ("peak_mem_mib", "rss_peak_growth_mib"):
        if ok and all(r.get(key) is not None for r in ok):
            return key
    return "saved_activations_mib"


MEMORY_NAMES = {"peak_mem_mib": "CUDA peak", "peak_mem_growth_mib": "CUDA step growth",
                "rss_peak_growth_mib": "RSS step growth", "saved_activations_mib": "saved act."}


# ----------------------------------------------------------------------------- reporting


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """One line per method: time, throughput and memory, each also as ratios to the baselines."""
    names = baselines(rows)
    mem = memory_metric(rows)
    extra = "saved_activations_mib" if mem != "saved_activations_mib" else None
    short = {"floor": "floor"}
    short.update({n: n.replace("peft-", "").replace("-r", " r") for n in names if n != "floor"})
    head = ["method", "step ms"] + [f"x {short[n]}" for n in names] + ["tokens/s", f"{MEMORY_NAMES[mem]} MiB"]
    head += [f"mem x {short[n]}" for n in names]
    if extra:
        head += [f"{MEMORY_NAMES[extra]} MiB"] + [f"act. x {short[n]}" for n in names]
    head += ["trainable", "loss first -> last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status", "ok") != "ok":
            cells = [r["method"], f"{r['status']}: {r.get('reason')}"] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            continue
        ratios = r.get("ratios", {})
        cells = [r["method"], f"{r['step_ms']:.1f}"]
        cells += [_fmt(ratios.get(n, {}).get("step_ms"), ".2f") for n in names]
        cells += [f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] >= 100 else f"{r['tokens_per_s']:.3g}", _fmt(r.get(mem), ".1f")]
        cells += [_fmt(ratios.get(n, {}).get(mem), ".2f") for n in names]
        if extra:
            cells += [_fmt(r.get(extra), ".1f")] + [_fmt(ratios.get(n, {}).get(extra), ".2f") for n in names]
        cells += [f"{r['trainable_params']:,}", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


COMMIT_ENV = "BOFT_TRITON_COMMIT"


def source_commit() -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the source tree the benchmark runs from: ``$BOFT_TRITON_COMMIT`` when
    set (the GPU machine gets the working tree with a stale or no ``.git``: seen on the first
    H200 call, whose git named the session's starting commit), else git's answer, else
    (None, None)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV], None
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status) if status is not None else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def environment(device: torch.device) -> dict:
    import transformers

    from boft_triton import ops

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = source_commit()
    cpu = _cpu_name()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu_memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        slug = _slug(name)
    else:
        n = torch.get_num_threads()
        name, gpu_memory, slug = f"CPU ({cpu}, {n} thread{'' if n == 1 else 's'})", None, "cpu"
    now = _dt.datetime.now().astimezone()
    rss = cpu_rss()
    try:
        backend = ops.backend_for(torch.empty(0, device=device))
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        backend = f"unavailable ({err})"
    return {
        "device": name,
        "device_type": device.type,
        "device_slug": slug,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu_memory_gib": gpu_memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "boft_backend": backend,
        "boft_backend_env": os.environ.get("BOFT_TRITON_BACKEND", "auto"),
        "commit": commit,
        "dirty": dirty,
        "date": now.strftime("%Y-%m-%d"),
        "datetime": now.isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_rss_note": None if device.type != "cpu" or rss.available else rss.why,
    }


def results(work: Workload, rows: list[dict], env: dict, warmup: int, steps: int, lr: float = 1e-3) -> dict:
    """The results JSON payload (schema in the module docstring)."""
    return {
        "schema": SCHEMA,
        "kind": KIND,
        "environment": env,
        "workload": work.describe(),
        "settings": {"warmup": warmup, "steps": steps, "lr": lr},
        "memory_metric": memory_metric(rows),
        "baselines": baselines(rows),
        "rows": rows,
    }


def validate(payload: dict) -> None:
    """Raise ``ValueError`` if ``payload`` is not a schema-2 results document (used by the tests
    and by ``plots`` before drawing)."""
    problems = []
    for key in ("schema", "kind", "environment", "workload", "settings", "memory_metric", "baselines", "rows"):
        if key not in payload:
            problems.append(f"missing {key!r}")
    if problems:
        raise ValueError("not a training-step results file: " + ", ".join(problems))
    if payload["schema"] != SCHEMA or payload["kind"] != KIND:
        raise ValueError(f"expected schema {SCHEMA} of {KIND}, got {payload['schema']} of {payload['kind']}")
    for key in ("device", "device_type", "torch", "commit", "date"):
        if key not in payload["environment"]:
            problems.append(f"environment.{key}")
    for key in ("name", "batch_size", "seq_len", "tokens", "targets"):
        if key not in payload["workload"]:
            problems.append(f"workload.{key}")
    for i, row in enumerate(payload["rows"]):
        for key in ("method", "label", "family", "config", "status"):
            if key not in row:
                problems.append(f"rows[{i}].{key}")
        if row.get("status") == "ok":
            for key in ("step_ms", "step_ms_all", "tokens_per_s", "trainable_params", "saved_activations_mib",
                        "rss_peak_growth_mib", "peak_mem_mib", "losses", "loss_first", "loss_last", "ratios"):
                if key not in row:
                    problems.append(f"rows[{i}].{key}")
        elif row.get("status") in ("skipped", "error"):
            if not row.get("reason"):
                problems.append(f"rows[{i}].reason")
        else:
            problems.append(f"rows[{i}].status={row.get('status')!r}")
    if problems:
        raise ValueError("results file lacks: " + ", ".join(problems))
