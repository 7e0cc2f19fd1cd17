"""``patch_peft()`` / ``unpatch_peft()``: PEFT's own BOFT layers, computed with boft_triton's ops.

For users who keep PEFT's API (``get_peft_model``, ``PeftModel.from_pretrained``, Trainer or TRL
with ``peft_config=BOFTConfig(...)``, ``merge_and_unload``)::

    import boft_triton
    boft_triton.patch_peft()      # from here on PEFT's BOFT layers run on boft_triton.ops
    model = peft.get_peft_model(base, peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, ...))
    ...
    boft_triton.unpatch_peft()    # PEFT exactly as it was

The layers stay PEFT's (same classes, parameters, buffers, state-dict keys, save and load); only
the maths inside them is replaced, at these seams of ``peft.tuners.boft.layer`` (the registry
``SEAMS`` below is exactly what is replaced, and ``unpatch_peft`` puts back the same objects):

- ``get_fbd_cuda``: PEFT's loader of its CUDA extension. Without the extension PEFT silently
  trains one butterfly factor whatever ``boft_n_butterfly_factor`` says; patched, the loader
  returns a block-diagonal stand-in, so PEFT keeps N factors (``boft_R`` of shape ``(N, D, b, b)``,
  as PEFT writes with its extension) and needs no compiler.
- ``BOFTLayer.update_layer`` and ``Conv2d.update_layer``: unchanged, but they first warn (once per
  ``patch_peft()``) when a config or a loaded checkpoint asks for N > 1 where PEFT alone would
  have dropped to one factor.
- ``Linear.forward`` / ``Conv2d.forward``: input-centric for Linear (``base_layer(x M)``, the
  activations rotated by ``boft_triton.ops.butterfly``, no n x n matrix), weight-centric for
  Conv2d, with PEFT's order of adapters, its multiplicative dropout module and its dtype casts.
- ``Linear.get_delta_weight`` / ``Conv2d.get_delta_weight`` and ``BOFTLayer.cayley_batch``: the
  rotation that PEFT's own ``merge`` / ``unmerge`` use, built with ``boft_triton.ops``.
- ``peft.tuners.boft.model.BOFTModel._enable_peft_forward_hooks`` (added; PEFT has it for LoRA
  only): ``PeftModel(..., adapter_names=[...])`` gives each sample its adapter, as PEFT's LoRA
  does, where PEFT alone drops the argument for BOFT; the patched forwards take ``adapter_names``.

On CUDA tensors ``boft_triton.ops`` runs the Triton kernels, on CPU the torch path.

PEFT's BOFT ``Conv2d`` has quirks that the patch keeps, because a patched layer must compute
what the unpatched one does: the input width is ``in_channels * kernel_size[0]**2`` (so only
square kernels work), and the convolution uses ``padding[0]`` and ``stride[0]`` and ignores
dilation and ``padding_mode``. ``boft_triton.adapt`` has none of these limits.

Known difference from unpatched PEFT: PEFT keeps one ``boft_P`` buffer per layer, rebuilt by each
``add_adapter``, so adapters of different geometry on one layer compute with the last one's
permutations (or fail). Patched, each adapter uses the permutations of its own ``boft_R`` shape.
Layers built while patched with N > 1 keep N factors after ``unpatch_peft()``; unpatched PEFT then
runs them only where its CUDA extension builds, as it would a checkpoint saved with N > 1.
PEFT's dense ``boft_P`` buffer (N x n x n per layer) is still built, since it is PEFT's layer
state; the patched maths never reads it.

Checked against PEFT 0.21.2. ``patch_peft()`` checks every seam before replacing anything and
raises ``PeftPatchError`` naming the missing one on a PEFT whose BOFT layer differs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import mixed_batch, ops

CHECKED_PEFT_VERSIONS = ("0.21.2",)


class PeftPatchError(RuntimeError):
    """The installed PEFT's BOFT layer lacks a seam that ``patch_peft()`` relies on."""


# ----------------------------------------------------------------------------- the maths


def _rotation_blocks(layer, adapter: str) -> torch.Tensor:
    """Q ``(N, D, b, b)`` of one adapter in fp32, with PEFT's multiplicative dropout module applied
    (it is an ``nn.Identity`` when ``boft_dropout`` is 0 and a no-op in eval mode)."""
    Q = ops.cayley(layer.boft_R[adapter])
    return layer.boft_dropout[adapter](Q)


def _active_rotations(layer, scale_dtype: torch.dtype, scale_device, adapters=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rotation blocks of the active adapters (or of ``adapters``) in PEFT's order (first active
    first) and their combined scale ``(o,)``, which starts as ones of ``scale_dtype`` like PEFT's
    (so it promotes the same way)."""
    rotations = []
    scale = torch.ones(int(layer.out_features), dtype=scale_dtype, device=scale_device)
    for adapter in layer.active_adapters if adapters is None else adapters:
        if adapter not in layer.boft_R.keys():
            continue
        rotations.append(_rotation_blocks(layer, adapter))
        scale = layer.boft_s[adapter].reshape(-1) * scale
    return rotations, scale


def _dense_rotation(boft_R: torch.Tensor) -> torch.Tensor:
    """The n x n matrix ``M = B_{N-1} ... B_0`` PEFT's ``get_delta_weight`` returns (``I M``).

    Only merge / unmerge use it (once, not per step), as PEFT does."""
    Q = ops.cayley(boft_R)
    n = Q.shape[1] * Q.shape[2]
    eye = torch.eye(n, device=Q.device, dtype=Q.dtype)
    return ops.butterfly(eye, Q).to(boft_R.dtype)


def _base_only(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's two paths around the adapters: disabled (unmerged first) or merged."""
    if self.disable_adapters and self.merged:
        self.unmerge()
    return self.base_layer(x, *args, **kwargs)


def _linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    previous_dtype = x.dtype
    adapter_names = kwargs.pop("adapter_names", None)
    if self.disable_adapters or self.merged:
        result = _base_only(self, x, *args, **kwargs)
    elif adapter_names is not None:  # a mixed-adapter batch: each sample with its own adapter
        h = mixed_batch.rotate_per_sample(x, adapter_names, lambda name: (
            _rotation_blocks(self, name) if name in self.boft_R.keys() else None))
        result = self.base_layer(h, *args, **kwargs)
        # the dtype PEFT's own scale promotes to: ones of x's dtype times each adapter's boft_s
        dtype = functools.reduce(torch.promote_types, [self.boft_s[n].dtype for n in set(adapter_names)
                                                       if n in self.boft_s.keys()], previous_dtype)
        result = _scaled(self, result, mixed_batch.row_scales(result, adapter_names, self.boft_s, dtype))
    else:
        rotations, scale = _active_rotations(self, previous_dtype, x.device)
        # PEFT rotates x by M_last ... M_first, so x meets the last active adapter's M first.
        for Q in reversed(rotations):
            x = ops.butterfly(x, Q)
        result = _scaled(self, self.base_layer(x, *args, **kwargs), scale)
    return result.to(previous_dtype)


def _scaled(layer, result: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The base layer added its bias; PEFT scales only the product, not the bias."""
    bias = layer.base_layer.bias
    if bias is not None:
        result = result - bias
    result = result * scale
    if bias is not None:
        result = result + bias
    return result


def _linear_get_delta_weight(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _dense_rotation(self.boft_R[adapter]), self.boft_s[adapter]


def _conv2d_width(layer) -> int:
    """PEFT's input width for its BOFT Conv2d: ``in_channels * kernel_size[0]**2``."""
    k = layer.base_layer.kernel_size[0]
    return layer.in_features * k * k


def _conv2d_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    previous_dtype = x.dtype
    adapter_names = kwargs.pop("adapter_names", None)
    if self.disable_adapters or self.merged:
        result = _base_only(self, x, *args, **kwargs)
    elif adapter_names is not None:  # a mixed-adapter batch: one conv per adapter group
        result = mixed_batch.per_group(x, adapter_names, lambda name, rows: (
            _conv2d_adapted(self, rows, [name], previous_dtype) if name in self.boft_R.keys()
            else self.base_layer(rows, *args, **kwargs)))
    else:
        result = _conv2d_adapted(self, x, None, previous_dtype)
    return result.to(previous_dtype)


def _conv2d_adapted(self, x: torch.Tensor, adapters, previous_dtype) -> torch.Tensor:
    """PEFT's adapted Conv2d for the active adapters (or ``adapters``)."""
    base = self.base_layer
    k = base.kernel_size[0]
    weight = self.get_base_weight()
    if weight.shape[1:] != (self.in_features, k, k):
        raise ValueError(
            f"PEFT's BOFT Conv2d supports square kernels only (this layer's kernel is {tuple(base.kernel_size)}); "
            "boft_triton.patch_peft() keeps PEFT's layer as it is. Use boft_triton.adapt(), which handles any kernel."
        )
    x = x.to(weight.dtype)
    rotations, scale = _active_rotations(self, previous_dtype, x.device, adapters)
    # W rotation^T with rotation = M_last ... M_first: the first adapter's M^T comes first.
    w = weight.reshape(self.out_features, _conv2d_width(self))
    for Q in rotations:
        w = ops.butterfly(w, Q, transpose=True)
    w = (w * scale.reshape(-1, 1)).reshape(weight.shape)
    x = self._cast_input_dtype(x, w.dtype)
    bias = self._cast_input_dtype(base.bias, w.dtype)
    # PEFT's own call: padding[0] and stride[0], no dilation (its quirk, kept on purpose).
    return F.conv2d(input=x, weight=w, bias=bias, padding=base.padding[0], stride=base.stride[0])


def _conv2d_get_delta_weight(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _dense_rotation(self.boft_R[adapter]), self.boft_s[adapter].transpose(0, 1)


def _cayley_batch(self, data: torch.Tensor) -> torch.Tensor:
    """PEFT's ``cayley_batch`` on ``(B, b, b)`` blocks, through ``boft_triton.ops.cayley``."""
    return ops.cayley(data.unsqueeze(0))[0].to(data.dtype)


class BlockDiagExtension:
    """Stands in for PEFT's ``fbd_cuda`` extension: what its ``forward`` / ``backward`` compute.

    Truthy, so PEFT keeps N factors. The patched layers never call it; it is here for code that
    still calls PEFT's ``FastBlockDiag`` directly."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:  # (N, D, b, b) -> [(N, D*b, D*b)]
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]

    @staticmethod
    def backward(grad_output: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        N, D, b, _ = blocks.shape
        diagonal = grad_output.reshape(N, D, b, D, b).diagonal(dim1=1, dim2=3)  # (N, b, b, D)
        return [diagonal.permute(0, 3, 1, 2).contiguous()]


BLOCK_DIAG_EXTENSION = BlockDiagExtension()


def _get_fbd_cuda():
    return BLOCK_DIAG_EXTENSION


# ----------------------------------------------------------------------------- the N > 1 warning


_warned_dropped_factors = False


def _why_peft_alone_drops_factors() -> str | None:
    """Why PEFT's ``get_fbd_cuda`` would fail here, or None when it may build (or is loaded).

    Decided without building the extension (which takes minutes where it works)."""
    import peft.tuners.boft.layer as peft_layer

    if getattr(peft_layer, "_FBD_CUDA", None) is not None:
        return None
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "it needs the CUDA toolkit (nvcc) to build"
    if not cpp_extension.is_ninja_available():
        return "it needs ninja to build"
    return None


def _warn_if_factors_would_drop(config) -> None:
    global _warned_dropped_factors
    n_factors = getattr(config, "boft_n_butterfly_factor", 1)
    if _warned_dropped_factors or n_factors <= 1:
        return
    why = _why_peft_alone_drops_factors()
    if why is None:
        return
    _warned_dropped_factors = True
    warnings.warn(
        f"boft_n_butterfly_factor={n_factors}: PEFT alone would silently train 1 factor here (its CUDA extension "
        f"fbd_cuda cannot load: {why}); with boft_triton.patch_peft() the adapter keeps {n_factors} factors. "
        f"Its checkpoint holds boft_R with {n_factors} factors, which unpatched PEFT loads only where fbd_cuda "
        "builds; load it with patch_peft() (or boft_triton) elsewhere.",
        UserWarning,
        stacklevel=4,
    )


def _warning_update_layer(original: Callable) -> Callable:
    @functools.wraps(original)
    def update_layer(self, adapter_name, config, **kwargs):
        _warn_if_factors_would_drop(config)
        return original(self, adapter_name, config, **kwargs)

    return update_layer


# ----------------------------------------------------------------------------- mixed batches


@contextlib.contextmanager
def _enable_peft_forward_hooks(self, *args, **kwargs):
    """Added to PEFT's BOFT tuner model (PEFT has this hook for LoRA only, so for BOFT it dropped
    ``adapter_names`` silently): ``PeftModel(..., adapter_names=[...])`` passes each sample's
    adapter to every BOFT layer and ``modules_to_save`` wrapper, as PEFT's LoRA does (names
    repeated per beam under beam search)."""
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        yield
        return
    from peft.tuners.boft.layer import BOFTLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if self.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    layers = [m for m in self.modules() if isinstance(m, BOFTLayer)]
    if any(layer.merged for layer in layers):
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters: unmerge them first.")
    known = set().union(*(layer.boft_R.keys() for layer in layers)) if layers else set()
    unknown = {name for name in adapter_names if name != mixed_batch.BASE_ADAPTER} - known
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    num_beams = kwargs.get("num_beams")
    if isinstance(num_beams, int) and num_beams > 1:
        adapter_names = [name for name in adapter_names for _ in range(num_beams)]

    def pre_forward(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [m.register_forward_pre_hook(pre_forward, with_kwargs=True)
               for m in self.modules() if isinstance(m, (BOFTLayer, AuxiliaryTrainingWrapper))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Seam:
    owner: str  # "module" for the PEFT module itself, else a class name in it
    name: str
    replacement: Callable[[Callable], Callable]  # the original -> what replaces it
    needs_parameters: tuple[str, ...] = ()  # parameters the original must take (we call or mirror it)
    module: str = "peft.tuners.boft.layer"
    adds: bool = False  # the attribute must be absent: patch_peft adds it, unpatch_peft removes it


_ABSENT = object()  # the "original" of an attribute the patch added


def _replace(new: Callable) -> Callable[[Callable], Callable]:
    return lambda original: new


SEAMS = (
    Seam("module", "get_fbd_cuda", _replace(_get_fbd_cuda)),
    Seam("BOFTLayer", "update_layer", _warning_update_layer, ("adapter_name", "config")),
    Seam("Conv2d", "update_layer", _warning_update_layer, ("adapter_name", "config")),
    Seam("BOFTLayer", "cayley_batch", _replace(_cayley_batch), ("data",)),
    Seam("Linear", "forward", _replace(_linear_forward), ("x",)),
    Seam("Linear", "get_delta_weight", _replace(_linear_get_delta_weight), ("adapter",)),
    Seam("Conv2d", "forward", _replace(_conv2d_forward), ("x",)),
    Seam("Conv2d", "get_delta_weight", _replace(_conv2d_get_delta_weight), ("adapter",)),
    Seam("BOFTModel", "_enable_peft_forward_hooks", _replace(_enable_peft_forward_hooks), module="peft.tuners.boft.model",
         adds=True),
)

# (owner object, attribute name) -> the original object, for exactly what is replaced now.
_originals: dict[tuple[object, str], object] = {}


def _peft_module(name: str = "peft.tuners.boft.layer"):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise PeftPatchError(f"boft_triton.patch_peft() needs PEFT (pip install peft): {err}") from err


def _resolve(seam: Seam):
    """The owner object of a seam and its current attribute (``_ABSENT`` for one the patch adds),
    checked against what we rely on."""
    import peft

    where = f"PEFT {getattr(peft, '__version__', '?')} (checked against {', '.join(CHECKED_PEFT_VERSIONS)})"
    module = _peft_module(seam.module)
    owner = module if seam.owner == "module" else getattr(module, seam.owner, None)
    if owner is None or not isinstance(owner, type) and seam.owner != "module":
        raise PeftPatchError(
            f"boft_triton.patch_peft(): {seam.module} has no class {seam.owner} in {where}. "
            "Use boft_triton's own API (boft_triton.adapt) or a PEFT version listed here."
        )
    current = vars(owner).get(seam.name)
    if seam.adds:
        if current is not None or hasattr(owner, seam.name):
            raise PeftPatchError(
                f"boft_triton.patch_peft(): {seam.owner}.{seam.name} already exists in {seam.module} in {where}, "
                "where the patch would add its own. Use boft_triton.adapt or a listed PEFT version."
            )
        return owner, _ABSENT
    if current is None or not callable(current):
        raise PeftPatchError(
            f"boft_triton.patch_peft(): {seam.owner}.{seam.name} is missing from {seam.module} in {where}; "
            "the patch relies on it. Use boft_triton's own API (boft_triton.adapt) or a PEFT version listed here."
        )
    params = inspect.signature(current).parameters
    missing = [p for p in seam.needs_parameters if p not in params]
    if missing:
        raise PeftPatchError(
            f"boft_triton.patch_peft(): {seam.owner}.{seam.name} in {where} takes {list(params)}, "
            f"without {missing}; the patch relies on that signature. Use boft_triton.adapt or a listed PEFT version."
        )
    return owner, current


def is_patched() -> bool:
    """Whether ``patch_peft()`` is in effect."""
    return bool(_originals)


def patch_peft() -> None:
    """Make PEFT's BOFT layers compute with boft_triton's ops (see the module docstring).

    Idempotent: a second call does nothing. Every seam is checked before anything is replaced.
    """
    if _originals:
        return
    resolved = [(seam, *_resolve(seam)) for seam in SEAMS]
    for seam, owner, original in resolved:
        _originals[(owner, seam.name)] = original
        setattr(owner, seam.name, seam.replacement(original))


def unpatch_peft() -> None:
    """Put back exactly the objects ``patch_peft()`` replaced. Idempotent."""
    global _warned_dropped_factors
    while _originals:
        (owner, name), original = _originals.popitem()
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _warned_dropped_factors = False


@contextlib.contextmanager
def patched_peft():
    """``with patched_peft(): ...`` patches for the block and restores PEFT after it (if this
    block did the patching; an outer ``patch_peft()`` stays in effect)."""
    was_patched = is_patched()
    patch_peft()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_peft()
