"""transformers' ``Trainer`` with boft_triton models: adapter checkpoints in PEFT's format.

Training needs nothing: ``Trainer(model=adapt(model, config), args=...)`` trains, because a
``BOFTModel``'s ``forward`` shows the wrapped model's signature (so ``remove_unused_columns``
keeps the batch columns). Saving is where the plain ``Trainer`` falls short: it writes adapter
checkpoints only for ``PreTrainedModel`` and ``peft.PeftModel`` instances (``isinstance`` checks)
and otherwise a full ``model.safetensors``, which it cannot resume from either. So:

    from boft_triton.integrations.transformers import BOFTTrainer
    trainer = BOFTTrainer(model=adapt(model, config), args=TrainingArguments(...), ...)

or, for another Trainer subclass (TRL's ``SFTTrainer``, say), put the mixin in front of it:
``class MySFTTrainer(BOFTTrainerMixin, SFTTrainer): pass`` (``boft_triton.integrations.trl``
has that one). The mixin overrides the Trainer's save and load steps, nothing else:

- ``save_model`` (used by ``trainer.save_model()`` and by every checkpoint) writes the adapters
  with ``BOFTModel.save_pretrained``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
  (``modules_to_save`` included), other adapters in sub-folders, never the frozen base;
- resuming (``train(resume_from_checkpoint=...)``) and ``load_best_model_at_end`` copy the saved
  adapter tensors back into the model's own Parameters (so optimizer state lines up; under FSDP2
  each process keeps its shards of them);
- under FSDP a checkpoint holds the adapter files, the optimizer as accelerate saves it and the
  scheduler, not the Trainer's ``pytorch_model_fsdp.bin`` (the whole model gathered, never read);
- ``label_names`` default to the wrapped model's, as the Trainer finds them for a PEFT model.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.utils import find_labels

from .. import checkpoint
from ..model import BOFTModel

TRAINING_ARGS_NAME = "training_args.bin"  # the name Trainer.save_model gives the saved TrainingArguments


def _adapter_folder(folder: str, adapter_name: str) -> str:
    return folder if adapter_name == "default" else os.path.join(folder, adapter_name)


def has_adapter_checkpoint(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (checkpoint.SAFETENSORS_NAME, checkpoint.BIN_NAME))


def load_adapter_checkpoint(model: BOFTModel, folder: str) -> list[str]:
    """Copy the adapters saved in ``folder`` into ``model``'s adapters of the same names, in place.
    Returns the names loaded; a checkpoint without any of them is an error."""
    loaded = []
    for name, config in model.peft_config.items():
        source = _adapter_folder(folder, name)
        if not has_adapter_checkpoint(source):
            continue
        checkpoint.load_adapter_state_dict(model.model, checkpoint.read_adapter_weights(source), name, config.bias)
        loaded.append(name)
    if not loaded:
        raise ValueError(
            f"{folder!r} holds no adapter checkpoint of this model's adapters {list(model.peft_config)}: pass a "
            "checkpoint folder written by BOFTTrainer (adapter_model.safetensors at its top)."
        )
    return loaded


class BOFTTrainerMixin:
    """Put in front of ``transformers.Trainer`` or a subclass of it (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        _fix_deepspeed_process_count(kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        boft_model = self._boft_model()
        if boft_model is not None:
            # The Trainer reads label names off the model's class; ours forwards to the wrapped one.
            if self.args.label_names is None:
                self.label_names = find_labels(type(boft_model.get_base_model()))
            from transformers.utils import can_return_loss

            self.can_return_loss = can_return_loss(type(boft_model.get_base_model()))

    def _boft_model(self) -> BOFTModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, BOFTModel) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        boft_model = self._boft_model()
        if boft_model is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # Every process calls this: FSDP2-sharded adapters are gathered, the main process writes.
        boft_model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        boft_model = self._boft_model()
        if boft_model is None or not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The Trainer's FSDP branch would also write pytorch_model_fsdp.bin: the whole model, frozen
        # base included, gathered onto one process at every checkpoint, and never read back (resuming
        # loads the adapter files save_model wrote). So: the optimizer as accelerate saves it under
        # FSDP (only adapter and modules_to_save parameters have optimizer state), then the scheduler
        # as the Trainer does.
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        boft_model = self._boft_model()
        if boft_model is None or not has_adapter_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter_checkpoint(boft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        boft_model = self._boft_model()
        best = self.state.best_model_checkpoint
        if boft_model is None or best is None or not has_adapter_checkpoint(best):
            return super()._load_best_model()
        load_adapter_checkpoint(boft_model, best)


def _fix_deepspeed_process_count(args) -> None:
    """Under DeepSpeed on a machine without GPUs accelerate counts one process on every rank
    (``deepspeed_support.fix_accelerate_process_count``); the Trainer sizes DeepSpeed's batch and
    shards the data from that count, so it is corrected before the Trainer reads it."""
    if args is None or not getattr(args, "deepspeed_plugin", None) and \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    from ..deepspeed_support import fix_accelerate_process_count

    _ = args.device  # TrainingArguments sets up accelerate's PartialState on first use
    fix_accelerate_process_count()


class BOFTTrainer(BOFTTrainerMixin, Trainer):
    """``transformers.Trainer`` that saves and resumes boft_triton adapters in PEFT's format."""
