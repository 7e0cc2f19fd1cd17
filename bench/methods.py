"""How each benchmarked method is put on a fresh copy of the base model.

Every method trains the task head (``head``, when the model has one) so that the only difference
between two rows is the adapter. The floor trains nothing else but still computes input
gradients, as a frozen base under an adapter would.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # floor | lora | oft | boft
    build: Callable[[nn.Module, list[str], list[str]], nn.Module]


def _floor(model, targets, heads):
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in heads:
            module.requires_grad_(True)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def _quiet_peft(fn):
    def build(model, targets, heads):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(model, targets, heads)
    return build


def peft_lora(r: int) -> Method:
    def build(model, targets, heads):
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=heads or None)
        return peft.get_peft_model(model, config)
    return Method(f"peft-lora-r{r}", "lora", _quiet_peft(build))


def peft_oft(block_size: int) -> Method:
    def build(model, targets, heads):
        import peft

        config = peft.OFTConfig(r=0, oft_block_size=block_size, target_modules=targets, modules_to_save=heads or None)
        return peft.get_peft_model(model, config)
    return Method(f"peft-oft-b{block_size}", "oft", _quiet_peft(build))


@contextlib.contextmanager
def peft_butterfly_without_cuda_extension():
    """PEFT computes N > 1 only through its CUDA extension and silently uses N=1 without it.
    Standing its block-diagonal helper in with ``torch.block_diag`` keeps PEFT's own N > 1 maths
    (dense n x n factors, as with the extension), so the comparison is like for like."""
    import peft.tuners.boft.layer as layer

    class BlockDiag:
        @staticmethod
        def apply(blocks):
            return torch.stack([torch.block_diag(*f.unbind(0)) for f in blocks])

    saved = layer.get_fbd_cuda, layer.FastBlockDiag
    layer.get_fbd_cuda, layer.FastBlockDiag = (lambda: True), BlockDiag
    try:
        yield
    finally:
        layer.get_fbd_cuda, layer.FastBlockDiag = saved


def peft_boft(block_size: int, n_factors: int) -> Method:
    def build(model, targets, heads):
        import peft

        config = peft.BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=n_factors,
                                 target_modules=targets, modules_to_save=heads or None)
        return peft.get_peft_model(model, config)
    return Method(f"peft-boft-b{block_size}-N{n_factors}", "boft", _quiet_peft(build))


def ours(block_size: int, n_factors: int) -> Method:
    def build(model, targets, heads):
        from boft_triton import BOFTConfig, adapt

        config = BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=n_factors,
                            target_modules=targets, modules_to_save=heads or None)
        return adapt(model, config)
    return Method(f"boft_triton-b{block_size}-N{n_factors}", "boft", build)


FLOOR = Method("floor", "floor", _floor)


def default_methods(boft_shapes=((4, 1), (4, 2)), lora_ranks=(8,), oft_block_sizes=()) -> list[Method]:
    methods = [FLOOR] + [peft_lora(r) for r in lora_ranks] + [peft_oft(b) for b in oft_block_sizes]
    for b, n in boft_shapes:
        methods += [peft_boft(b, n), ours(b, n)]
    return methods
