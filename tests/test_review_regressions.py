"""Regressions for behaviours a review found wrong: each test fails on the code before the fix."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from boft_triton import BOFTConfig, BOFTModel, adapt
from tiny_models import build, call, rel_err

peft = pytest.importorskip("peft")


def test_small_scale_changes_survive_a_bf16_base():
    """fp32 boft_s on a bf16 base: s = 1.003 must scale the output on average. Rounding s to
    bf16 first (the bug) makes it exactly 1, so every output would stay unchanged."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 256, bias=False)).to(torch.bfloat16)
    model = adapt(layer, BOFTConfig(target_modules=["0"], boft_block_size=4))
    assert model.model[0].boft_s["default"].dtype == torch.float32
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        at_one = model(x).float()
        model.model[0].boft_s["default"].fill_(1.003)
        scaled = model(x).float()
    assert model(x).dtype == torch.bfloat16
    assert (scaled.abs().sum() / at_one.abs().sum()).item() == pytest.approx(1.003, abs=3e-4)


def test_two_adapters_with_dropout_draw_like_peft(tmp_path, peft_with_butterfly):
    kwargs = {"target_modules": ["lin0"], "boft_block_size": 2, "boft_n_butterfly_factor": 2, "boft_dropout": 0.5}
    base, inputs = build("MLP2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(init_weights=False, **kwargs))
        theirs.add_adapter("other", peft.BOFTConfig(init_weights=False, **kwargs))
    theirs.save_pretrained(tmp_path)
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours.load_adapter(tmp_path / "other", "other", is_trainable=True)
    theirs.base_model.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    theirs.train(), ours.train()
    torch.manual_seed(3)
    expected = call(theirs, inputs)
    torch.manual_seed(3)
    assert rel_err(call(ours, inputs), expected) < 1e-5


def test_bias_all_with_modules_to_save_has_peft_keys_both_ways(tmp_path):
    base, inputs = build("MLP")
    kwargs = {"target_modules": ["lin0"], "boft_block_size": 2, "bias": "all", "modules_to_save": ["lin1"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(init_weights=False, **kwargs))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = adapt(copy.deepcopy(base), BOFTConfig(init_weights=False, **kwargs))
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ignored keys" warning: every PEFT key has its place
        loaded = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    assert rel_err(call(loaded, inputs), call(theirs.eval(), inputs)) < 1e-5


def test_adapter_added_while_disabled_stays_disabled():
    base, inputs = build("MLP2")
    reference = call(base, inputs)
    model = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2, init_weights=False))
    model.disable_adapter_layers()
    model.add_adapter("other", BOFTConfig(target_modules=["lin1"], boft_block_size=2, init_weights=False,
                                          modules_to_save=["relu"]))
    model.set_adapter(["default", "other"])
    assert rel_err(call(model, inputs), reference) < 1e-6
    model.enable_adapter_layers()
    assert rel_err(call(model, inputs), reference) > 1e-3


def test_adding_an_adapter_keeps_the_active_adapters_biases_trainable():
    base, _ = build("MLP")
    model = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2, bias="all"))
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    model.add_adapter("frozen", BOFTConfig(target_modules=["lin0"], boft_block_size=2, inference_mode=True))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    assert "model.lin1.bias" in before


def test_checkpoint_cannot_overwrite_frozen_base_weights(tmp_path):
    base, inputs = build("MLP")
    model = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    model.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    state = load_file(tmp_path / "adapter_model.safetensors")
    state["base_model.model.lin1.weight"] = torch.full((2, 20), 7.0)  # not something this config trains
    save_file(state, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="lin1.weight"):
        loaded = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded.model.lin1.weight, base.lin1.weight)
