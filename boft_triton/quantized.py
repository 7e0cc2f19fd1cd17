"""bitsandbytes bases (``Linear4bit``: NF4/FP4, with or without double quantisation; ``Linear8bitLt``).

BOFT trains input-centric (it rotates the activations and calls the base layer), so a quantized
base needs nothing special to train: only the places that read the weight itself ask here what
the layer really is. bitsandbytes is never imported by this module: a layer can only be a
bitsandbytes layer if bitsandbytes was imported by whoever built it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _bnb():
    return sys.modules.get("bitsandbytes")


def is_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def is_quantized(module: nn.Module) -> bool:
    return is_4bit(module) or is_8bit(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in (the adapter's dtype when it follows the base)."""
    if is_4bit(module) and module.compute_dtype is not None:
        return module.compute_dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else torch.float32


def merge_refusal(layer_name: str, module: nn.Module) -> str:
    kind = "4-bit" if is_4bit(module) else "8-bit"
    return (
        f"{layer_name}: the base layer is a bitsandbytes {kind} layer; boft_triton does not merge into quantized "
        "weights (re-quantizing a rotated weight adds a fresh quantization error, so the merged model would not "
        "compute what the adapter was trained to). Nothing was merged. To merge: save the adapter "
        "(save_pretrained), load the base model in bf16 or fp32 without a quantization_config, load the adapter "
        "with BOFTModel.from_pretrained, and call merge_and_unload() there; quantize the merged model afterwards "
        "if you need to."
    )
