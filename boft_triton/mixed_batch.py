"""Mixed-adapter batches: each sample of one forward (or ``generate``) call uses its own adapter.

PEFT's API for LoRA: ``model(**inputs, adapter_names=["a", "b", "__base__", ...])``, one name per
sample, ``"__base__"`` for the base model alone. Each sample gets exactly what a batch of that
sample alone gives under ``set_adapter(name)``, output scale included. Linear and Conv1D layers
stay input-centric: each adapter group's rows are rotated with that adapter's butterfly, then one
base-layer call serves every row (one base GEMM for the whole mixed batch). Conv2d rotates
weights, so it runs the base conv once per adapter group, as PEFT does for LoRA. A
``modules_to_save`` head answers each sample with its adapter's copy.

Refused, as in PEFT: training mode, a merged model, unknown names, and a name count that does not
divide the batch (``generate`` with beams or several sequences per prompt repeats each sample's
rows, ``repeat_interleave``-style: each name then covers its sample's copies).
"""

from __future__ import annotations

import contextlib
import functools

import torch

BASE_ADAPTER = "__base__"


def check_names(adapter_names, known: list[str], training: bool, merged: bool) -> list[str]:
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode: call model.eval() first "
                         "(mixed-adapter batches are for inference).")
    if merged:
        raise ValueError("Cannot pass `adapter_names` to a merged model: its weights hold the merged adapters; call "
                         "unmerge_adapter() first.")
    if isinstance(adapter_names, str) or not all(isinstance(a, str) for a in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per sample, got {adapter_names!r}")
    unknown = sorted({a for a in adapter_names if a != BASE_ADAPTER and a not in known})
    if unknown:
        raise ValueError(f"Unknown adapter name(s) {unknown} in adapter_names; this model has {known} "
                         f"(and {BASE_ADAPTER!r} for the base model alone).")
    return list(adapter_names)


@contextlib.contextmanager
def mixed_batch(modules, adapter_names: list[str]):
    """Every BOFT layer and ``modules_to_save`` wrapper in ``modules`` answers per sample inside."""
    modules = list(modules)
    for module in modules:
        module.mixed_adapter_names = adapter_names
    try:
        yield
    finally:
        for module in modules:
            module.mixed_adapter_names = None


def groups(adapter_names: list[str], batch: int, device) -> tuple[tuple[str, torch.Tensor], ...]:
    """``(name, row indices)`` per distinct name, in first-seen order, for a batch of ``batch``
    rows; names are repeated per sample when the batch holds several copies of each sample."""
    if not adapter_names or batch % len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {batch}: give one name per "
                         "sample.")
    if torch.compiler.is_compiling():
        return _groups.__wrapped__(tuple(adapter_names), batch, torch.device(device))
    return _groups(tuple(adapter_names), batch, torch.device(device))


@functools.lru_cache(maxsize=64)
def _groups(adapter_names: tuple[str, ...], batch: int, device: torch.device):
    """Memoised: every adapted layer of every decoding step asks for the same grouping, and on a
    GPU each index tensor is a host-to-device copy."""
    copies = batch // len(adapter_names)
    out: dict[str, list[int]] = {}
    for row in range(batch):
        out.setdefault(adapter_names[row // copies], []).append(row)
    return tuple((name, torch.tensor(rows, device=device)) for name, rows in out.items())


def per_group(x: torch.Tensor, adapter_names: list[str], fn) -> torch.Tensor:
    """``fn(name, x[rows])`` for each adapter group, written back in the batch's row order."""
    out = None
    for name, rows in groups(adapter_names, x.shape[0], x.device):
        y = fn(name, x.index_select(0, rows))
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, rows, y)
    return out


def rotate_per_sample(x: torch.Tensor, adapter_names: list[str], rotation_of) -> torch.Tensor:
    """x ``[B, ..., n]`` with sample i rotated by ``rotation_of(name_i)`` (Q ``[N, D, b, b]``, or
    None to leave it as it is). The samples are grouped by adapter (each sample's rows stay
    contiguous), and each group of adapters with one Q shape is one segmented butterfly: one
    launch per factor group for the whole mixed batch, not one per adapter."""
    from . import ops

    B, n = x.shape[0], x.shape[-1]
    by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    unrotated = []
    for name, rows in groups(adapter_names, B, x.device):
        Q = rotation_of(name)
        if Q is None:
            unrotated.append(rows)
        else:
            by_shape.setdefault(tuple(Q.shape), []).append((rows, Q))
    if not by_shape:
        return x
    y = torch.empty_like(x)
    if unrotated:
        rows = torch.cat(unrotated)
        y.index_copy_(0, rows, x.index_select(0, rows))
    for members in by_shape.values():
        samples = torch.cat([rows for rows, _ in members])
        xs = x.index_select(0, samples).reshape(-1, n)
        per_sample = xs.shape[0] // max(1, samples.numel())
        offsets = [0]
        for rows, _ in members:
            offsets.append(offsets[-1] + rows.numel() * per_sample)
        ys = ops.segmented_butterfly(xs, [Q for _, Q in members], offsets)
        y.index_copy_(0, samples, ys.reshape(samples.numel(), *x.shape[1:]))
    return y


def row_scales(out: torch.Tensor, adapter_names: list[str], scales, dtype: torch.dtype) -> torch.Tensor:
    """The output scale of each row of ``out`` ``[B, ..., o]``: ``scales[name]`` (``(o,)`` or
    ``(o, 1)``) for the rows of an adapter that has one here, 1 for the others; shaped to
    broadcast over ``out``."""
    B, o = out.shape[0], out.shape[-1]
    s = torch.ones(B, o, dtype=dtype, device=out.device)
    for name, rows in groups(adapter_names, B, out.device):
        if name in scales:
            s[rows] = scales[name].reshape(-1).to(dtype)
    return s.reshape(B, *([1] * (out.dim() - 2)), o)
