"""Bases offloaded by accelerate (``dispatch_model`` / ``cpu_offload`` / ``disk_offload`` / a
``device_map`` with offload): their tensors sit on the ``meta`` device except while their hook
runs the layer's forward. The adapted layer calls the base layer (so the hook loads it); the few
places that read a base tensor outside that call ask here for the real one.
"""

from __future__ import annotations

import torch
from torch import nn


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # accelerate's SequentialHook holds several


def is_offloaded(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in module.parameters(recurse=False))


def execution_device(module: nn.Module) -> torch.device | None:
    """Where the hook runs the layer (None: no accelerate hook names one)."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None


def module_device(module: nn.Module) -> torch.device:
    """The device the layer's tensors live on while it computes."""
    weight = module.weight
    if weight.device.type != "meta":
        return weight.device
    device = execution_device(module)
    if device is None:
        raise RuntimeError(
            f"{type(module).__name__} has its weights on the meta device and no accelerate hook that loads them; "
            "load the model's weights (or dispatch it with accelerate) before adapting it."
        )
    return device


def module_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>``, fetched from the offload hook's weights map when it is offloaded."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    for hook in _hooks(module):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is None:
            continue
        try:
            value = weights_map[name]
        except KeyError:
            continue
        return value.to(execution_device(module) or value.device)
    raise RuntimeError(
        f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook holds it; "
        "load the model's weights (or dispatch it with accelerate) before running it."
    )
