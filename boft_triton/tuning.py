"""Tune the butterfly kernels on the real layer shapes of a model and cache the winners.

``collect_shapes(model)`` lists the ``(n, b, N, dtype)`` of every adapted layer, ``tune(...)``
times each candidate tile forward and backward (``triton.testing.do_bench`` on CUDA, a CPU
wall-clock timer under ``TRITON_INTERPRET=1``) and writes the winners to a JSON cache keyed by
device name, Triton version, dtype and shape. The kernel launchers read that cache at run time
(once per file, memoised); ``BOFT_TRITON_TUNE_CACHE`` points them at another file.

This module imports Triton and the kernels lazily, so it is importable without them.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

CACHE_ENV = "BOFT_TRITON_TUNE_CACHE"
CACHE_FORMAT = 1


@lru_cache(maxsize=1)
def default_cache_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("boft_triton")) / "tune.json"


def cache_path() -> Path:
    """The cache file the launchers read: ``$BOFT_TRITON_TUNE_CACHE`` or the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else default_cache_path()


_resolve_cache_path = cache_path  # tune() has a parameter of the same name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cache_key(device_name: str, triton_version: str, dtype: torch.dtype, n: int, b: int, N: int) -> str:
    return f"{device_name}|triton={triton_version}|{_dtype_name(dtype)}|n={n},b={b},N={N}"


@lru_cache(maxsize=8)
def _load(path: str) -> dict:
    """Entries of one cache file (memoised per path; ``clear_memo`` after writing)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    return data.get("entries", {})


def clear_memo() -> None:
    _load.cache_clear()
    _entry.cache_clear()


def lookup(device_name: str, n: int, b: int, N: int, dtype: torch.dtype) -> dict | None:
    """The cached entry ``{"fwd": config, "bwd": config, ...}`` for this shape, or None."""
    try:
        import triton
    except ImportError:
        return None
    return _entry(str(cache_path()), cache_key(device_name, triton.__version__, dtype, n, b, N))


@lru_cache(maxsize=4096)
def _entry(path: str, key: str) -> dict | None:
    """Memoised per (file, key): kernel launches look their tile up on every call."""
    return _load(path).get(key)


def _write(path: Path, new_entries: dict) -> None:
    """Merge ``new_entries`` into the cache file atomically (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = dict(_load.__wrapped__(str(path)))  # fresh read, not the memo
    entries.update(new_entries)
    fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    clear_memo()


def collect_shapes(model: torch.nn.Module) -> list[tuple[int, int, int, torch.dtype]]:
    """``(n, b, N, dtype)`` of every adapter of every adapted layer (modules with a ``boft_R``
    ParameterDict; R is ``[N, D, b, b]``, ``n = D*b``), deduplicated in model order. dtype is the
    activations' dtype: the base layer's weight dtype where there is one, else R's."""
    shapes: list[tuple[int, int, int, torch.dtype]] = []
    for module in model.modules():
        params = getattr(module, "boft_R", None)
        if not isinstance(params, torch.nn.ParameterDict):
            continue
        base = getattr(module, "base_layer", module)
        weight = getattr(base, "weight", None)
        for R in params.values():
            if R.dim() != 4:
                continue
            N, D, b, _ = R.shape
            dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else R.dtype
            shape = (int(D * b), int(b), int(N), dtype)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def _default_device() -> torch.device:
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


def tune(
    shapes,
    tokens_per_step: int,
    dtype: torch.dtype | None = None,
    cache_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    verbose: bool = True,
    max_configs: int | None = None,
) -> list[dict]:
    """Time every candidate tile of each shape's forward and backward; cache and return the winners.

    shapes: ``(n, b, N[, dtype])`` tuples, e.g. from ``collect_shapes``. tokens_per_step: rows T
    of the activations (batch x sequence). dtype overrides the shapes' dtypes. cache_path
    defaults to ``$BOFT_TRITON_TUNE_CACHE`` or the user cache dir. Returns one row per shape and
    direction: shape, path (dot block widths, packing), best config, time in ms and achieved GB/s.
    """
    from boft_triton.kernels import _common
    from boft_triton.kernels import butterfly as kb
    from boft_triton.torch_ops import cayley

    device = torch.device(device) if device is not None else _default_device()
    path = Path(cache_path) if cache_path is not None else _resolve_cache_path()
    dev_name = _common.device_name(device)
    gen = torch.Generator().manual_seed(0)
    rows, new_entries = [], {}
    for shape in shapes:
        n, b, N = (int(v) for v in shape[:3])
        dt = dtype or (shape[3] if len(shape) > 3 else torch.bfloat16)
        T = int(tokens_per_step)
        x = torch.randn(T, n, generator=gen).to(device=device, dtype=dt)
        g = torch.randn(T, n, generator=gen).to(device=device, dtype=dt)
        Q = cayley(0.1 * torch.randn(N, n // b, b, b, generator=gen)).to(device)
        es = x.element_size()
        q_bytes = Q.numel() * 4
        Qg = Q.clone().requires_grad_()
        work = {  # whole calls: block builder + kernels (the backward config is timed with dQ wanted)
            "fwd": (lambda: kb.butterfly(x, Q), 2 * T * n * es + q_bytes),
            "bwd": (lambda: torch.autograd.grad(kb.butterfly(x, Qg), Qg, g), 3 * T * n * es + 2 * q_bytes),
        }
        entry = {}
        for kind, (fn, nbytes) in work.items():
            best = None
            configs = kb.candidates(n, b, N, kind)
            if max_configs is not None:
                configs = configs[:max_configs]
            for cfg in configs:
                with kb.forced_config(kind, cfg):
                    ms = _common.do_bench(fn, device)
                if best is None or ms < best[1]:
                    best = (cfg, ms)
            cfg, ms = best
            entry[kind] = dict(cfg)
            entry[f"{kind}_ms"] = ms
            row = {
                "n": n, "b": b, "N": N, "dtype": _dtype_name(dt), "T": T, "kind": kind,
                "path": kb.path_name(n, b, N),
                "config": dict(cfg), "time_ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9,
                "candidates": len(configs),
            }
            rows.append(row)
            if verbose:
                print(format_table([row], header=not rows[:-1]), flush=True)
        new_entries[cache_key(dev_name, _common.TRITON_VERSION, dt, n, b, N)] = entry
    if new_entries:
        _write(path, new_entries)
    return rows


def format_table(rows: list[dict], header: bool = True) -> str:
    """A fixed-width table of ``tune`` rows."""
    cols = ("shape", "dtype", "T", "kind", "path", "config", "ms", "GB/s")
    lines = []
    fmt = "{:<18} {:<9} {:>7} {:<4} {:<6} {:<32} {:>9} {:>8}"
    if header:
        lines.append(fmt.format(*cols))
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        lines.append(
            fmt.format(
                f"n{r['n']}-b{r['b']}-N{r['N']}", r["dtype"], r["T"], r["kind"], r["path"], cfg,
                f"{r['time_ms']:.4f}", f"{r['gbps']:.1f}",
            )
        )
    return "\n".join(lines)
