"""TRL's ``SFTTrainer`` with boft_triton models: ``BOFTSFTTrainer`` saves and resumes the
adapters in PEFT's format (see ``integrations.transformers`` for what the mixin changes).
Pass the adapted model itself, without ``peft_config``: TRL would wrap it with PEFT otherwise.

One more difference from a plain ``SFTTrainer``: TRL patches the model's ``forward`` with a fused
LM head that runs ``model.base_model`` as the transformers backbone. For a ``peft.PeftModel`` it
patches ``get_base_model()`` instead, because there ``base_model`` is the tuner model; a
``BOFTModel`` follows PEFT's convention, so this trainer moves the patch to ``get_base_model()``
too, as TRL does for PEFT.
"""

from __future__ import annotations

from trl import SFTTrainer

try:
    from trl.trainer.utils import add_fused_lm_head
except ImportError:  # a TRL without the fused head leaves forward alone: nothing to move
    add_fused_lm_head = None

from .transformers import BOFTTrainerMixin

# What SFTTrainer asks of the fused head (trl 1.x, sft_trainer.py: log-probs for the loss,
# entropy and top-1 hits for its metrics).
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class BOFTSFTTrainer(BOFTTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for a model that ``boft_triton.adapt`` returned."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        boft_model = self._boft_model()
        if add_fused_lm_head is not None and boft_model is not None and not boft_model.forwards_unchanged():
            boft_model._expose_forward_signature()  # undo the patch of the wrapper ...
            add_fused_lm_head(boft_model.get_base_model(), outputs=FUSED_OUTPUTS)  # ... and put it on the model
