"""Values derived from tensors, built once while those tensors stay as they are (inference only).

Decoding calls every adapted layer once per token with the same parameters, so what is derived
from them (each adapter's Cayley Q, the torch path's coarse blocks, the stacked Q of a mixed
batch) would otherwise be rebuilt every token. An entry is keyed by its tensors themselves (weak
references: a new tensor at a freed address never hits, and the entry goes with its tensors) and
is valid while each keeps its version counter (in-place changes: optimizer steps, load_state_dict,
hot swap), storage and dtype (``module.to()`` may swap ``.data`` under the same Parameter). With
gradients enabled, while compiling, or for tensor subclasses (FSDP2's DTensors) nothing is kept.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

_ENTRIES: dict[tuple, tuple[tuple[weakref.ref, ...], tuple, object]] = {}


def _state(t: torch.Tensor) -> tuple:
    return t._version, t.data_ptr(), t.dtype, t.device


def memoised(kind: str, tensors: tuple[torch.Tensor, ...], build: Callable[[], object]):
    """``build()``, reused while ``tensors`` are alive and unchanged (outside autograd and tracing);
    ``kind`` names what is built, so different things derived from the same tensors never mix."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or any(type(t.data) is not torch.Tensor for t in tensors):
        return build()
    key = (kind, *(id(t) for t in tensors))
    state = tuple(_state(t) for t in tensors)
    hit = _ENTRIES.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)) and hit[1] == state:
        return hit[2]
    value = build()
    refs = tuple(weakref.ref(t, lambda _, key=key: _ENTRIES.pop(key, None)) for t in tensors)
    _ENTRIES[key] = (refs, state, value)
    return value
