"""bitsandbytes bases (QBOFT): 4-bit NF4/FP4 with and without double quantisation, 8-bit.

The oracle is the same adapter on a plain ``nn.Linear`` holding the weight the quantized layer
really multiplies by (its dequantized weight): BOFT rotates the activations and calls the base,
so the two must agree to the precision of the compute dtype, gradients included.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from boft_triton import BOFTConfig, BOFTModel, adapt
from boft_triton.quantized import is_4bit, is_quantized
from tiny_models import rel_err

bnb = pytest.importorskip("bitsandbytes")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


class Holder(nn.Module):
    """``first`` (plain) then ``proj`` (the layer under test): adapters on both."""

    def __init__(self, proj: nn.Module, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # the same plain layer in every Holder
        self.first = nn.Linear(proj.in_features, proj.in_features)
        self.proj = proj

    def forward(self, x):
        return self.proj(self.first(x))


def linear_4bit(plain: nn.Linear, quant_type: str, double_quant: bool, compute_dtype) -> nn.Module:
    q = bnb.nn.Linear4bit(plain.in_features, plain.out_features, bias=plain.bias is not None,
                          compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(plain.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant)
    if plain.bias is not None:
        q.bias = nn.Parameter(plain.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def linear_8bit(plain: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear8bitLt(plain.in_features, plain.out_features, bias=plain.bias is not None,
                            has_fp16_weights=False)
    q.load_state_dict(plain.state_dict())
    return q.to("cpu")  # quantizes


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The ``out x in`` weight a bitsandbytes layer multiplies by, in fp32 (read before any eval-mode
    forward: bitsandbytes repacks 4-bit weights for its CPU kernel there)."""
    import bitsandbytes.functional as F

    weight = module.weight
    if is_4bit(module):
        return F.dequantize_4bit(weight.data, weight.quant_state).float()
    return F.int8_vectorwise_dequant(weight.CB, weight.SCB).float()


def dequantized_linear(q: nn.Module, dtype) -> nn.Linear:
    plain = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(dequantized_weight(q))
        if q.bias is not None:
            plain.bias.copy_(q.bias)
    return plain


def copy_adapter(dst: nn.Module, src: nn.Module) -> None:
    """Give ``dst`` the adapter tensors (and modules_to_save copies) of ``src``; base weights stay."""
    state = {k: v for k, v in src.state_dict().items() if "boft_" in k or "modules_to_save" in k}
    assert state
    missing, unexpected = dst.load_state_dict(state, strict=False)
    assert not unexpected


def run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def assert_same_adapted_model(quant_model, plain_model, x, tol):
    copy_adapter(quant_model, plain_model)
    yq, dxq, gq = run(quant_model, x)
    yp, dxp, gp = run(plain_model, x)
    assert rel_err(yq, yp) <= tol
    assert rel_err(dxq, dxp) <= tol
    assert gq.keys() == gp.keys() and any("boft_R" in k for k in gq)
    for name in gp:
        assert rel_err(gq[name], gp[name]) <= tol, name


CONFIG = dict(target_modules=["first", "proj"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_base_equals_the_adapter_on_its_dequantized_weight(quant_type, double_quant, compute_dtype):
    plain = nn.Linear(32, 24)
    q = linear_4bit(plain, quant_type, double_quant, compute_dtype)
    quant_model = adapt(Holder(q), BOFTConfig(**CONFIG))
    plain_model = adapt(Holder(dequantized_linear(q, compute_dtype)), BOFTConfig(**CONFIG))
    assert isinstance(quant_model.model.proj.base_layer, bnb.nn.Linear4bit)
    assert_same_adapted_model(quant_model, plain_model, torch.randn(2, 5, 32), TOL[compute_dtype])


def test_8bit_base_equals_the_adapter_on_its_dequantized_weight():
    q = linear_8bit(nn.Linear(32, 24))
    quant_model = adapt(Holder(q), BOFTConfig(**CONFIG))
    plain_model = adapt(Holder(dequantized_linear(q, torch.float32)), BOFTConfig(**CONFIG))
    assert isinstance(quant_model.model.proj.base_layer, bnb.nn.Linear8bitLt)
    assert_same_adapted_model(quant_model, plain_model, torch.randn(2, 5, 32), 1e-5)


def test_adapter_dtype_follows_the_compute_dtype_of_a_4bit_base():
    """``autocast_adapter_dtype=False``: the adapter takes the base's dtype, which for a 4-bit layer
    is its compute dtype (its weight is stored as uint8)."""
    q = linear_4bit(nn.Linear(32, 24), "nf4", False, torch.bfloat16)
    model = adapt(Holder(q), BOFTConfig(**CONFIG), autocast_adapter_dtype=False)
    assert model.model.proj.boft_R["default"].dtype == torch.bfloat16
    assert model.model.proj.boft_s["default"].dtype == torch.bfloat16


# -- a model loaded with BitsAndBytesConfig -----------------------------------------------------

LLAMA_CONFIG = dict(target_modules=["q_proj", "v_proj", "down_proj"], boft_block_size=4, boft_n_butterfly_factor=2,
                    modules_to_save=["lm_head"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    # Every width a multiple of 32: in eval mode without grad, bitsandbytes repacks 4-bit weights
    # for its CPU kernel, which needs out_features % 32 == 0.
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(path, kind: str):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if kind == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=True)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=qc, device_map="cpu")


def dequantized_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every bitsandbytes layer replaced by its dequantized fp32 Linear."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if is_quantized(module):
            parent_name, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent_name), child, dequantized_linear(module, torch.float32))
    return plain


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_llama_trains_like_its_dequantized_twin_and_round_trips(llama_dir, tmp_path, kind):
    base = load_quantized(llama_dir, kind)
    twin = dequantized_model(base)
    model = adapt(base, BOFTConfig(init_weights=False, **LLAMA_CONFIG))
    plain = adapt(twin, BOFTConfig(init_weights=False, **LLAMA_CONFIG))
    copy_adapter(plain, model)
    model.train()
    plain.train()

    attn = model.model.model.layers[0].self_attn
    assert is_quantized(attn.q_proj.base_layer) and is_quantized(attn.v_proj.base_layer)
    assert not hasattr(attn.k_proj, "base_layer")  # targeting as on a plain model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad}
    assert all("boft_" in n or "modules_to_save" in n for n in trainable) and any("modules_to_save" in n for n in trainable)

    ids = torch.randint(0, 64, (2, 12))
    losses = {}
    for name, m in (("quantized", model), ("dequantized", plain)):
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = loss_of(m, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["quantized"][-1] < losses["quantized"][0]
    assert losses["quantized"] == pytest.approx(losses["dequantized"], rel=1e-5)

    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.boft_R" in keys  # PEFT's key layout
    assert "base_model.model.lm_head.weight" in keys
    model.eval()
    reloaded = BOFTModel.from_pretrained(load_quantized(llama_dir, kind), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # The same checkpoint loads onto a plain (dequantized) base, e.g. to merge there.
    on_plain = BOFTModel.from_pretrained(dequantized_model(load_quantized(llama_dir, kind)), tmp_path)
    q_proj = on_plain.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is nn.Linear
    assert torch.equal(q_proj.boft_R["default"], attn.q_proj.boft_R["default"])


# -- merging --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload", "safe_merge_and_unload", "layer.merge"])
def test_merging_into_a_quantized_base_is_refused_and_nothing_is_merged(how):
    """``first`` (plain) comes before ``proj`` (4-bit): a merge that wrote layer by layer would have
    merged ``first`` before reaching the quantized layer."""
    q = linear_4bit(nn.Linear(32, 24), "nf4", False, torch.float32)
    model = adapt(Holder(q), BOFTConfig(**CONFIG))
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = model(x)
    plain_weight = model.model.first.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="does not merge into quantized weights.*bf16 or fp32"):
        if how == "merge_adapter":
            model.merge_adapter()
        elif how == "merge_and_unload":
            model.merge_and_unload()
        elif how == "safe_merge_and_unload":
            model.merge_and_unload(safe_merge=True)
        else:
            model.model.proj.merge()
    assert not model.model.first.merged and not model.model.proj.merged
    assert torch.equal(model.model.first.base_layer.weight, plain_weight)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert isinstance(model.unload().proj, bnb.nn.Linear4bit)  # unloading without merging still works


def test_all_linear_picks_the_same_layers_on_a_quantized_model(llama_dir):
    """``target_modules="all-linear"`` must see bitsandbytes layers as the Linears they
    replace: the same modules adapted as on the plain model."""
    from transformers import LlamaForCausalLM

    config = dict(target_modules="all-linear", boft_block_size=4)
    plain = adapt(LlamaForCausalLM.from_pretrained(llama_dir), BOFTConfig(**config))
    quantized = adapt(load_quantized(llama_dir, "nf4"), BOFTConfig(**config))
    adapted = {n for n, _ in plain._boft_layers()}
    assert adapted and adapted == {n for n, _ in quantized._boft_layers()}
