"""How each benchmarked method is put on a fresh copy of the base model.

Every method trains the task head (``heads``, when the model has one) so that the only difference
between two rows is the adapter. The floor trains nothing else but still computes input
gradients, as a frozen base under an adapter would (on a model without a head the floor has no
trainable parameter at all and its step is forward + backward only).

A method may not fit a workload (a BOFT block size that does not divide a layer's width, say);
``Method.skip_reason(model, targets)`` says why before anything is built, and the benchmark
prints the reason and records the method as skipped.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

# The comparison: LoRA at two ranks, PEFT's OFT at its usual block size, and BOFT (PEFT's
# and ours) at (block size, factors) pairs from plain OFT-like (4, 1) to a deep butterfly (4, 4).
DEFAULT_LORA_RANKS = (16, 32)
DEFAULT_OFT_BLOCK_SIZES = (32,)
DEFAULT_BOFT_SHAPES = ((4, 1), (8, 2), (4, 4))


@dataclass(frozen=True)
class Method:
    name: str  # unique, used as the row key (e.g. "peft-lora-r16")
    family: str  # floor | lora | oft | boft
    build: Callable[[nn.Module, list[str], list[str]], nn.Module]
    label: str = ""  # short name for tables and charts
    config: dict = field(default_factory=dict)  # the method's hyper-parameters, recorded in the JSON
    check: Optional[Callable[[int], Optional[str]]] = None  # input width -> why it does not fit
    quantized_base: bool = True  # can it adapt bitsandbytes layers (QLoRA / QBOFT)?
    # A context manager the whole measurement (build and steps) runs in, e.g. patch_peft().
    context: Optional[Callable[[], contextlib.AbstractContextManager]] = None

    def skip_reason(self, model: nn.Module, targets: list[str]) -> Optional[str]:
        """Why this method cannot be put on ``model`` at ``targets`` (None when it can)."""
        if self.family == "floor":
            return None
        widths = target_widths(model, targets)
        if not widths:
            return f"no module of the model matches the targets {targets}"
        if self.check is None:
            return None
        for name, n in widths.items():
            reason = self.check(n)
            if reason:
                return f"{name} (input width {n}): {reason}"
        return None


def target_widths(model: nn.Module, targets: list[str]) -> dict[str, int]:
    """Input width of every linear or conv layer matched by ``targets`` (PEFT's rule: the full name
    equals a target or ends with ``"." + target``)."""
    out = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):  # bitsandbytes layers too (subclasses)
            out[name] = module.in_features
        elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer, weight (n, o)
            out[name] = module.weight.shape[0]
        elif isinstance(module, nn.Conv2d):  # BOFT rotates a conv's (channel, kh, kw) input patch
            out[name] = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return out


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
    return Method(f"peft-lora-r{r}", "lora", _quiet_peft(build), f"LoRA r{r}", {"r": r, "lora_alpha": 2 * r})


def _oft_check(block_size: int):
    def check(n: int) -> Optional[str]:
        if n % block_size:
            return f"OFT block size {block_size} does not divide {n}"
        return None
    return check


def peft_oft(block_size: int) -> Method:
    """PEFT's OFT with its defaults (Cayley-Neumann series, 5 terms, as of PEFT 0.17+)."""
    def build(model, targets, heads):
        import peft

        config = peft.OFTConfig(r=0, oft_block_size=block_size, target_modules=targets, modules_to_save=heads or None)
        return peft.get_peft_model(model, config)
    return Method(f"peft-oft-b{block_size}", "oft", _quiet_peft(build), f"PEFT OFT b{block_size}",
                  {"oft_block_size": block_size}, _oft_check(block_size), quantized_base=False)


def _boft_check(block_size: int, n_factors: int):
    def check(n: int) -> Optional[str]:
        from boft_triton.geometry import resolve_geometry

        try:
            resolve_geometry(n, block_size, 0, n_factors)
        except ValueError as err:
            return str(err).split(": ", 1)[-1].split("; ")[0]
        return None
    return check


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
    return Method(f"peft-boft-b{block_size}-N{n_factors}", "boft", _quiet_peft(build),
                  f"PEFT BOFT b{block_size} N{n_factors}",
                  {"boft_block_size": block_size, "boft_n_butterfly_factor": n_factors, "impl": "peft"},
                  _boft_check(block_size, n_factors), quantized_base=False)


def peft_boft_patched(block_size: int, n_factors: int) -> Method:
    """PEFT's BOFT, built and trained by PEFT, with ``boft_triton.patch_peft()`` in effect: the row
    to set against ``peft-boft-b<b>-N<N>`` (same model, same parameters, boft_triton's compute)."""
    def context():
        from boft_triton.integrations.peft_patch import patched_peft

        return patched_peft()

    method = peft_boft(block_size, n_factors)
    return Method(f"peft-boft-patched-b{block_size}-N{n_factors}", "boft", method.build,
                  f"PEFT BOFT patched b{block_size} N{n_factors}",
                  {**method.config, "impl": "peft+patch_peft"}, method.check, quantized_base=False,
                  context=context)


def ours(block_size: int, n_factors: int) -> Method:
    def build(model, targets, heads):
        from boft_triton import BOFTConfig, adapt

        config = BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=n_factors,
                            target_modules=targets, modules_to_save=heads or None)
        return adapt(model, config)
    return Method(f"boft_triton-b{block_size}-N{n_factors}", "boft", build,
                  f"ours b{block_size} N{n_factors}",
                  {"boft_block_size": block_size, "boft_n_butterfly_factor": n_factors, "impl": "boft_triton"},
                  _boft_check(block_size, n_factors))


FLOOR = Method("floor", "floor", _floor, "floor (frozen base)")


def default_methods(boft_shapes=DEFAULT_BOFT_SHAPES, lora_ranks=DEFAULT_LORA_RANKS,
                    oft_block_sizes=DEFAULT_OFT_BLOCK_SIZES, peft_boft_too: bool = True) -> list[Method]:
    """floor, LoRA per rank, OFT per block size, then per (b, N) pair PEFT BOFT, PEFT BOFT under
    ``patch_peft()`` and ours."""
    methods = [FLOOR] + [peft_lora(r) for r in lora_ranks] + [peft_oft(b) for b in oft_block_sizes]
    for b, n in boft_shapes:
        methods += ([peft_boft(b, n), peft_boft_patched(b, n)] if peft_boft_too else []) + [ours(b, n)]
    return methods
