"""Contract tests over PEFT's BOFT config matrix plus GPT-2 (Conv1D), Llama and Dinov2."""

import copy

import pytest
import torch

from boft_triton import BOFTConfig, BOFTLayer, BOFTModel, adapt
from tiny_models import CONFIG_MATRIX, build, call, rel_err

IDS = [case[0] for case in CONFIG_MATRIX]


def _adapt(model_name, kwargs, init_weights=False, seed=0):
    base, inputs = build(model_name, seed)
    reference = call(base, inputs).detach()
    model = adapt(copy.deepcopy(base), BOFTConfig(init_weights=init_weights, **kwargs)).eval()
    return base, model, inputs, reference


def _perturb_trainable(model):
    """Move every trainable non-adapter tensor (biases, modules_to_save) off its initial value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "boft_" not in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in CONFIG_MATRIX], ids=IDS)
def test_identity_at_init(model_name, kwargs):
    _, model, inputs, reference = _adapt(model_name, kwargs, init_weights=True)
    assert rel_err(call(model, inputs), reference) < 1e-6


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in CONFIG_MATRIX], ids=IDS)
def test_merge_unmerge_disable(model_name, kwargs):
    base, model, inputs, reference = _adapt(model_name, kwargs)
    adapted = call(model, inputs).detach()
    assert rel_err(adapted, reference) > 1e-3, "a random adapter must change the output"

    with model.disable_adapter():
        assert rel_err(call(model, inputs), reference) < 1e-6

    model.merge_adapter()
    assert rel_err(call(model, inputs), adapted) < 1e-5
    model.unmerge_adapter()
    base_weights = {n: p for n, p in base.named_parameters()}
    for name, layer in model.model.named_modules():
        if isinstance(layer, BOFTLayer):
            assert rel_err(layer.base_layer.weight, base_weights[f"{name}.weight"]) < 1e-5
    assert rel_err(call(model, inputs), adapted) < 1e-5

    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, BOFTLayer) for m in merged.modules())
    assert rel_err(call(merged, inputs), adapted) < 1e-5
    unloaded = model.unload()
    assert rel_err(call(unloaded, inputs), reference) < 1e-6


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in CONFIG_MATRIX], ids=IDS)
def test_two_adapters_alone_composed_and_merged(model_name, kwargs):
    _, model, inputs, reference = _adapt(model_name, kwargs)
    out_a = call(model, inputs).detach()
    model.add_adapter("other", BOFTConfig(init_weights=False, **kwargs))
    assert rel_err(call(model, inputs), out_a) < 1e-7, "adding an adapter must not activate it"

    model.set_adapter("other")
    out_b = call(model, inputs).detach()
    assert rel_err(out_b, out_a) > 1e-3

    model.set_adapter(["default", "other"])
    composed = call(model, inputs).detach()
    assert rel_err(composed, out_a) > 1e-3 and rel_err(composed, out_b) > 1e-3

    # merging a subset, then the rest, gives the composed model
    model.merge_adapter(["default"])
    model.merge_adapter(["other"])
    assert rel_err(call(model, inputs), composed) < 1e-5
    model.unmerge_adapter()

    merged_subset = copy.deepcopy(model).merge_and_unload(adapter_names=["other"])
    assert rel_err(call(merged_subset, inputs), out_b) < 1e-5

    model.set_adapter("default")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert all("other" not in layer.boft_R for layer in model.modules() if isinstance(layer, BOFTLayer))
    assert rel_err(call(model, inputs), out_a) < 1e-6


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in CONFIG_MATRIX], ids=IDS)
def test_training_changes_only_adapter_parameters(model_name, kwargs):
    _, model, inputs, _ = _adapt(model_name, kwargs)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = ("boft_R", "boft_s", "modules_to_save")
    bias_trainable = kwargs.get("bias", "none") != "none"
    for name in trainable:
        assert any(a in name for a in allowed) or (bias_trainable and name.endswith("bias")), name
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        out = call(model, inputs)
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        if name in trainable and "boft_R" in name:
            assert changed, f"{name} did not train"
        if name not in trainable:
            assert not changed, f"frozen {name} changed"


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in CONFIG_MATRIX], ids=IDS)
def test_save_load_round_trip(model_name, kwargs, tmp_path):
    base, model, inputs, _ = _adapt(model_name, kwargs)
    _perturb_trainable(model)
    expected = call(model, inputs).detach()
    model.save_pretrained(tmp_path)
    loaded = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert rel_err(call(loaded, inputs), expected) < 1e-6
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "boft_R" in n)


@pytest.mark.parametrize("bias", ["none", "all", "boft_only"])
def test_bias_modes(bias, tmp_path):
    base, inputs = build("MLP")
    model = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2, bias=bias))
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    expected = {"none": set(), "all": {"model.lin0.base_layer.bias", "model.lin1.bias"},
                "boft_only": {"model.lin0.base_layer.bias"}}[bias]
    assert trainable_biases == expected
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {k.removeprefix("base_model.") for k in keys if k.endswith("bias")} == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in CONFIG_MATRIX if c[1] in ("MLP2", "Llama", "Conv2d2")],
                         ids=[c[0] for c in CONFIG_MATRIX if c[1] in ("MLP2", "Llama", "Conv2d2")])
def test_low_precision_forward(model_name, kwargs, dtype):
    _, model, inputs, _ = _adapt(model_name, kwargs)
    expected = call(model, inputs).detach()
    model.to(dtype)
    cast = {k: v for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(t.to(dtype) for t in inputs)
    out = call(model, cast)
    assert out.dtype == dtype
    assert rel_err(out, expected) < 2e-2
