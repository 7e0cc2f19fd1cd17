"""Hot swap: load another saved adapter into an existing adapter's parameters, in place.

As PEFT's ``hotswap_adapter`` does for LoRA: the parameters keep their identity, shapes, dtypes and
devices, only their values change, so a ``torch.compile``d model runs the new adapter without
recompiling, and a server swaps adapters without rebuilding anything.
"""

from __future__ import annotations

import os

from . import checkpoint


def hotswap_adapter(model, model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                    torch_device: str | None = None, **hub_kwargs) -> None:
    """Replace the values of ``model``'s adapter ``adapter_name`` with those saved in
    ``model_name_or_path`` (a folder or Hub repo, ours or PEFT's). The saved adapter must have the
    same shapes (targets, block size, factor count), the same ``bias`` setting and the same
    ``modules_to_save``; anything else is refused before any value changes."""
    from .model import BOFTModel, _read_saved_adapter

    if not isinstance(model, BOFTModel):
        raise TypeError(f"hotswap_adapter takes a BOFTModel, got {type(model).__name__}")
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter {adapter_name!r} to swap into; this model has {list(model.peft_config)}.")
    config, weights = _read_saved_adapter(model_name_or_path, hub_kwargs.pop("subfolder", None),
                                          hub_kwargs.pop("revision", None), torch_device, False, **hub_kwargs)
    current = model.peft_config[adapter_name]
    for field in ("bias", "modules_to_save"):
        theirs, ours = getattr(config, field), getattr(current, field)
        if _comparable(theirs) != _comparable(ours):
            raise ValueError(f"Cannot hot-swap {model_name_or_path} into {adapter_name!r}: its {field} is {theirs!r}, "
                             f"the adapter's is {ours!r}; nothing was changed. Load it with load_adapter instead.")
    checkpoint.load_adapter_state_dict(model.model, weights, adapter_name, config.bias, exact=True)


def _comparable(value):
    """A config field as compared: lists as sorted lists (None is no list), strings as they are."""
    return value if isinstance(value, str) else sorted(value or [])
