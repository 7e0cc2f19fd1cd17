"""DeepSpeed ZeRO: what the library does differently when parameters are DeepSpeed's.

ZeRO-2 partitions gradients and optimizer states only: every rank holds whole parameters, so the
adapters train, save and merge as under DDP. ZeRO-3 also partitions the parameters themselves
(``zero3_init_flag`` already while ``from_pretrained`` runs): outside the forward of the module
that owns it a parameter holds an empty tensor (``numel() == 0``), and its real shape is
``ds_shape``. So, under ZeRO-3:

- adapters are built from shapes the layer states (``in_features``/``out_features``) or from
  ``ds_shape``, never by gathering a base weight;
- the base layer runs through its own DeepSpeed hooks (the adapted layer calls ``base_layer(x M)``,
  which gathers its weight); the few base tensors read outside that call (a bias for the output
  scale, a Conv2d weight) are gathered one at a time by :func:`whole`;
- ``save_pretrained`` gathers the adapter tensors only (:func:`gathered`), never the base;
  loading writes through :func:`gathered` with ``modifier_rank=0`` so every rank gets its part;
- merging is refused (:data:`MERGE_REFUSAL`): a merged weight would have to be gathered, written
  and re-partitioned layer by layer, and a refusal up front can never leave a half-merged model.

Every function here is a no-op for ordinary tensors, so callers need not know the engine.
Functions that gather are collectives: every rank must call them, in the same order.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch

MERGE_REFUSAL = (
    "This model's weights are partitioned by DeepSpeed ZeRO-3; merging needs whole weights and is refused "
    "(nothing was merged). Save the adapter (save_pretrained gathers only the adapter), then merge on one "
    "process: `boft-triton merge ADAPTER_DIR --model BASE_MODEL --output-dir OUT`, or load it with "
    "BOFTModel.from_pretrained into an unpartitioned copy of the base model and call merge_and_unload() there."
)


def is_partitioned(t) -> bool:
    """Whether ``t`` is a ZeRO-3 parameter (whole or not at this moment)."""
    return hasattr(t, "ds_id")


def full_shape(t) -> tuple[int, ...]:
    """The shape of the whole tensor: ``ds_shape`` for a ZeRO-3 parameter (its own is empty)."""
    shape = getattr(t, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(t.shape)


def full_numel(t) -> int:
    n = 1
    for d in full_shape(t):
        n *= int(d)
    return n


def _available(t) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return t.ds_status == ZeroParamStatus.AVAILABLE


@contextmanager
def gathered(tensors, modifier_rank: int | None = None):
    """Inside the block the ZeRO-3 parameters among ``tensors`` are whole on every rank; with
    ``modifier_rank`` what that rank writes into them is kept (re-partitioned) on exit. A no-op
    when none is partitioned. Read what you need (a copy) inside the block: the storage goes back
    to the partition on exit."""
    params = [t for t in tensors if is_partitioned(t)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself, or, for a ZeRO-3 parameter that is partitioned right now, a whole copy
    (detached: used for frozen base tensors read outside their module's forward)."""
    if t is None or not is_partitioned(t) or _available(t):
        return t
    if t.requires_grad:  # a copy would silently take no gradient
        raise RuntimeError(
            "A trainable base tensor (bias='boft_only' or 'all') is partitioned by DeepSpeed ZeRO-3 and read outside "
            "its layer's forward, where its gradient cannot reach the partition. Keep it whole: raise "
            "zero_optimization.stage3_param_persistence_threshold above its size, or train with bias='none'.")
    with gathered([t]):
        return t.detach().clone()


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(module)``; a module with ZeRO-3 parameters is copied from its gathered
    parameters into ordinary ones (a deepcopy would copy the empty partitions and DeepSpeed's
    bookkeeping, a parameter that gathers nothing). The DeepSpeed engine partitions the copy's
    parameters when it wraps the model, as it does any parameter created outside ``zero.Init``."""
    import copy

    params = [p for p in module.parameters() if is_partitioned(p)]
    if not params:
        return copy.deepcopy(module)
    with gathered(params):
        memo = {id(p): torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in params}
        return copy.deepcopy(module, memo)


def gather_context(tensors, modifier_rank: int | None = None):
    """:func:`gathered` when any of ``tensors`` is a ZeRO-3 parameter, else a null context."""
    tensors = list(tensors)
    return gathered(tensors, modifier_rank) if any(is_partitioned(t) for t in tensors) else nullcontext()


# ----------------------------------------------------------------------------- accelerate


def fix_accelerate_process_count() -> bool:
    """Make accelerate's process count and rank the ones torch.distributed has, under DeepSpeed.

    On a machine without GPUs (DeepSpeed's CPU accelerator, gloo), accelerate 1.x initialises the
    group through DeepSpeed but, finding no GPU backend, records ``num_processes = 1`` and
    ``process_index = 0`` on every rank (``state.py``: "No backend == no distributed training").
    Every rank then believes it is the main process, the data is not sharded, and DeepSpeed
    rejects the batch (``train_batch_size ... 8 != 8 * 1 * 2``). Call this after the
    ``Accelerator`` (or ``PartialState``) exists and before ``prepare``; it corrects both shared
    states in place and returns whether it changed anything. Under any other engine it does nothing.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not (dist.is_available() and dist.is_initialized()) or not PartialState._shared_state:
        return False
    state = PartialState._shared_state
    if state.get("distributed_type") != DistributedType.DEEPSPEED:
        return False
    world, rank = dist.get_world_size(), dist.get_rank()
    if state.get("num_processes") == world and state.get("process_index") == rank:
        return False
    fixed = {"num_processes": world, "process_index": rank,
             "local_process_index": int(os.environ.get("LOCAL_RANK", rank))}
    state.update(fixed)
    if AcceleratorState._shared_state:  # a copy of PartialState's values, taken at its creation
        AcceleratorState._shared_state.update(fixed)
    return True


def is_deepspeed_model(model) -> bool:
    """Whether ``model`` is a DeepSpeed engine (what ``accelerator.prepare`` returns under DeepSpeed)."""
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def zero_stage(model) -> int:
    """The ZeRO stage of a DeepSpeed engine (0 for anything else)."""
    if not is_deepspeed_model(model):
        return 0
    return int(model.zero_optimization_stage())
