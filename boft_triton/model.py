"""``BOFTModel``: injects BOFT layers into a model by name and manages its adapters, PEFT-style."""

from __future__ import annotations

import copy
import inspect
import os
import types
import warnings
from contextlib import contextmanager

from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, hub, mixed_batch, status
from . import deepspeed_support as zero
from .config import BOFTConfig
from .layer import BOFTLayer, supported_layer_class
from .modules_to_save import ModulesToSaveWrapper
from .targeting import ALL_LINEAR, add_task_heads, all_linear_targets, default_targets, is_module_to_save, is_target


def _parent(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, child = key.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _refuse_adapted(model: nn.Module) -> None:
    """A second ``adapt()`` would re-initialise the adapters in place (losing their training and
    swapping the Parameters under any optimizer), so it is refused."""
    if isinstance(model, BOFTModel):
        raise ValueError(
            "This model is already a BOFTModel. To add a second adapter call model.add_adapter(name, config) "
            "(then model.set_adapter(name)); to start over call model.unload() and adapt the model it returns."
        )
    adapted = [n for n, m in model.named_modules() if isinstance(m, (BOFTLayer, ModulesToSaveWrapper))]
    if adapted:
        raise ValueError(
            f"This model already holds BOFT adapter modules ({adapted[:3]}...): it was adapted before, and adapting "
            "it again would reset the trained adapter. Use the BOFTModel that adapt() returned: its add_adapter(name, "
            "config) adds another adapter; its unload() gives back the plain model."
        )


class TargetModulesNotFound(ValueError):
    """No module of the model matches the config's target_modules (a ValueError, as in PEFT)."""


class BOFTModel(nn.Module):
    """A model with BOFT adapters; attribute access and ``forward``/``generate`` pass through.

    Attributes: ``model`` (the adapted model), ``peft_config`` (adapter name -> ``BOFTConfig``).
    ``BOFTModel`` plays both of PEFT's roles, ``PeftModel`` and the tuner model (``BoftModel``):
    ``base_model`` is this object itself, so PEFT-style ``model.base_model.model`` is the
    transformers model, and ``model.base_model.<tuner method>`` works.
    """

    prefix = "boft_"

    def __init__(self, model: nn.Module, config: BOFTConfig | None = None, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, *,
                 peft_config: BOFTConfig | None = None) -> None:
        super().__init__()
        _refuse_adapted(model)
        self.model = model
        self.peft_config: dict[str, BOFTConfig] = {}
        self.active_adapters: list[str] = []
        self._adapters_disabled = False
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.add_adapter(adapter_name, _one_config(peft_config, config), low_cpu_mem_usage)
        self.set_adapter(adapter_name, inference_mode=self.peft_config[adapter_name].inference_mode)
        self._expose_forward_signature()

    # -- passthrough ----------------------------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self._call(self.model, *args, **kwargs)

    def _call(self, fn, *args, adapter_names: list[str] | None = None, **kwargs):
        """``fn(*args, **kwargs)``; with PEFT's ``adapter_names`` (one per sample), a mixed-adapter
        batch (``boft_triton.mixed_batch``)."""
        if adapter_names is None:
            return fn(*args, **kwargs)
        layers = [m for _, m in self._boft_layers()]
        names = mixed_batch.check_names(adapter_names, list(self.peft_config), self.training,
                                        any(layer.merged for layer in layers))
        wrappers = [m for _, m in self._wrappers()]
        with mixed_batch.mixed_batch(layers + wrappers, names):
            return fn(*args, **kwargs)

    def _expose_forward_signature(self) -> None:
        """Give ``forward`` the wrapped model's signature: transformers' Trainer keeps only the
        batch columns the forward names (``remove_unused_columns``), and ``*args, **kwargs`` name none."""
        try:
            signature = inspect.signature(type(self.model).forward)
        except (TypeError, ValueError):
            return

        def forward(self, *args, **kwargs):
            return self._call(self.model, *args, **kwargs)

        forward.__signature__ = signature
        forward.__doc__ = type(self.model).forward.__doc__
        forward.passes_through = True
        self.forward = types.MethodType(forward, self)

    def forwards_unchanged(self) -> bool:
        """Whether ``forward`` still just calls the wrapped model (no one replaced it)."""
        forward = self.__dict__.get("forward")
        return forward is None or getattr(getattr(forward, "__func__", None), "passes_through", False)

    # The per-instance forward is bound to this object: copies made without __init__ get their own.
    def __getstate__(self):  # pickle, deepcopy: the function is rebuilt on load, not pickled
        state = self.__dict__.copy()
        if self.forwards_unchanged():
            state.pop("forward", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "forward" not in self.__dict__:
            self._expose_forward_signature()

    def _replicate_for_data_parallel(self):  # nn.DataParallel copies __dict__, bound forward included
        replica = super()._replicate_for_data_parallel()
        if self.forwards_unchanged():
            replica._expose_forward_signature()
        return replica

    def generate(self, *args, **kwargs):
        return self._call(self.model.generate, *args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def base_model(self) -> "BOFTModel":
        """PEFT's ``PeftModel.base_model`` is the tuner model, whose ``.model`` is the transformers
        model; this class is both, so it returns itself (``model.base_model.model`` is the model)."""
        return self

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    # -- module walks ---------------------------------------------------------------------------

    def _boft_layers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, BOFTLayer)]

    def _wrappers(self):
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    # -- adapters -------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: BOFTConfig | None = None, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool | None = None, *, config: BOFTConfig | None = None) -> None:
        """Inject a new adapter. It is not made active (use ``set_adapter``), as in PEFT.

        ``peft_config`` is PEFT's name for the config (``config=`` is accepted too).
        ``low_cpu_mem_usage`` is accepted for PEFT compatibility: the new tensors are created
        directly on the layer's device, at their final size, so there is nothing to save.
        """
        config = _one_config(peft_config, config)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} exists already; delete it first or pick another name.")
        config = copy.deepcopy(config)
        add_task_heads(config)
        if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
            config.target_modules = all_linear_targets(self.model, config)
        targets = config.target_modules if config.target_modules is not None else default_targets(self.model)
        if config.target_modules is None:
            config.target_modules = targets
        self.peft_config[adapter_name] = config
        autocast = self.autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype
        try:
            self._inject(adapter_name, config, targets, autocast)
        except Exception:
            self._drop(adapter_name)
            raise
        self._set_trainable()

    def _inject(self, adapter_name: str, config: BOFTConfig, targets, autocast: bool) -> None:
        keys = [k for k, _ in self.model.named_modules() if k]
        inside_adapter = ("base_layer", "original_module", "modules_to_save")
        matched, unsupported, replaced = [], [], []
        for key in keys:
            if any(part in inside_adapter for part in key.split(".")):
                continue  # modules living inside our own wrappers
            if any(key.startswith(prefix + ".") for prefix in replaced):
                continue  # children of a module wrapped a moment ago
            module = self.model.get_submodule(key)
            if is_module_to_save(config, key) and not isinstance(module, BOFTLayer):
                self._wrap_module_to_save(key, module, adapter_name)
                replaced.append(key)
                continue
            if not is_target(config, targets, key):
                continue
            if isinstance(module, BOFTLayer):
                module.update_layer(adapter_name, config, key)
                layer = module
            else:
                layer_cls = supported_layer_class(module)
                if layer_cls is None:
                    unsupported.append(f"{key} ({type(module).__name__})")
                    continue
                layer = layer_cls(module, adapter_name, config, key)
                parent, child = _parent(self.model, key)
                setattr(parent, child, layer)
                replaced.append(key)
            layer.disable_adapters = self._adapters_disabled
            if not autocast:  # PEFT's autocast_adapter_dtype=False: the base's dtype
                layer.boft_R[adapter_name].data = layer.boft_R[adapter_name].data.to(layer.base_dtype())
                layer.boft_s[adapter_name].data = layer.boft_s[adapter_name].data.to(layer.base_dtype())
            matched.append(key)
        if unsupported:
            raise TypeError(
                f"Target modules {unsupported} are not supported: BOFT adapts nn.Linear, transformers Conv1D and "
                "nn.Conv2d. Narrow target_modules (or use exclude_modules) so only such layers match."
            )
        if not matched:
            candidates = sorted({k.rsplit(".", 1)[-1] for k in keys if supported_layer_class(self.model.get_submodule(k))})
            raise TargetModulesNotFound(
                f"Target modules {config.target_modules!r} matched no module of the model. Adaptable layer names here "
                f"include {candidates[:20]}; pass some of them as target_modules."
            )

    def _wrap_module_to_save(self, key: str, module: nn.Module, adapter_name: str) -> None:
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
            return
        parent, child = _parent(self.model, key)
        wrapper = ModulesToSaveWrapper(module, adapter_name)
        wrapper.disable_adapters = self._adapters_disabled
        setattr(parent, child, wrapper)

    def _freeze_base(self, trainable: bool) -> None:
        """Freeze the base model, then unfreeze the biases the active adapters' configs train."""
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in f".{name}":
                param.requires_grad_(False)
        modes = {self.peft_config[a].bias for a in self.active_adapters} if trainable else set()
        if "all" in modes:
            for name, param in self.model.named_parameters():
                if name.endswith("bias") and ".original_module." not in f".{name}":
                    param.requires_grad_(True)
        if "boft_only" in modes:
            for _, layer in self._boft_layers():
                if layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)

    def _set_trainable(self) -> None:
        trainable = not any(self.peft_config[a].inference_mode for a in self.active_adapters)
        self._freeze_base(trainable)
        for _, layer in self._boft_layers():
            layer.set_adapter(self.active_adapters, trainable)
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(self.active_adapters, trainable)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several that compose (``M = M_last ... M_first``).

        As in PEFT, the activated adapters become trainable unless ``inference_mode=True``, and a
        merged model is unmerged first (with a warning): the merged weights hold the old adapters.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapter(s) {missing}; this model has {list(self.peft_config)}.")
        self._unmerge_before_switch()
        self.active_adapters = names
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self._set_trainable()

    def _unmerge_before_switch(self) -> None:
        if any(layer.merged for _, layer in self._boft_layers()):
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=3)
            self.unmerge_adapter()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; this model has {list(self.peft_config)}.")
        if any(adapter_name in layer.merged_adapters for _, layer in self._boft_layers()):
            raise ValueError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        self._drop(adapter_name)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]  # PEFT's choice: the first remaining name
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{remaining[0]}.", stacklevel=2)
        self.active_adapters = remaining
        self._set_trainable()

    def _drop(self, adapter_name: str) -> None:
        self.peft_config.pop(adapter_name, None)
        for _, layer in self._boft_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)

    # -- enable / disable -----------------------------------------------------------------------

    def _enable(self, enabled: bool) -> None:
        self._adapters_disabled = not enabled
        for _, module in self._boft_layers() + self._wrappers():
            module.disable_adapters = not enabled
        # As PEFT: disabled adapters are frozen, enabling makes the active ones trainable again.
        if enabled:
            self._set_trainable()
        else:
            self.set_requires_grad(list(self.peft_config), requires_grad=False)

    def enable_adapter_layers(self) -> None:
        self._enable(True)

    def disable_adapter_layers(self) -> None:
        self._enable(False)

    @contextmanager
    def disable_adapter(self):
        """Run the base model (merged adapters are unmerged) inside the ``with`` block."""
        was_disabled = self._adapters_disabled
        self._enable(False)
        try:
            yield
        finally:
            self._enable(not was_disabled)

    # -- merge / unload -------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights; with ``safe_merge`` every merged weight is checked
        to be finite before any of them is written, so a broken adapter leaves the model as it was."""
        layers = self._boft_layers()
        if any(checkpoint.is_dtensor(layer.weight) for _, layer in layers):
            raise RuntimeError(
                "This model's weights are sharded (FSDP2); merging needs whole weights. Save the adapter "
                "(save_pretrained gathers it), load it into an unsharded copy of the base model with "
                "BOFTModel.from_pretrained, and merge there."
            )
        if any(zero.is_partitioned(layer.weight) for _, layer in layers):
            raise RuntimeError(zero.MERGE_REFUSAL)  # refused on every rank alike, before anything is written
        pending = []
        for key, layer in layers:
            names = layer.adapters_to_merge(adapter_names)
            if names:
                layer.check_mergeable(key)  # quantized / offloaded bases refuse before anything is written
                weight = layer.merged_weight(names, safe_merge) if safe_merge else None
                pending.append((layer, names, weight))
        for layer, names, weight in pending:
            if weight is None:
                weight = layer.merged_weight(names)
            layer.commit_merge(weight, names)

    def unmerge_adapter(self) -> None:
        for _, layer in self._boft_layers():
            if layer.merged:
                layer.unmerge()

    def _unload(self, merge: bool, progressbar: bool, safe_merge: bool, adapter_names) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        items = self._boft_layers() + self._wrappers()
        for key, module in tqdm(items, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "") + "model"):
            parent, child = _parent(self.model, key)
            if isinstance(module, BOFTLayer):
                setattr(parent, child, module.base_layer)
            else:
                keep = module.modules_to_save[module.active_adapter] if merge and module.active_adapter else module.original_module
                setattr(parent, child, keep)
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the adapters (all active ones, or ``adapter_names``) and return the plain model."""
        return self._unload(True, progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every BOFT module without merging and return the original base model."""
        return self._unload(False, False, False, None)

    # -- parameters -----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- save / load ----------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool = True,
                        state_dict: dict | None = None, **kwargs) -> None:
        """PEFT's layout: the ``default`` adapter at the top, others in sub-folders of their name.

        With FSDP2-sharded adapters every rank must call this (the full tensors are gathered);
        only the one with ``is_main_process`` writes. ``state_dict``, as PEFT and Trainer pass it:
        the whole model's state dict (``accelerator.get_state_dict(model)`` under DeepSpeed ZeRO-3
        or FSDP, keys as this model's ``state_dict()`` or its wrapped model's), from which the
        adapter tensors are taken instead of the live parameters; nothing is gathered then (no
        collective), so only the main process needs to call, as Trainer does. Without it, under
        DeepSpeed ZeRO-3 every rank must call: the adapter tensors (never the base) are gathered.
        Other keywords PEFT's method
        takes (``save_function``, ``save_embedding_layers``, ...) are accepted and unused: the
        files are written atomically with safetensors.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a directory.")
        self._refuse_empty_save()
        if selected_adapters is None:
            selected_adapters = list(self.peft_config)
        unknown = [name for name in selected_adapters if name not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters names adapter(s) {unknown} that this model does not have; "
                             f"its adapters are {list(self.peft_config)}.")
        if is_main_process:  # as PEFT: the directory exists afterwards, even when no adapter is selected
            os.makedirs(save_directory, exist_ok=True)
        for name in selected_adapters:
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
            out = os.path.join(save_directory, "" if name == "default" else name)
            tensors = checkpoint.adapter_state_dict(self.model, name, config.bias, state_dict)
            if is_main_process:
                checkpoint.save_adapter_weights(tensors, out, safe_serialization)
                config.save_pretrained(out)

    def _refuse_empty_save(self) -> None:
        if not self.peft_config:
            raise ValueError(
                "This model has no adapter left (every adapter was deleted), so save_pretrained would write an empty "
                "folder. Add or load an adapter first, or save the plain model with model.unload().save_pretrained()."
            )

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the adapter(s), saved in PEFT's layout, to the Hub repo ``repo_id`` (see ``hub.push_to_hub``)."""
        return hub.push_to_hub(self, repo_id, **kwargs)

    @property
    def active_peft_config(self) -> BOFTConfig:
        """The config of the (first) active adapter, as ``PeftModel.active_peft_config``."""
        return self.peft_config[self.active_adapters[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The ``modules_to_save`` names of every adapter together (None when none has any), as PEFT."""
        names = {m for config in self.peft_config.values() for m in (config.modules_to_save or [])}
        return names or None

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients of these adapters (their BOFT tensors and ``modules_to_save`` copies) on or off."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for _, layer in self._boft_layers():
            for name in names & set(layer.boft_R):
                layer.boft_R[name].requires_grad_(requires_grad)
                layer.boft_s[name].requires_grad_(requires_grad)
        for _, wrapper in self._wrappers():
            for name in names & set(wrapper.modules_to_save):
                wrapper.modules_to_save[name].requires_grad_(requires_grad)

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """One entry per adapted layer: enabled, active / merged / available adapters, requires_grad, devices."""
        return status.layer_status(self)  # names as PEFT gives them: "model.<path>"

    def get_model_status(self) -> status.TunerModelStatus:
        """The layer statuses summarised; a field that differs between layers reads ``"irregular"``."""
        return status.model_status(self, self.get_layer_status())

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, torch_device: str | None = None, low_cpu_mem_usage: bool = False,
                     revision: str | None = None, **hub_kwargs) -> None:
        """Load an adapter saved by ``save_pretrained`` (ours or PEFT's) from a folder or Hub repo.

        ``torch_device`` is where the checkpoint tensors are read to (the adapter then lives on
        its layer's device); ``revision`` and ``hub_kwargs`` go to the Hub download."""
        config, weights = _read_saved_adapter(model_id, subfolder, revision, torch_device, is_trainable, **hub_kwargs)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage)
        try:
            checkpoint.load_adapter_state_dict(self.model, weights, adapter_name, config.bias)
        except Exception:
            self._drop(adapter_name)
            raise
        self._sync_factor_count(adapter_name)
        self._set_trainable()

    def _sync_factor_count(self, adapter_name: str) -> None:
        """Make the config say the N the loaded tensors have (PEFT may save N=1 for any config)."""
        counts = {layer.boft_R[adapter_name].shape[0] for _, layer in self._boft_layers() if adapter_name in layer.boft_R}
        if len(counts) == 1:
            self.peft_config[adapter_name].boft_n_butterfly_factor = counts.pop()

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, subfolder: str | None = None, torch_device: str | None = None,
                        low_cpu_mem_usage: bool = False, revision: str | None = None,
                        autocast_adapter_dtype: bool = True, **hub_kwargs) -> "BOFTModel":
        """Wrap ``model`` and load the adapter saved in ``model_id`` (ours or PEFT's; a folder or a
        Hub repo id). The keywords are ``PeftModel.from_pretrained``'s (see ``load_adapter``)."""
        config, weights = _read_saved_adapter(model_id, subfolder, revision, torch_device, is_trainable, **hub_kwargs)
        boft_model = cls(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
        checkpoint.load_adapter_state_dict(boft_model.model, weights, adapter_name, config.bias)
        boft_model._sync_factor_count(adapter_name)
        boft_model._set_trainable()
        if not is_trainable:
            boft_model.eval()
        return boft_model


def _read_saved_adapter(model_id, subfolder, revision, torch_device, is_trainable: bool, **hub_kwargs):
    """The config (``inference_mode`` set from ``is_trainable``) and tensors of a saved adapter."""
    directory = hub.resolve_adapter_dir(model_id, subfolder, revision, **hub_kwargs)
    config = BOFTConfig.from_pretrained(directory)
    config.inference_mode = not is_trainable
    return config, checkpoint.read_adapter_weights(directory, torch_device)


def _one_config(peft_config: BOFTConfig | None, config: BOFTConfig | None) -> BOFTConfig:
    if (peft_config is None) == (config is None):
        raise TypeError("Pass the adapter's BOFTConfig once, as peft_config (PEFT's name) or config.")
    return peft_config if peft_config is not None else config


def adapt(model: nn.Module, config: BOFTConfig | None = None, adapter_name: str = "default",
          autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, *,
          peft_config: BOFTConfig | None = None) -> BOFTModel:
    """Add a BOFT adapter to ``model`` (like ``peft.get_peft_model``, whose ``peft_config=``
    keyword works too); only adapters stay trainable. An already adapted model is refused."""
    return BOFTModel(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, peft_config=peft_config)
