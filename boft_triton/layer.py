"""BOFT adapter layers: ``nn.Linear``, transformers ``Conv1D`` and ``nn.Conv2d`` (DESIGN.md 1-2).

Each layer keeps the frozen ``base_layer`` and, per adapter, ``boft_R`` ``(N, D, b, b)`` and
``boft_s`` (PEFT's names and shapes, so state-dict keys match PEFT's). Linear and Conv1D train
input-centric: the activations are rotated (``x M``) and the frozen weight is used as it is, so no
n x n matrix and no weight copy is built per step; they call ``base_layer`` itself on the rotated
activations, so any base that behaves like a Linear works (bitsandbytes 4-/8-bit, accelerate-offloaded
layers whose hooks load the weight). Conv2d rotates its (small) weight instead.
All the maths goes through ``boft_triton.ops``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import deepspeed_support as zero
from . import mixed_batch, offload, ops, quantized
from .config import BOFTConfig
from .geometry import resolve_geometry
from .inference_memo import memoised

try:  # transformers' Conv1D (GPT-2): weight stored as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None


@torch.library.custom_op("boft_triton::dropout_mask", mutates_args=())
def dropout_mask(R: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout for ``R`` ``(N, D, b, b)``: a bool ``(N, D)`` mask on R's device
    in which, in one random factor, ``int(p*D)`` random blocks are True (they become I).

    Draws from the CPU generator in PEFT's order (``randint`` then ``randperm``), so a seeded run
    drops the same blocks as PEFT. It is a custom op so that ``torch.compile`` keeps it as one
    opaque call (no graph break) instead of tracing the draws: inductor would otherwise replace
    them with its own random stream (different blocks than eager and PEFT). R, read only for its
    shape and device, also keeps two layers' calls apart so that no pass merges them into one draw.
    """
    n_factors, block_num = R.shape[0], R.shape[1]
    chosen = torch.randint(0, n_factors, (1,))
    # PEFT shuffles ``[1]*n_drop + [0]*(D-n_drop)`` with ``randperm(D)``: block i is dropped iff
    # ``perm[i] < n_drop``; the same draw, without indexing.
    row = torch.randperm(block_num) < int(p * block_num)
    mask = (torch.arange(n_factors) == chosen).unsqueeze(1) & row
    return mask.to(R.device, non_blocking=True)  # a fresh host tensor: no need to wait for the GPU


@dropout_mask.register_fake
def _(R: torch.Tensor, p: float) -> torch.Tensor:
    return R.new_empty(R.shape[:2], dtype=torch.bool)


class BOFTLayer(nn.Module):
    """Common adapter bookkeeping; subclasses say how the weight reads as ``o x n`` and how to run."""

    # PEFT's BaseTunerLayer attributes, kept for code that introspects tuner layers.
    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.mixed_adapter_names: list[str] | None = None  # set inside a mixed-adapter batch call

    # -- weight views ---------------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def base_dtype(self) -> torch.dtype:
        """The floating dtype the base computes in (a quantized weight's storage dtype is not it)."""
        if quantized.is_quantized(self.base_layer):
            return quantized.compute_dtype(self.base_layer)
        return self.weight.dtype

    def check_mergeable(self, layer_name: str = "layer") -> None:
        """Raise before anything is merged when this base cannot take a merged weight."""
        if quantized.is_quantized(self.base_layer):
            raise ValueError(quantized.merge_refusal(layer_name, self.base_layer))
        if offload.is_offloaded(self.base_layer):
            raise ValueError(
                f"{layer_name}: the base layer is offloaded by accelerate (its weight is on the meta device); "
                "nothing was merged. Load the base model without offloading, load the adapter with "
                "BOFTModel.from_pretrained, and merge there."
            )

    def weight_o_n(self) -> torch.Tensor:
        """The base weight as an ``o x n`` matrix (a view where possible)."""
        raise NotImplementedError

    def set_weight_o_n(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    def scale_shape(self) -> tuple[int, int]:
        return (self.out_features, 1)

    # -- adapters -------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, adapter_name: str, config: BOFTConfig, layer_name: str = "layer") -> None:
        geo = resolve_geometry(
            self.in_features,
            config.boft_block_size,
            config.boft_block_num,
            config.boft_n_butterfly_factor,
            layer_name,
        )
        device = offload.module_device(self.base_layer)  # offloaded bases: where their hook runs them
        R = torch.zeros(geo.n_factors, geo.block_num, geo.block_size, geo.block_size, device=device)
        s = torch.ones(self.scale_shape(), device=device)
        if not config.init_weights:
            nn.init.normal_(R, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(R)
        self.boft_s[adapter_name] = nn.Parameter(s)
        self.boft_block_size[adapter_name] = geo.block_size
        self.boft_block_num[adapter_name] = geo.block_num
        self.boft_dropout[adapter_name] = config.boft_dropout

    def reshape_adapter(self, adapter_name: str, n_factors: int) -> None:
        """Give an adapter ``n_factors`` factors (a checkpoint saved by PEFT without its CUDA
        extension holds N=1 whatever its config says)."""
        old = self.boft_R[adapter_name]
        shape = (n_factors, *old.shape[1:])
        self.boft_R[adapter_name] = nn.Parameter(
            torch.zeros(shape, device=old.device, dtype=old.dtype), requires_grad=old.requires_grad
        )

    def delete_adapter(self, adapter_name: str) -> None:
        for store in (self.boft_R, self.boft_s, self.boft_block_size, self.boft_block_num, self.boft_dropout):
            if adapter_name in store:
                del store[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_names: list[str], trainable: bool = True) -> None:
        self.active_adapters = [a for a in adapter_names if a in self.boft_R]
        for name in self.boft_R:
            on = trainable and name in self.active_adapters
            self.boft_R[name].requires_grad_(on)
            self.boft_s[name].requires_grad_(on)

    # -- rotations ------------------------------------------------------------------------------

    def _q(self, adapter: str, with_dropout: bool) -> torch.Tensor:
        R = self.boft_R[adapter]
        if R.is_meta:
            raise RuntimeError(
                "This adapter's parameters are on the meta device: accelerate offloaded them (dispatch_model, "
                "cpu_offload or disk_offload applied to the adapted model). Offload or dispatch the base model "
                "first, then adapt() it: the adapter's parameters are created where each base layer computes and "
                "must stay there to train."
            )
        p = self.boft_dropout.get(adapter, 0.0)
        mask = None
        if with_dropout and self.training and p > 0:
            mask = dropout_mask(R.detach(), p)
        if mask is None:  # inference (decoding): solved once per value of R
            return memoised("cayley", (R,), lambda: ops.cayley(R))
        return ops.cayley(R, mask)

    def _scale(self, adapters: list[str]) -> torch.Tensor:
        s = self.boft_s[adapters[0]].reshape(-1)
        for a in adapters[1:]:
            s = s * self.boft_s[a].reshape(-1)
        return s

    # -- merging (weight-centric: the butterfly applied to the rows of W) -----------------------

    def merged_weight(self, adapter_names: list[str], safe_merge: bool = False) -> torch.Tensor:
        """``o x n`` weight with these adapters merged in turn, ``W' = diag(s) W M^T``; pure."""
        w = self.weight_o_n().float()
        for adapter in adapter_names:
            Q = self._q(adapter, with_dropout=False)
            w = ops.butterfly(w, Q, transpose=True) * self.boft_s[adapter].reshape(-1, 1).float()
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(
                    f"NaNs or infs detected in the merged weights of adapter {adapter!r}: the adapter seems to be "
                    "broken (non-finite boft_R or boft_s). Nothing was merged; fix or retrain the adapter."
                )
        return w

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = self.adapters_to_merge(adapter_names)
        if adapter_names:
            self.check_mergeable()
            self.commit_merge(self.merged_weight(adapter_names, safe_merge), adapter_names)

    def adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = self.active_adapters if adapter_names is None else [a for a in adapter_names if a in self.boft_R]
        already = [a for a in names if a in self.merged_adapters]
        if already:
            warnings.warn(f"Already merged adapters {already}; merging only the others.", stacklevel=3)
        return [a for a in names if a not in self.merged_adapters]

    def commit_merge(self, weight_o_n: torch.Tensor, adapter_names: list[str]) -> None:
        self.set_weight_o_n(weight_o_n)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """``W = diag(1/s) W' M`` for each merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        w = self.weight_o_n().float()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            Q = self._q(adapter, with_dropout=False)
            w = ops.butterfly(w / self.boft_s[adapter].reshape(-1, 1).float(), Q, transpose=False)
        self.set_weight_o_n(w)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        mixed = getattr(self, "mixed_adapter_names", None)
        if mixed is not None:  # one adapter per sample (BOFTModel checked the names)
            return self.mixed_forward(x, mixed, *args, **kwargs)
        adapters = self.active_adapters  # set_adapter keeps only adapters this layer has
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, adapters, *args, **kwargs)

    def adapted_forward(self, x, adapters, *args, **kwargs):
        raise NotImplementedError

    def mixed_forward(self, x, adapter_names: list[str], *args, **kwargs):
        """Each sample (first dim of x) with its own adapter: ``adapter_names[i]`` for sample i,
        ``"__base__"`` (or an adapter that does not adapt this layer) for the base alone."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return "boft." + super().__repr__()


class Linear(BOFTLayer):
    """BOFT on ``nn.Linear`` or transformers ``Conv1D`` (``fan_in_fan_out``), input-centric."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BOFTConfig, layer_name: str = "layer"):
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        if self.fan_in_fan_out:  # ZeRO-3 partitions the weight: its shape is ds_shape, not gathered
            n, o = zero.full_shape(base_layer.weight)
        else:  # from the layer, not its weight: a 4-bit weight is stored packed
            n, o = base_layer.in_features, base_layer.out_features
        super().__init__(base_layer, n, o)
        self.update_layer(adapter_name, config, layer_name)

    def weight_o_n(self) -> torch.Tensor:
        w = self.weight
        return w.T if self.fan_in_fan_out else w

    def set_weight_o_n(self, w: torch.Tensor) -> None:
        target = self.weight
        w = w.T if self.fan_in_fan_out else w
        with torch.no_grad():
            target.copy_(w.to(target.dtype))

    def adapted_forward(self, x, adapters, *args, **kwargs):
        previous_dtype = x.dtype
        # Draw the dropout masks in adapter order (PEFT's RNG order), then apply them reversed:
        # adapters compose as M = M_last ... M_first, so x M applies the last adapter's M first.
        rotations = [self._q(adapter, with_dropout=True) for adapter in adapters]
        h = x
        for Q in reversed(rotations):
            h = ops.butterfly(h, Q)
        if not quantized.is_quantized(self.base_layer) and not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.weight.dtype)  # bitsandbytes layers cast to their compute dtype themselves
        # The base layer itself runs (its hooks too: offload, device maps), bias included.
        out = self.base_layer(h, *args, **kwargs)
        return self._scaled(out, self._scale(adapters)).to(previous_dtype)

    def _scaled(self, out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The output scale leaves the bias unscaled: y = (out - b) s + b, written as
        out + (out - b)(s - 1) so that s = 1 returns the base output bit for bit and rounding in
        (out - b) is damped by s - 1. The fp32 scale promotes the product (as in PEFT): rounding s
        to bf16 first would erase any change of s below 2^-8, freezing it in low-precision training."""
        # ZeRO-3 released the bias with the base layer's forward (unless it is small enough to
        # persist): gathered again here, a copy of one bias; every rank runs this forward alike
        bias = zero.whole(offload.module_tensor(self.base_layer, "bias"))
        return out * s if bias is None else torch.addcmul(out, out - bias, s - 1)

    def mixed_forward(self, x, adapter_names, *args, **kwargs):
        # Input-centric: each sample rotated with its adapter's butterfly (one segmented launch for
        # the whole batch), then one base call for every row; the output scale per row.
        previous_dtype = x.dtype
        h = mixed_batch.rotate_per_sample(
            x, adapter_names, lambda name: self._q(name, with_dropout=False) if name in self.boft_R else None)
        if not quantized.is_quantized(self.base_layer) and not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.weight.dtype)
        out = self.base_layer(h, *args, **kwargs)
        s = mixed_batch.row_scales(out, adapter_names, self.boft_s, torch.float32)
        return self._scaled(out, s).to(previous_dtype)


class Conv2d(BOFTLayer):
    """BOFT on ``nn.Conv2d`` (groups=1): the weight is rotated, then the base conv runs with it."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config: BOFTConfig, layer_name: str = "layer"):
        if base_layer.groups != 1:
            raise ValueError(
                f"{layer_name}: BOFT supports Conv2d with groups=1 only (this one has groups={base_layer.groups}); "
                "exclude it with exclude_modules or target other layers."
            )
        o, c, kh, kw = zero.full_shape(base_layer.weight)
        super().__init__(base_layer, c * kh * kw, o)
        self.update_layer(adapter_name, config, layer_name)

    def scale_shape(self) -> tuple[int, int]:
        return (1, self.out_features)

    def weight_o_n(self) -> torch.Tensor:
        return self.weight.reshape(self.out_features, self.in_features)

    def set_weight_o_n(self, w: torch.Tensor) -> None:
        target = self.weight
        with torch.no_grad():
            target.copy_(w.reshape(target.shape).to(target.dtype))

    def adapted_forward(self, x, adapters, *args, **kwargs):
        previous_dtype = x.dtype
        base = self.base_layer
        # ZeRO-3: the weight is read outside the base's forward, so it is gathered (a copy) here
        w = zero.whole(base.weight).reshape(self.out_features, self.in_features)
        # W rotation^T with rotation = M_last ... M_first: apply the first adapter's M^T first.
        for adapter in adapters:
            w = ops.butterfly(w, self._q(adapter, with_dropout=True), transpose=True)
        w = (w * self._scale(adapters).reshape(-1, 1)).to(base.weight.dtype)  # scale in fp32, then the base dtype
        out = base._conv_forward(x.to(w.dtype), w.reshape(zero.full_shape(base.weight)), zero.whole(base.bias))
        return out.to(previous_dtype)

    def mixed_forward(self, x, adapter_names, *args, **kwargs):
        # Weight-centric: one conv per adapter group with that adapter's rotated weight.
        def conv(name, rows):
            if name in self.boft_R:
                return self.adapted_forward(rows, [name])
            return self.base_layer(rows, *args, **kwargs)

        return mixed_batch.per_group(x, adapter_names, conv)


def supported_layer_class(module: nn.Module) -> type[BOFTLayer] | None:
    if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
        return Linear
    if isinstance(module, nn.Conv2d):
        return Conv2d
    return None
