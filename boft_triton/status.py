"""``get_layer_status`` / ``get_model_status``: PEFT's adapter-state reports, same fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .layer import BOFTLayer
from .quantized import is_quantized
from .modules_to_save import ModulesToSaveWrapper

IRREGULAR = "irregular"


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"] = None


def _flag(values: list[bool]) -> bool | str:
    return True if all(values) else False if not any(values) else IRREGULAR


def _adapter_params(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    if isinstance(module, BOFTLayer):
        return {a: [module.boft_R[a], module.boft_s[a]] for a in module.boft_R}
    return {a: list(copy.parameters()) for a, copy in module.modules_to_save.items()}


def layer_status(root: nn.Module) -> list[TunerLayerStatus]:
    """PEFT's ``get_layer_status``: the BOFT layers and the ``modules_to_save`` wrappers, in order."""
    out = []
    for name, module in root.named_modules():
        if isinstance(module, BOFTLayer):
            module_type, active, merged = f"boft.{type(module).__name__}", module.active_adapters, module.merged_adapters
        elif isinstance(module, ModulesToSaveWrapper):
            module_type, merged = "ModulesToSaveWrapper", []
            active = [module.active_adapter] if module.active_adapter else []
        else:
            continue
        params = _adapter_params(module)
        out.append(TunerLayerStatus(
            name=name,
            module_type=module_type,
            enabled=not module.disable_adapters,
            active_adapters=list(active),
            merged_adapters=list(merged),
            requires_grad={a: _flag([p.requires_grad for p in ps]) for a, ps in params.items()},
            available_adapters=sorted(params),
            devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
            quantization_backend=("bitsandbytes" if isinstance(module, BOFTLayer) and is_quantized(module.base_layer)
                                  else None),
        ))
    if not out:
        raise ValueError("No adapter layers found in the model: it holds no BOFT layer (every adapter was unloaded?).")
    return out


def _same_or_irregular(values: list):
    first = values[0]  # layer_status never returns an empty list
    return first if all(v == first for v in values) else IRREGULAR


def model_status(boft_model, layers: list[TunerLayerStatus]) -> TunerModelStatus:
    trainable, total = boft_model.get_nb_trainable_parameters()
    requires_grad: dict[str, bool | str] = {}
    devices: dict[str, set[str]] = {}
    for status in layers:
        for adapter, flag in status.requires_grad.items():
            requires_grad[adapter] = flag if requires_grad.get(adapter, flag) == flag else IRREGULAR
        for adapter, where in status.devices.items():
            devices.setdefault(adapter, set()).update(where)
    return TunerModelStatus(
        base_model_type=type(boft_model.model).__name__,
        adapter_model_type=type(boft_model).__name__,
        peft_types={name: config.peft_type for name, config in boft_model.peft_config.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_same_or_irregular([s.enabled for s in layers]),
        active_adapters=_same_or_irregular([s.active_adapters for s in layers]),
        merged_adapters=_same_or_irregular([s.merged_adapters for s in layers]),
        requires_grad=requires_grad,
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(d) for a, d in devices.items()},
        quantization_backend=_same_or_irregular([s.quantization_backend for s in layers]),
    )
