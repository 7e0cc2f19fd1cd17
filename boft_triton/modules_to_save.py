"""Trainable copies of whole modules (a classification head, say), one per adapter, as PEFT does."""

from __future__ import annotations

from torch import nn

from .deepspeed_support import copy_module


class ModulesToSaveWrapper(nn.Module):
    """Keeps the frozen ``original_module`` and a trainable copy per adapter in ``modules_to_save``.

    The names match PEFT's wrapper, so state-dict keys (and therefore checkpoints) line up.
    """

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.original_module.requires_grad_(False)
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            # a deepcopy; under ZeRO-3 (zero3_init_flag) copied from the gathered parameters
            self.modules_to_save[adapter_name] = copy_module(self.original_module)

    def set_adapter(self, adapter_names: list[str], trainable: bool = True) -> None:
        live = [a for a in adapter_names if a in self.modules_to_save]
        self.active_adapter = live[0] if live else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        mixed = self.__dict__.get("mixed_adapter_names")
        if mixed is not None and not self.disable_adapters:  # each sample with its adapter's copy
            from .mixed_batch import per_group

            def head(name, rows):
                module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
                return module(rows, *args[1:], **kwargs)

            return per_group(args[0], mixed, head)
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "disable_adapters" not in self.__dict__:
                raise  # half-built (e.g. during deepcopy): nothing to forward to yet
            # Code that reads e.g. `classifier.weight` or `out_features` sees the module in use.
            return getattr(self.active_module, name)
