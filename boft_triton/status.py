"""``get_layer_status`` / ``get_model_status``: PEFT's adapter-state reports, same fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .layer import BOFTLayer

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


def _requires_grad(layer: BOFTLayer, adapter: str) -> bool | str:
    flags = {layer.boft_R[adapter].requires_grad, layer.boft_s[adapter].requires_grad}
    return flags.pop() if len(flags) == 1 else IRREGULAR


def layer_status(root: nn.Module) -> list[TunerLayerStatus]:
    out = []
    for name, layer in root.named_modules():
        if not isinstance(layer, BOFTLayer):
            continue
        adapters = sorted(layer.boft_R)
        out.append(TunerLayerStatus(
            name=name,
            module_type=f"boft.{type(layer).__name__}",
            enabled=not layer.disable_adapters,
            active_adapters=list(layer.active_adapters),
            merged_adapters=list(layer.merged_adapters),
            requires_grad={a: _requires_grad(layer, a) for a in adapters},
            available_adapters=adapters,
            devices={a: sorted({str(layer.boft_R[a].device), str(layer.boft_s[a].device)}) for a in adapters},
        ))
    return out


def _same_or_irregular(values: list):
    first = values[0] if values else []
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
    enabled = _same_or_irregular([s.enabled for s in layers]) if layers else not boft_model._adapters_disabled
    return TunerModelStatus(
        base_model_type=type(boft_model.model).__name__,
        adapter_model_type=type(boft_model).__name__,
        peft_types={name: config.peft_type for name, config in boft_model.peft_config.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=_same_or_irregular([sorted(s.active_adapters) for s in layers]),
        merged_adapters=_same_or_irregular([sorted(s.merged_adapters) for s in layers]),
        requires_grad=requires_grad,
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(d) for a, d in devices.items()},
    )
