"""The model and optimizer part of a sharded (FSDP2) ``boft-triton train`` checkpoint.

:mod:`~boft_triton.cli.train_state` owns the checkpoint folder (built under a temporary name,
manifest written last, renamed into place, ``latest``, pruning); this module fills in what a
full-state run keeps in ``trainable.safetensors`` and ``optimizer.pt`` when the run is sharded.
Those two files are written by the main process from full tensors; under FSDP2 that would gather
every adapter tensor and every AdamW moment onto one process at every checkpoint. Instead the
trainable parameters and the optimizer state go through ``torch.distributed.checkpoint`` (DCP):
every process writes its own shards (``__<rank>_0.distcp``) and rank 0 writes the index
(``.metadata``), and loading reads each process's shards back in place. Frozen base weights are
never saved: the base model is reloaded from ``--model`` on resume.

Every process must call :func:`save` and :func:`load` (they are collectives over the default
process group). The files sit in the checkpoint's temporary folder like the others, so the
manifest covers them and a half-written DCP save is never taken for a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# what ``state.json`` records as the checkpoint's layout; full-state checkpoints have none
LAYOUT = "dcp"
MODEL_KEY = "trainable"
OPTIMIZER_KEY = "optimizer"


def is_sharded(accelerator) -> bool:
    """Whether accelerate runs this job under FSDP (its parameters are DTensor shards)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _trainable(model) -> dict[str, Any]:
    # ``detach`` shares storage: DCP loads into these views, i.e. into the parameters' own shards
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one


def _reshard(model) -> None:
    """Put every FSDP unit's parameters back in their sharded form. FSDP2 leaves a unit whose
    ``reshard_after_forward`` is off (the root, by default) unsharded after a forward without a
    backward (an evaluation): its modules then hold plain full tensors, not the DTensors the
    optimizer steps, and a state dict taken then would name neither."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _state(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _reshard(model)
    # keyed by parameter name (not by position), values are DTensors sharded like the parameters
    return {MODEL_KEY: _trainable(model), OPTIMIZER_KEY: get_optimizer_state_dict(model, _torch_optimizer(optimizer))}


def save(model, optimizer, folder: Path) -> None:
    """Write this process's shards of the trainable parameters and the optimizer state."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=str(folder))


def load(model, optimizer, folder: Path) -> None:
    """Read this process's shards back into the model's trainable parameters and the optimizer."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # the optimizer has no state before its first step: DCP's state-dict helper creates it (a
    # zero-learning-rate step), so there are tensors of the right shards to load into
    state = _state(model, optimizer)
    with torch.no_grad():
        dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), state[OPTIMIZER_KEY])
