"""The models and batches the benchmarks run on, built offline.

=============  ======  =========================================================  =================
name           device  model and batch                                            default targets
=============  ======  =========================================================  =================
minilm         CPU     packaged all-MiniLM-L6-v2 (n = 384), a batch of reviews     query,key,value
tiny-llama     CPU     Llama-shaped, hidden 256, 4 layers, random tokens           q_proj,v_proj
llama-1b       GPU     Llama-3.2-1B dims (hidden 2048, 16 layers), bf16, random    q_proj,v_proj
llama-3b       GPU     Llama-3.2-3B dims (hidden 3072, 28 layers), bf16, random    q_proj,v_proj
unet           CPU     SD-shaped UNet (64/128 channels), 32x32 latents, denoising  attention + convs
=============  ======  =========================================================  =================

``--targets qv`` adapts the query and value projections, ``all-linear`` every linear layer of the
transformer blocks (not the LM head or the classifier). Llama weights are random (built from a
config, no download): the numbers are speed and memory only, the loss is meaningless.

``--quantize nf4|fp4|int8`` turns every linear layer of the blocks into a bitsandbytes layer
(``Linear4bit`` with double quantisation, compute dtype = the workload's dtype, or ``Linear8bitLt``)
before any method is put on it, as ``BitsAndBytesConfig`` loading does (LM head, embeddings and
task heads stay as they are): QLoRA (PEFT LoRA on the 4-bit base) against QBOFT.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .training_step import Workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

LLAMA_QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM_QKV = ["query", "key", "value"]
# BERT's "dense" names the attention output, the FFN's two layers and the pooler (all n = 384 or 1536).
MINILM_ALL_LINEAR = ["query", "key", "value", "dense"]

LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256)
LLAMA_3B = dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256)
TINY_LLAMA = dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, vocab=2048)


def minilm_reviews(batch_size: int = 16, max_length: int = 128, targets=None, dtype: str = "fp32") -> Workload:
    """The default training job's setup: packaged all-MiniLM-L6-v2, a batch of real reviews,
    BOFT/LoRA on the attention projections, the classification head trained."""
    from boft_triton.cli.data import TokenizingCollate, load_reviews
    from boft_triton.cli.train import load_model, resolve_model_path

    data = load_reviews()
    tokenizer, model, _ = load_model(resolve_model_path("all-MiniLM-L6-v2"), data.label_names)
    model = model.to(DTYPES[dtype])
    # The longest reviews first, so the batch is max_length tokens wide (reviews are long enough).
    order = sorted(range(len(data.train_texts)), key=lambda i: -len(data.train_texts[i]))
    pairs = [(data.train_texts[i], data.train_labels[i]) for i in order[:batch_size]]
    batch = TokenizingCollate(tokenizer, max_length)(pairs)
    return Workload("minilm", model, batch, list(targets or MINILM_QKV), ["classifier"],
                    batch_size=batch_size, seq_len=int(batch["input_ids"].shape[1]), dtype=dtype,
                    description="all-MiniLM-L6-v2 (packaged), Amazon fine-food reviews, classification head")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
          batch_size: int, seq_len: int, targets: list[str], name: str, dtype: str = "fp32",
          init_device="cpu") -> Workload:
    """A Llama-shaped causal LM from a config (random weights: speed and memory only). The weights
    are drawn on ``init_device`` (a 1B model's random init takes a minute on CPUs, a moment on a
    GPU), then the model is kept on the CPU like every workload's: each method copies it and
    moves the copy where it runs, so the GPU holds one model at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=max(seq_len, 128), tie_word_embeddings=True)
    torch.manual_seed(0)
    with _default_dtype(DTYPES[dtype]), torch.device(init_device):  # in its dtype: no fp32 copy of a 3B model
        model = LlamaForCausalLM(config).to("cpu")
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    return Workload(name, model, {"input_ids": ids, "labels": ids.clone()}, list(targets), [],
                    batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                    description=f"Llama-shaped causal LM, hidden {hidden}, {layers} layers, random weights and tokens")


def tiny_llama(batch_size: int = 4, seq_len: int = 128, targets=None, dtype: str = "fp32", init_device="cpu") -> Workload:
    return llama(**TINY_LLAMA, batch_size=batch_size, seq_len=seq_len, targets=list(targets or LLAMA_QV),
                 name="tiny-llama", dtype=dtype, init_device=init_device)


def llama_1b(batch_size: int = 4, seq_len: int = 2048, targets=None, dtype: str = "bf16", init_device="cpu") -> Workload:
    return llama(**LLAMA_1B, batch_size=batch_size, seq_len=seq_len, targets=list(targets or LLAMA_QV),
                 name="llama-1b", dtype=dtype, init_device=init_device)


def llama_3b(batch_size: int = 2, seq_len: int = 1024, targets=None, dtype: str = "bf16", init_device="cpu") -> Workload:
    return llama(**LLAMA_3B, batch_size=batch_size, seq_len=seq_len, targets=list(targets or LLAMA_QV),
                 name="llama-3b", dtype=dtype, init_device=init_device)


# Stable-Diffusion-shaped UNet, small enough for a CPU step: attention and ResNet convs
UNET_ATTENTION_AND_CONVS = ["to_q", "to_k", "to_v", "conv1", "conv2", "proj_in", "proj_out"]
UNET_SMALL = dict(block_out_channels=(64, 128), cross_attention_dim=64, text_tokens=8)


class DenoisingLoss(torch.nn.Module):
    """A UNet and the loss diffusion finetuning (DreamBooth) trains: the MSE between the noise
    added to the latents and the noise the UNet predicts. ``forward(**batch).loss``, like a
    transformers model, so every benchmark method runs on it unchanged."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.input_requires_grad = False

    def enable_input_require_grads(self) -> None:
        """As transformers models have it: the floor (nothing trainable) still runs the whole
        backward through the frozen UNet, as every adapter's step does."""
        self.input_requires_grad = True

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, noise):
        from types import SimpleNamespace

        if self.input_requires_grad:
            noisy_latents = noisy_latents.detach().requires_grad_(True)
        pred = self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(pred.float(), noise.float()))


def unet(batch_size: int = 4, seq_len: int = 32 * 32, targets=None, dtype: str = "fp32", init_device="cpu") -> Workload:
    """A small SD-shaped ``UNet2DConditionModel`` (64/128 channels, cross-attention on 8 text
    tokens), random weights; a batch of noised latents (``seq_len`` = latent pixels, a square)
    at random timesteps, the denoising loss. Needs diffusers."""
    from diffusers import UNet2DConditionModel

    side = int(round(seq_len ** 0.5))
    if side * side != seq_len or side % 4:
        raise ValueError(f"unet: --seq-len is the latent pixel count, a square of a multiple of 4 (e.g. 1024), got {seq_len}")
    torch.manual_seed(0)
    with _default_dtype(DTYPES[dtype]), torch.device(init_device):
        model = UNet2DConditionModel(
            sample_size=side, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=UNET_SMALL["block_out_channels"], down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=UNET_SMALL["cross_attention_dim"],
            attention_head_dim=8, norm_num_groups=32,
        ).to("cpu")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch_size, 4, side, side, generator=g)
    batch = {"noisy_latents": torch.randn(batch_size, 4, side, side, generator=g) + noise,
             "timesteps": torch.randint(0, 1000, (batch_size,), generator=g),
             "encoder_hidden_states": torch.randn(batch_size, UNET_SMALL["text_tokens"], UNET_SMALL["cross_attention_dim"],
                                                  generator=g),
             "noise": noise}
    batch = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in batch.items()}
    return Workload("unet", DenoisingLoss(model), batch, list(targets or UNET_ATTENTION_AND_CONVS), [],
                    batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                    description=f"UNet2DConditionModel, {UNET_SMALL['block_out_channels']} channels, random weights; "
                                f"{side}x{side} latents, denoising MSE")


QUANTIZE = ("nf4", "fp4", "int8")


def _bnb_linear(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype, device) -> torch.nn.Module:
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        q.load_state_dict(linear.state_dict())
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                              quant_type=kind, compress_statistics=True)
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=kind,
                                     compress_statistics=True)
        if has_bias:
            q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes when the layer is moved (on that device)


def quantize(work: Workload, kind: str, device="cpu") -> Workload:
    """Replace the linear layers of ``work.model`` (not ``lm_head`` nor the task heads) by
    bitsandbytes layers of ``kind``, quantized on ``device`` (where they then live), in place;
    the workload's name gets ``-<kind>``."""
    if kind not in QUANTIZE:
        raise ValueError(f"unknown quantization {kind!r}; choose from {QUANTIZE}")
    keep = {"lm_head", *work.heads}
    compute_dtype = DTYPES[work.dtype]
    for name, module in list(work.model.named_modules()):
        if type(module) is torch.nn.Linear and not set(name.split(".")) & keep:
            parent_name, _, child = name.rpartition(".")
            setattr(work.model.get_submodule(parent_name), child, _bnb_linear(module, kind, compute_dtype, device))
    detail = "8-bit (LLM.int8)" if kind == "int8" else f"4-bit {kind.upper()} + double quantisation"
    work.name = f"{work.name}-{kind}"
    work.description += f"; block linears in bitsandbytes {detail}, compute {work.dtype}"
    work.quantization = kind
    return work


@dataclass(frozen=True)
class WorkloadSpec:
    build: Callable[..., Workload]
    batch_size: int
    seq_len: int
    dtype: str
    device: str  # where it is meant to run: cpu | cuda
    targets: dict = field(default_factory=dict)  # preset name -> module names
    random_init: bool = False  # random weights, drawn on the run's device (fast on a GPU)


WORKLOADS = {
    "minilm": WorkloadSpec(minilm_reviews, 16, 128, "fp32", "cpu",
                           {"default": MINILM_QKV, "qv": ["query", "value"], "all-linear": MINILM_ALL_LINEAR}),
    "tiny-llama": WorkloadSpec(tiny_llama, 4, 128, "fp32", "cpu",
                               {"default": LLAMA_QV, "qv": LLAMA_QV, "all-linear": ALL_LINEAR}, random_init=True),
    "llama-1b": WorkloadSpec(llama_1b, 4, 2048, "bf16", "cuda",
                             {"default": LLAMA_QV, "qv": LLAMA_QV, "all-linear": ALL_LINEAR}, random_init=True),
    "unet": WorkloadSpec(unet, 4, 32 * 32, "fp32", "cpu",
                         {"default": UNET_ATTENTION_AND_CONVS, "qv": ["to_q", "to_v"]}, random_init=True),
    "llama-3b": WorkloadSpec(llama_3b, 2, 1024, "bf16", "cuda",
                             {"default": LLAMA_QV, "qv": LLAMA_QV, "all-linear": ALL_LINEAR}, random_init=True),
}


def build(name: str, batch_size: int | None = None, seq_len: int | None = None, targets: str = "default",
          dtype: str | None = None, quantization: str | None = None, device="cpu") -> Workload:
    """Workload ``name`` with its defaults for whatever is None; ``targets`` is a preset name;
    ``quantization`` (nf4 / fp4 / int8) puts the base's linear layers in bitsandbytes, quantized
    on ``device`` (a GPU quantizes a 1B model in a moment, a CPU takes a while)."""
    spec = WORKLOADS[name]
    if targets not in spec.targets:
        raise ValueError(f"unknown targets preset {targets!r} for {name}; choose from {sorted(spec.targets)}")
    init = {"init_device": device} if spec.random_init else {}
    work = spec.build(batch_size or spec.batch_size, seq_len or spec.seq_len, spec.targets[targets],
                      dtype or spec.dtype, **init)
    work.targets_preset = targets
    return quantize(work, quantization, device) if quantization else work
