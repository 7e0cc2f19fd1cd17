"""What ``boft-triton train`` does differently per engine (DDP, FSDP, DeepSpeed ZeRO), in one place.

DeepSpeed (through accelerate's DeepSpeed plugin, configs/accelerate_deepspeed_zero{2,3}.yaml):

- accelerate miscounts the processes on a machine without GPUs (see
  :func:`boft_triton.deepspeed_support.fix_accelerate_process_count`); corrected first thing,
  so the global batch, the data shards and "who writes" are DDP's;
- DeepSpeed clips gradients itself, from its config: it must clip at 1.0 as every run does
  (``auto`` or absent is set to 1.0; another value is an error that says what to change);
- DeepSpeed steps the optimizer inside ``accelerator.backward``, so the non-finite-loss guard
  runs on the loss before the backward (see ``train._train_steps``);
- ZeRO-3 partitions the weights: the in-run merge check is skipped (merging is refused, the
  saved adapter merges with ``boft-triton merge``), as are the replica digests.
"""

from __future__ import annotations

import os

from .errors import CLIError

CLIP_NORM = 1.0  # boft-triton train clips gradients at this norm under every engine


def start(accelerator) -> None:
    """Checks and corrections right after the ``Accelerator`` exists, before anything is prepared."""
    from accelerate.utils import DistributedType

    from ..deepspeed_support import fix_accelerate_process_count

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" \
            and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise CLIError("the accelerate config asks for DeepSpeed, but --cpu (or ACCELERATE_USE_CPU) turns it off "
                       "in accelerate; drop --cpu: without a GPU DeepSpeed runs on its CPU accelerator by itself")
    if not is_deepspeed(accelerator):
        return
    fix_accelerate_process_count()
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clip = config.get("gradient_clipping", "auto")
    if clip == "auto":
        config["gradient_clipping"] = CLIP_NORM
    elif float(clip) != CLIP_NORM:
        raise CLIError(f"the DeepSpeed config clips gradients at {clip}; boft-triton train clips at {CLIP_NORM} under "
                       f"every engine: set gradient_clipping: {CLIP_NORM} (or auto) in the accelerate config")


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    """The ZeRO stage under DeepSpeed, 0 otherwise."""
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def weights_partitioned(accelerator) -> bool:
    """Whether no process holds whole base weights (FSDP, ZeRO-3): no in-place merge, no replica digests."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or zero_stage(accelerator) == 3


def merge_skipped(accelerator) -> str:
    """Why the in-run merge check is skipped (weights partitioned), in the words metrics.json records."""
    what = "DeepSpeed ZeRO-3: weights are partitioned" if zero_stage(accelerator) == 3 else "FSDP: weights are sharded"
    return f"{what}; use boft-triton merge on the saved adapter"


def describe(accelerator) -> dict:
    """The engine, for metrics.json."""
    return {"zero_stage": zero_stage(accelerator)} if is_deepspeed(accelerator) else {}


# ----------------------------------------------------------------------------- DeepSpeed checkpoints

DEEPSPEED_DIR = "deepspeed"  # inside a --save-every checkpoint: DeepSpeed's own, one tag
DEEPSPEED_TAG = "state"


def owns_optimizer(model) -> bool:
    """Whether ``model`` (as ``accelerator.prepare`` returned it) is a DeepSpeed engine, which owns
    the optimizer state (partitioned over the processes) and, under ZeRO-3, the parameters."""
    from ..deepspeed_support import is_deepspeed_model

    return is_deepspeed_model(model)


def save_deepspeed_checkpoint(engine, folder) -> None:
    """DeepSpeed's own checkpoint of the trainable tensors and the optimizer partitions under
    ``folder/deepspeed``; every process calls it (each writes its partitions). Frozen base weights
    are left out: they are the model's, reloaded from its files."""
    engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                           exclude_frozen_parameters=True)


def load_deepspeed_checkpoint(engine, folder) -> None:
    """Load what :func:`save_deepspeed_checkpoint` wrote (every process); the scheduler is ours."""
    path, _ = engine.load_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise CLIError(f"DeepSpeed found no checkpoint under {folder / DEEPSPEED_DIR}")
