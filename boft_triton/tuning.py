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
import warnings
from functools import lru_cache
from pathlib import Path

import torch

CACHE_ENV = "BOFT_TRITON_TUNE_CACHE"
# Bumped when the kernels a cached config drives change under it: format 2's backward of blocks
# 136-160 wide (one level, or a coarse block) also writes dx in its dMc pass, a heavier kernel than
# format 1's entries were timed on (at 4 warps it spills kilobytes); format 3's does so up to 192
# wide on Hopper, and its backward entries are timed with dx wanted (format 2's were timed with
# dQ alone, so they picked among the lighter kernels).
CACHE_FORMAT = 3


class TuneCacheWarning(UserWarning):
    """The tuning cache could not be read (or has no entries yet): kernels use their default tiles."""


class TuneCacheError(RuntimeError):
    """The tuning cache could not be written, or its default location is unknown."""


@lru_cache(maxsize=1)
def default_cache_path() -> Path:
    try:
        import platformdirs
    except ImportError:
        raise TuneCacheError(
            "the default tuning cache lives in the user cache dir, which boft_triton finds with platformdirs, and "
            f"platformdirs is not installed: pip install platformdirs, or set {CACHE_ENV}=FILE"
        ) from None
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


# Kernel launches never fail because of the cache: whatever goes wrong reading it, they take their
# default tiles and say so once per process and problem (a cache is only ever a speed-up).
_WARNED: set[str] = set()


def warn_once(message: str, topic: str | None = None) -> None:
    """Warn once per process and topic (default: the message itself)."""
    topic = topic or message
    if topic not in _WARNED:
        _WARNED.add(topic)
        warnings.warn(message, TuneCacheWarning, stacklevel=2)


_DEFAULT_TILES = "the Triton kernels use their default tiles"


class _Missing(str):
    """The problem "no cache file yet": the normal state of an untuned machine."""


def _read(path: Path) -> tuple[dict, str | None]:
    """``(entries, problem)`` of one cache file: the entries ({} when unusable) and, when the file
    is missing or unusable, why, in words."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}, _Missing(f"no tuning cache at {path} yet: {_DEFAULT_TILES} (`boft-triton tune` picks tiles for a "
                            "model's shapes)")
    except IsADirectoryError:
        return {}, f"the tuning cache {path} is a folder, not a file: {_DEFAULT_TILES}"
    except OSError as err:
        return {}, f"cannot read the tuning cache {path} ({err.strerror or err}): {_DEFAULT_TILES}"
    try:
        data = json.loads(raw)
    except ValueError:  # JSON and UTF-8 decoding errors alike
        return {}, f"the tuning cache {path} is not valid JSON (corrupt or half-written): {_DEFAULT_TILES}"
    old = data.get("format") if isinstance(data, dict) else None
    if isinstance(old, int) and not isinstance(old, bool) and 1 <= old < CACHE_FORMAT:
        return {}, (f"the tuning cache {path} was timed on older kernels (format {old}, now {CACHE_FORMAT}): "
                    f"{_DEFAULT_TILES}; run `boft-triton tune` again")
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}, f"{path} is not a boft_triton tuning cache of format {CACHE_FORMAT}: {_DEFAULT_TILES}"
    return data["entries"], None


@lru_cache(maxsize=8)
def _load(path: str) -> dict:
    """Entries of one cache file for the launchers (memoised per path; ``clear_memo`` after writing)."""
    entries, problem = _read(Path(path))
    if problem is not None:
        # the untuned state is normal (a fresh machine, or per-test caches): said once per process
        warn_once(problem, topic="missing" if isinstance(problem, _Missing) else None)
    return entries


def clear_memo() -> None:
    _load.cache_clear()
    _entry.cache_clear()


def lookup(device_name: str, n: int, b: int, N: int, dtype: torch.dtype) -> dict | None:
    """The cached entry ``{"fwd": config, "bwd": config, ...}`` for this shape, or None (never
    raises: a cache that cannot be found or read means default tiles, with one warning)."""
    try:
        import triton
    except ImportError:
        return None
    try:
        path = cache_path()
    except Exception as err:  # platformdirs missing, or no home directory to put the cache in
        warn_once(f"cannot locate the tuning cache ({err}): {_DEFAULT_TILES}")
        return None
    return _entry(str(path), cache_key(device_name, triton.__version__, dtype, n, b, N))


@lru_cache(maxsize=4096)
def _entry(path: str, key: str) -> dict | None:
    """Memoised per (file, key): kernel launches look their tile up on every call."""
    entry = _load(path).get(key)
    if entry is not None and not isinstance(entry, dict):
        warn_once(f"the tuning cache {path} has a malformed entry for {key}: {_DEFAULT_TILES} for that shape")
        return None
    return entry


def valid_config(cfg, required: tuple[str, ...]) -> bool:
    """Whether a cached tile has every key the launcher needs, each a positive int, with row tiles
    and warps powers of two (what Triton compiles)."""
    if not isinstance(cfg, dict):
        return False
    for key in required:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return False
        if key in ("BT", "num_warps") and value & (value - 1):
            return False
    stages = cfg.get("num_stages", 1)
    return isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1


def _write(path: Path, new_entries: dict) -> None:
    """Merge ``new_entries`` into the cache file atomically (temp file + os.replace); raises
    TuneCacheError, saying where and why, when the file cannot be written."""
    entries, problem = _read(path)  # fresh read, not the memo
    if problem is not None and path.is_file():
        warnings.warn(f"{problem}; replacing it with the new entries", TuneCacheWarning, stacklevel=3)
    entries = {**entries, **new_entries}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise TuneCacheError(
            f"cannot write the tuning cache {path} ({err.strerror or err}): pass --cache FILE (or set {CACHE_ENV}=FILE) "
            "to write another file"
        ) from err
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
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


def _tuned_shapes(shapes) -> list[tuple]:
    """``shapes`` with each one's kernel keys (``butterfly.tuning_keys``): a shape whose low levels
    run as a one-pass prefix tunes that prefix under its own key too."""
    from boft_triton.kernels import butterfly as kb

    out = []
    for shape in shapes:
        for key in kb.tuning_keys(*(int(v) for v in shape[:3])):
            keyed = (*key, *shape[3:])
            if keyed not in out:
                out.append(keyed)
    return out


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
    progress: bool = False,
) -> list[dict]:
    """Time every candidate tile of each shape's forward and backward; cache and return the winners.

    shapes: ``(n, b, N[, dtype])`` tuples, e.g. from ``collect_shapes``. tokens_per_step: rows T
    of the activations (batch x sequence). dtype overrides the shapes' dtypes. cache_path
    defaults to ``$BOFT_TRITON_TUNE_CACHE`` or the user cache dir. verbose prints each row as it
    is done; progress shows a bar over every (shape, direction, tile) with its estimate (stderr).
    Returns one row per shape and direction: shape, path (dot block widths, packing), best
    config, time in ms and achieved GB/s.
    """
    from tqdm.auto import tqdm

    from boft_triton.kernels import _common
    from boft_triton.kernels import butterfly as kb
    from boft_triton.torch_ops import cayley

    device = torch.device(device) if device is not None else _default_device()
    path = Path(cache_path) if cache_path is not None else _resolve_cache_path()
    if path.is_dir():  # fail before the timing, not after it
        raise TuneCacheError(f"the tuning cache {path} is a folder: pass --cache FILE (or set {CACHE_ENV}=FILE)")
    dev_name = _common.device_name(device)
    gen = torch.Generator().manual_seed(0)
    rows, new_entries = [], {}
    shapes = _tuned_shapes(shapes)
    bar = tqdm(total=count_candidates(shapes, max_configs, dtype), desc="tuning", unit="tile", disable=not progress)
    for shape in shapes:
        n, b, N = (int(v) for v in shape[:3])
        dt = dtype or (shape[3] if len(shape) > 3 else torch.bfloat16)
        T = int(tokens_per_step)
        x = torch.randn(T, n, generator=gen).to(device=device, dtype=dt)
        g = torch.randn(T, n, generator=gen).to(device=device, dtype=dt)
        Q = cayley(0.1 * torch.randn(N, n // b, b, b, generator=gen)).to(device)
        es = x.element_size()
        q_bytes = Q.numel() * 4
        Qg, xg = Q.clone().requires_grad_(), x.clone().requires_grad_()
        # whole calls: block builder + kernels. The backward is timed with dx and dQ wanted, as for
        # every layer but the first: where one pass writes both (dMc passes up to 192 wide), that
        # kernel is heavier than dQ's alone (at 4 warps it spills kilobytes), and the config chosen
        # drives it
        work = {
            "fwd": (lambda: kb.butterfly(x, Q), 2 * T * n * es + q_bytes),
            "bwd": (lambda: torch.autograd.grad(kb.butterfly(xg, Qg), (xg, Qg), g), 3 * T * n * es + 2 * q_bytes),
        }
        entry = {}
        for kind, (fn, nbytes) in work.items():
            best = None
            configs = kb.candidates(n, b, N, kind, dt)
            if max_configs is not None:
                configs = configs[:max_configs]
            for cfg in configs:
                bar.set_postfix_str(f"n{n}-b{b}-N{N} {kind}")
                with kb.forced_config(kind, cfg, (n, b, N)), warnings.catch_warnings():
                    # the other direction's launch reads the cache this run is about to write: no word on it
                    warnings.simplefilter("ignore", TuneCacheWarning)
                    ms = _common.do_bench(fn, device)
                bar.update()
                if best is None or ms < best[1]:
                    best = (cfg, ms)
            cfg, ms = best
            entry[kind] = dict(cfg)
            entry[f"{kind}_ms"] = ms
            row = {
                "n": n, "b": b, "N": N, "dtype": _dtype_name(dt), "T": T, "kind": kind,
                "path": kb.path_name(n, b, N, T, dt, route=cfg.get("route")),
                "config": dict(cfg), "time_ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9,
                "candidates": len(configs),
            }
            rows.append(row)
            if verbose:
                print(format_table([row], header=not rows[:-1]), flush=True)
        new_entries[cache_key(dev_name, _common.TRITON_VERSION, dt, n, b, N)] = entry
    bar.close()
    if new_entries:
        _write(path, new_entries)
    return rows


def count_candidates(shapes, max_configs: int | None = None, dtype: torch.dtype | None = None) -> int:
    """Tiles ``tune`` would time for these shapes, forward and backward."""
    from boft_triton.kernels import butterfly as kb

    total = 0
    for shape in _tuned_shapes(shapes):
        dt = dtype or (shape[3] if len(shape) > 3 else torch.bfloat16)
        for kind in ("fwd", "bwd"):
            count = len(kb.candidates(*(int(v) for v in shape[:3]), kind, dt))
            total += count if max_configs is None else min(count, max_configs)
    return total


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
