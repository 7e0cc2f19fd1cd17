"""``BOFTTrainer`` under FSDP2 on CPU processes (gloo): PEFT-format checkpoints, and a resume.

    torchrun --standalone --nproc_per_node 2 trainer_fsdp2.py OUT

The Trainer is configured for FSDP2 the way a GPU user does it (``fsdp="full_shard"`` and
``fsdp_config={"fsdp_version": 2, ...}`` in ``TrainingArguments``); on CPU accelerate would
turn that into plain DDP, so :mod:`fsdp2_on_cpu` makes accelerate's one GPU-only decision (see
there). Then: a 4-step run checkpointing every 2 steps (OUT/full), and a fresh model and Trainer
resuming from OUT/full/checkpoint-2 (OUT/resumed). The main process writes OUT/result.json with
what the test checks: the wrapped model's type, whether the parameters were DTensors, and both
runs' final adapters (gathered), and their losses. :func:`args` is what the test's one-process run
uses too (the same global batch, no FSDP).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fsdp2_on_cpu import fsdp_on_cpu  # noqa: E402
from test_trainer import CONFIG, _base, _data  # noqa: E402

from boft_triton import BOFTConfig, adapt  # noqa: E402
from boft_triton.cli.process_group import end_process_group, exit_without_finalizing  # noqa: E402
from boft_triton.integrations.transformers import BOFTTrainer  # noqa: E402

STEPS, GLOBAL_BATCH = 4, 8


def args(out, world, **kw):
    import transformers

    fsdp = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"],
                                                  "reshard_after_forward": True}} if world > 1 else {}
    kw = {"max_steps": STEPS, "per_device_train_batch_size": GLOBAL_BATCH // world, "learning_rate": 1e-2,
          "report_to": [], "use_cpu": True, "save_strategy": "no", "logging_steps": 1, "seed": 0, "data_seed": 0,
          "dataloader_drop_last": True,
          # transformers multiplies the loss by the process count when the model's forward takes
          # **kwargs, expecting it to divide by the global item count; BERT's classification loss is
          # a plain mean (with or without BOFT), so that would double its gradients on 2 processes
          "average_tokens_across_devices": False, **fsdp, **kw}
    return transformers.TrainingArguments(output_dir=str(out), **kw)


def _adapter(trainer) -> dict[str, list]:
    """Every trainable tensor, whole (gathered from the shards: every process must call)."""
    out = {}
    for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).tolist()
    return out


def main():
    out = sys.argv[1]
    fsdp_on_cpu()
    full = BOFTTrainer(model=adapt(_base(), BOFTConfig(**CONFIG)),
                       args=args(f"{out}/full", 2, save_strategy="steps", save_steps=2), train_dataset=_data())
    full.train()
    sharded = [type(p).__name__ for n, p in full.model.named_parameters() if "boft_R" in n]
    result = {"model_class": [c.__name__ for c in type(full.model).__mro__],
              "distributed_type": str(full.accelerator.distributed_type),
              "boft_R_types": sorted(set(sharded)), "full": _adapter(full)}
    resumed = BOFTTrainer(model=adapt(_base(), BOFTConfig(**CONFIG)), args=args(f"{out}/resumed", 2),
                          train_dataset=_data())
    resumed.train(resume_from_checkpoint=f"{out}/full/checkpoint-2")
    result.update(resumed=_adapter(resumed), resumed_step=resumed.state.global_step,
                  losses={"full": [h["loss"] for h in full.state.log_history if "loss" in h],
                          "resumed": [h["loss"] for h in resumed.state.log_history if "loss" in h]})
    rank = dist.get_rank()
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as fh:
            json.dump(result, fh)
    del full, resumed
    if end_process_group():  # FSDP2's gloo threads on torch 2.13: see boft_triton.cli.process_group
        exit_without_finalizing(0)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
