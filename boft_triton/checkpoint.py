"""Adapter checkpoints in PEFT's format: keys, files, atomic writes, safe loads.

A checkpoint holds, per adapted layer, ``base_model.model.<path>.boft_R`` and ``.boft_s`` (no
adapter name in the key), the biases the config trains, and the ``modules_to_save`` copies under
their plain module path: byte-for-byte the keys PEFT's ``get_peft_model_state_dict`` writes.
"""

from __future__ import annotations

import os
import warnings

import torch
from safetensors.torch import load_file, save_file

from . import deepspeed_support as zero
from .geometry import resolve_geometry
from .io_utils import atomic_path
from .layer import BOFTLayer
from .modules_to_save import ModulesToSaveWrapper

PREFIX = "base_model.model."
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def adapter_state_dict(model: torch.nn.Module, adapter_name: str, bias: str,
                       values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of one adapter of a module tree holding BOFT layers.

    ``values``: a state dict of the whole model to take the tensors from instead of the live
    parameters, as ``save_pretrained(state_dict=...)`` passes one gathered by DeepSpeed ZeRO-3 or
    FSDP; its keys may be relative to ``model``, to the ``BOFTModel`` around it (``model.``) or to
    a PEFT model (``base_model.model.``)."""

    def value(key: str, live: torch.Tensor) -> torch.Tensor:
        if values is None:
            return live
        for candidate in (key, f"model.{key}", f"{PREFIX}{key}"):
            if candidate in values:
                found = values[candidate]
                if found.numel() == 0 and zero.full_numel(live) > 0:
                    raise ValueError(
                        f"the state_dict passed to save_pretrained holds an empty {candidate!r}: a partitioned "
                        "(DeepSpeed ZeRO-3) state dict. Call save_pretrained without state_dict on every rank "
                        "(it gathers the adapter tensors only), or pass accelerator.get_state_dict(model).")
                return found
        raise KeyError(f"the state_dict passed to save_pretrained has no {key!r}: pass the whole model's state dict "
                       "(accelerator.get_state_dict(model)), or none")

    # DeepSpeed ZeRO-3: gather this adapter's tensors (never the base) and copy them inside the block
    to_gather = _adapter_tensors(model, adapter_name, bias) if values is None else []
    copy = any(zero.is_partitioned(t) for t in to_gather)  # the storage goes back on exit
    with zero.gather_context(to_gather):
        out = _collect(model, adapter_name, bias, value)
        return {k: _full(v).detach().clone() if copy else _full(v).detach().contiguous() for k, v in out.items()}


def _adapter_tensors(model: torch.nn.Module, adapter_name: str, bias: str) -> list[torch.Tensor]:
    """The parameters ``adapter_state_dict`` reads for one adapter: its BOFT tensors, its
    ``modules_to_save`` copies and the biases ``bias`` trains."""
    found: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, BOFTLayer) and adapter_name in module.boft_R:
            found += [module.boft_R[adapter_name], module.boft_s[adapter_name]]
            if bias == "boft_only" and module.base_layer.bias is not None:
                found.append(module.base_layer.bias)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            found += list(module.modules_to_save[adapter_name].parameters())
    if bias == "all":
        found += [p for n, p in model.named_parameters() if n.endswith("bias")]
    return list({id(t): t for t in found}.values())


def _collect(model: torch.nn.Module, adapter_name: str, bias: str, value) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, BOFTLayer) and adapter_name in module.boft_R:
            out[f"{PREFIX}{name}.boft_R"] = value(f"{name}.boft_R.{adapter_name}", module.boft_R[adapter_name])
            out[f"{PREFIX}{name}.boft_s"] = value(f"{name}.boft_s.{adapter_name}", module.boft_s[adapter_name])
            if bias == "boft_only" and module.base_layer.bias is not None:
                out[f"{PREFIX}{name}.base_layer.bias"] = value(f"{name}.base_layer.bias", module.base_layer.bias)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, live in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{name}.{key}"] = value(f"{name}.modules_to_save.{adapter_name}.{key}", live)
    if bias == "all":  # every bias, keyed as PEFT keys them (wrappers: this adapter's copy, original)
        own_copy, any_copy = f".modules_to_save.{adapter_name}.", ".modules_to_save."
        name_of = {id(param): name for name, param in model.named_parameters()}
        for name, param in model.named_parameters():
            if not name.endswith("bias"):
                continue
            if own_copy in f".{name}":
                name = f".{name}".replace(own_copy, any_copy)[1:]
            elif any_copy in f".{name}":
                continue  # another adapter's copy
            out[f"{PREFIX}{name}"] = value(source, param) if (source := name_of.get(id(param))) else param
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded DTensor (a collective: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def save_adapter_weights(state_dict: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SAFETENSORS_NAME if safe_serialization else BIN_NAME)
    # safetensors refuses tensors that share storage; cloning keeps each key its own bytes.
    tensors = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if safe_serialization:
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    return path


def read_adapter_weights(directory: str, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors``, or a ``.bin`` through ``torch.load(weights_only=True)``,
    onto ``device`` (the CPU by default)."""
    device = str(device) if device is not None else "cpu"
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path, device=device)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{st_path} could not be read ({err}); the adapter file is corrupt.") from err
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location=device, weights_only=True)
    raise FileNotFoundError(f"No {SAFETENSORS_NAME} or {BIN_NAME} in {directory!r}.")


def _trains_bias(bias: str, rel: str, layers: dict) -> bool:
    if not rel.endswith("bias"):
        return False
    if bias == "all":
        return True
    return bias == "boft_only" and rel.endswith(".base_layer.bias") and rel[: -len(".base_layer.bias")] in layers


def _mismatch(key: str, expected, found) -> ValueError:
    return ValueError(
        f"Checkpoint key {key!r}: expected shape {tuple(expected)}, found {tuple(found)}. The adapter was saved "
        "for another model or another block size / factor count; load it into the model it was trained on."
    )


def _check_factor_count(key: str, shape) -> None:
    """A ``boft_R`` of ``(N, D, b, b)`` with another N than the layer's: the butterfly must fit
    N factors of D blocks of b (PEFT's rules), else the forward would fail far from the load."""
    n_factors, block_num, block_size = int(shape[0]), int(shape[1]), int(shape[2])
    try:
        resolve_geometry(block_num * block_size, block_size, 0, n_factors)
    except ValueError as err:
        raise ValueError(
            f"Checkpoint key {key!r} has shape {tuple(shape)}: {n_factors} butterfly factors of {block_num} blocks "
            f"of {block_size} do not fit this layer ({err}). The checkpoint is damaged or was not saved for this "
            "model; load the adapter it was trained as."
        ) from None


def load_adapter_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str,
                            bias: str = "none", exact: bool = False) -> list[str]:
    """Copy PEFT-keyed tensors into adapter ``adapter_name`` of ``model``; returns unexpected keys.

    Besides the adapter and ``modules_to_save`` tensors, only the biases the config trains
    (``bias``) may be written into base modules: any other key is reported, never copied over a
    frozen base weight.

    Shapes are checked before anything is written, so a mismatched checkpoint leaves the model as
    it was. ``boft_R`` with another factor count N (PEFT without its CUDA extension saves N=1)
    reshapes the adapter to the checkpoint's N. Legacy ``boft_P`` buffers are ignored.

    ``exact`` (hot swap): every tensor must fit the existing one as it is (no change of N) and
    every key must have its place; otherwise nothing is written and ValueError says why.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BOFTLayer) and adapter_name in m.boft_R}
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    plain = dict(model.named_parameters())
    plain.update(model.named_buffers())

    writes: list[tuple[str, object, torch.Tensor]] = []  # (key, destination, value)
    reshapes: dict[str, int] = {}
    unexpected: list[str] = []
    found: set[tuple[str, str]] = set()
    for key, value in state_dict.items():
        rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if rel.endswith(".boft_P"):
            continue
        if rel.endswith((".boft_R", ".boft_s")):
            path, kind = rel.rsplit(".", 1)
            if path not in layers:
                raise ValueError(
                    f"Checkpoint key {key!r} has no BOFT layer {path!r} in this model: the adapter targets other "
                    "modules than this config; check target_modules and the model."
                )
            param = getattr(layers[path], kind)[adapter_name]
            expected = zero.full_shape(param)  # a ZeRO-3 parameter's own shape is empty
            if kind == "boft_R" and value.dim() == 4 and tuple(value.shape[1:]) == expected[1:]:
                if value.shape[0] != expected[0]:
                    _check_factor_count(key, value.shape)
                    reshapes[path] = value.shape[0]
                    expected = tuple(value.shape)
            if tuple(value.shape) != expected:
                raise _mismatch(key, expected, value.shape)
            writes.append((key, (layers[path], kind), value))
            found.add((path, kind))
            continue
        wrapper_path = next((w for w in wrappers if rel.startswith(w + ".")), None)
        inner = rel[len(wrapper_path) + 1:] if wrapper_path else ""
        if wrapper_path is not None and adapter_name in wrappers[wrapper_path].modules_to_save \
                and not inner.startswith("original_module."):
            sub = dict(wrappers[wrapper_path].modules_to_save[adapter_name].state_dict(keep_vars=True))
            # PEFT keys the copy's bias as "<m>.modules_to_save.bias" under bias="all"
            dest = sub.get(inner.removeprefix("modules_to_save."))
        elif _trains_bias(bias, rel, layers):
            dest = plain.get(rel)
        else:
            dest = None
        if dest is None:
            unexpected.append(key)
            continue
        if zero.full_shape(dest) != tuple(value.shape):
            raise _mismatch(key, zero.full_shape(dest), value.shape)
        writes.append((key, dest, value))

    missing = [f"{PREFIX}{p}.{k}" for p in layers for k in ("boft_R", "boft_s") if (p, k) not in found]
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} adapter tensors this model expects, e.g. {missing[:3]}: it was "
            "saved for a model with other target modules."
        )
    if exact and (reshapes or unexpected):
        what = (f"{len(reshapes)} layers with another butterfly factor count" if reshapes
                else f"keys with no place in this adapter, e.g. {unexpected[:3]}")
        raise ValueError(f"The checkpoint does not fit adapter {adapter_name!r} as it is ({what}); nothing was "
                         "changed. Load it as a new adapter with load_adapter instead.")
    if reshapes and any(zero.is_partitioned(layers[p].boft_R[adapter_name]) for p in reshapes):
        raise ValueError(
            f"The checkpoint holds {len(reshapes)} layers with another butterfly factor count than this adapter, and "
            "its parameters are partitioned by DeepSpeed ZeRO-3, where they cannot be replaced; nothing was changed. "
            "Build the adapter with the checkpoint's boft_n_butterfly_factor, then load.")
    for path, n_factors in reshapes.items():
        layers[path].reshape_adapter(adapter_name, n_factors)
    resolved = [(key, getattr(dest[0], dest[1])[adapter_name] if isinstance(dest, tuple) else dest, value)
                for key, dest, value in writes]
    # ZeRO-3: every rank read the same file; rank 0's whole tensors are re-partitioned on exit
    with torch.no_grad(), zero.gather_context([dest for _, dest, _ in resolved], modifier_rank=0):
        for key, dest, value in resolved:
            if is_dtensor(dest):  # FSDP2: each rank keeps its shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(dest.dtype), dest.device_mesh, dest.placements)
            dest.copy_(value.to(device=dest.device, dtype=dest.dtype))
    if unexpected:
        warnings.warn(f"Ignored {len(unexpected)} checkpoint keys with no place in this model: {unexpected[:5]}", stacklevel=2)
    return unexpected
