"""Values derived from tensors, built once while those tensors stay as they are (inference only).

Decoding calls every adapted layer once per token with the same parameters, so what is derived
from them (each adapter's Cayley Q, the torch path's coarse blocks, the stacked Q of a mixed
batch) would otherwise be rebuilt every token. An entry is keyed by its tensors themselves (weak
references: a new tensor at a freed address never hits, and the entry goes with its tensors) and
is valid while each keeps its version counter (in-place changes: optimizer steps, load_state_dict,
hot swap), storage and dtype (``module.to()`` may swap ``.data`` under the same Parameter). With
gradients enabled, while compiling, or for tensor subclasses (FSDP2's DTensors) nothing is kept;
nor for a tensor that is a window into a larger storage: DeepSpeed ZeRO-1/2 makes each trainable
parameter a view of one flat buffer and writes every step's result through that buffer, which
changes neither the parameter's version counter nor its data pointer (a memoised Q went stale
there: evaluation after training used the adapter of the first evaluation).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

_ENTRIES: dict[tuple, tuple[tuple[weakref.ref, ...], tuple, object]] = {}


def _state(t: torch.Tensor) -> tuple:
    return t._version, t.data_ptr(), t.dtype, t.device


def _trackable(t: torch.Tensor) -> bool:
    """Whether the version counter and data pointer see every change of ``t`` (see above)."""
    if type(t.data) is not torch.Tensor:
        return False
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def memoised(kind: str, tensors: tuple[torch.Tensor, ...], build: Callable[[], object]):
    """``build()``, reused while ``tensors`` are alive and unchanged (outside autograd and tracing);
    ``kind`` names what is built, so different things derived from the same tensors never mix."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not all(_trackable(t) for t in tensors):
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
