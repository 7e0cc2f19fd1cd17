"""Merging: several active adapters without names, train mode with dropout, bf16 precision; and
``save_pretrained(selected_adapters=...)`` as PEFT does it."""

import copy

import pytest
import torch

from boft_triton import BOFTConfig, BOFTLayer, BOFTModel, adapt
from tiny_models import CONFIG_MATRIX, build, call, rel_err

IDS = [case[0] for case in CONFIG_MATRIX]
LOW_PRECISION_CASES = [c for c in CONFIG_MATRIX if c[1] in ("MLP2", "Llama", "Conv2d2")]


def _adapted(model_name, kwargs):
    base, inputs = build(model_name)
    return base, adapt(copy.deepcopy(base), BOFTConfig(init_weights=False, **kwargs)).eval(), inputs


def _base_weights(model):
    return {name: layer.base_layer.weight.detach().clone()
            for name, layer in model.model.named_modules() if isinstance(layer, BOFTLayer)}


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in CONFIG_MATRIX], ids=IDS)
def test_merging_all_active_adapters_without_names_gives_the_composed_model(model_name, kwargs):
    """set_adapter([a, b]) composes M = M_b M_a; merge_adapter() and merge_and_unload() with no names
    must merge both in that order (the reverse order gives a different model)."""
    _, model, inputs = _adapted(model_name, kwargs)
    model.add_adapter("other", BOFTConfig(init_weights=False, **kwargs))
    model.set_adapter(["default", "other"])
    composed = call(model, inputs).detach()
    # 2x2 rotations in a single factor commute; everywhere else the order matters.
    if (kwargs.get("boft_block_size"), kwargs.get("boft_n_butterfly_factor", 1)) != (2, 1):
        model.set_adapter(["other", "default"])
        assert rel_err(call(model, inputs), composed) > 1e-4, "the two orders must differ for this test to mean anything"
        model.set_adapter(["default", "other"])

    model.merge_adapter()
    assert all(layer.merged_adapters == ["default", "other"] for layer in model.modules() if isinstance(layer, BOFTLayer))
    assert rel_err(call(model, inputs), composed) < 1e-5
    model.unmerge_adapter()
    assert rel_err(call(model, inputs), composed) < 1e-5

    merged = model.merge_and_unload()
    assert not any(isinstance(m, BOFTLayer) for m in merged.modules())
    assert rel_err(call(merged, inputs), composed) < 1e-5


@pytest.mark.parametrize("model_name,kwargs", [
    ("MLP2", {"target_modules": ["lin0", "lin1"], "boft_block_size": 2, "boft_n_butterfly_factor": 3}),
    ("Conv2d2", {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_n_butterfly_factor": 2}),
    ("GPT2", {"target_modules": ["c_attn", "c_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2}),
], ids=["MLP2", "Conv2d2", "GPT2-Conv1D"])
def test_merge_in_train_mode_never_applies_dropout(model_name, kwargs):
    """With dropout on and the model in train mode, the merged weights are the dropout-free ones:
    the merged model computes the adapter's eval output, and unmerge restores the base weights."""
    base, model, inputs = _adapted(model_name, {**kwargs, "boft_dropout": 0.5})
    base.eval()
    eval_output = call(model, inputs).detach()
    original = _base_weights(model)
    model.train()
    torch.manual_seed(1)
    assert rel_err(call(model, inputs), eval_output) > 1e-4, "dropout must be active in train mode"

    merged_weights = []
    for seed in (1, 2):  # a dropout draw would differ between seeds
        torch.manual_seed(seed)
        model.merge_adapter()
        merged_weights.append(_base_weights(model))
        model.eval()
        assert rel_err(call(model, inputs), eval_output) < 1e-5
        model.train()
        model.unmerge_adapter()
        for name, weight in _base_weights(model).items():
            assert rel_err(weight, original[name]) < 1e-5, name
    for name, weight in merged_weights[0].items():
        assert rel_err(weight, merged_weights[1][name]) < 1e-5, name

    torch.manual_seed(3)
    merged = model.merge_and_unload()
    assert merged.training
    merged.eval()
    assert rel_err(call(merged, inputs), eval_output) < 1e-5


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in LOW_PRECISION_CASES], ids=[c[0] for c in LOW_PRECISION_CASES])
def test_bf16_merge_and_unmerge_keep_bf16_precision(model_name, kwargs):
    """In bf16 (unit roundoff 2**-9 = 2e-3) merging rounds each weight once and unmerging once more:
    merged output against unmerged, and unmerged weights against the originals, within 1e-2."""
    _, model, inputs = _adapted(model_name, kwargs)
    model.to(torch.bfloat16)
    cast = inputs if isinstance(inputs, dict) else tuple(t.to(torch.bfloat16) for t in inputs)
    unmerged = call(model, cast).detach()
    original = _base_weights(model)

    model.merge_adapter()
    merged_weights = _base_weights(model)
    assert all(w.dtype == torch.bfloat16 for w in merged_weights.values())
    assert any(rel_err(w, original[name]) > 1e-2 for name, w in merged_weights.items()), "the merge must move weights"
    assert rel_err(call(model, cast), unmerged) < 1e-2
    model.unmerge_adapter()
    for name, weight in _base_weights(model).items():
        assert rel_err(weight, original[name]) < 1e-2, name


def _two_adapter_model():
    base, model, _ = _adapted("MLP2", {"target_modules": ["lin0"], "boft_block_size": 4})
    model.add_adapter("other", BOFTConfig(target_modules=["lin0"], boft_block_size=4, init_weights=False))
    return base, model


def test_save_pretrained_selected_adapters(tmp_path):
    """PEFT 0.21: None saves every adapter, a list saves those (``[]`` none, though the directory is
    made), a name the model does not have is a ValueError that lists the names it has."""
    base, model = _two_adapter_model()

    model.save_pretrained(tmp_path / "none", selected_adapters=[])
    assert (tmp_path / "none").is_dir() and not any((tmp_path / "none").iterdir())

    model.save_pretrained(tmp_path / "other", selected_adapters=["other"])
    assert sorted(p.relative_to(tmp_path / "other").as_posix() for p in (tmp_path / "other").rglob("*")) == [
        "other", "other/adapter_config.json", "other/adapter_model.safetensors"]

    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "all" / "other" / "adapter_model.safetensors").is_file()
    loaded = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path / "all" / "other")
    assert torch.equal(loaded.model.lin0.boft_R["default"], model.model.lin0.boft_R["other"])

    with pytest.raises(ValueError, match=r"'missing'.*\['default', 'other'\]"):
        model.save_pretrained(tmp_path / "bad", selected_adapters=["other", "missing"])
    assert not (tmp_path / "bad").exists(), "nothing is written when a name is wrong"


def test_save_pretrained_takes_the_adapter_from_a_passed_state_dict(tmp_path):
    """``save_pretrained(dir, state_dict=...)``, as PEFT, Trainer and accelerate's gather route call
    it under DeepSpeed ZeRO-3 or FSDP: the adapter tensors come from that state dict (here a
    trained copy's; the live parameters stay as they are), at the BOFTModel's level or the
    wrapped model's; PEFT's other keywords are accepted."""
    base, inputs = build("Llama")
    config = BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=8, bias="boft_only", init_weights=False)
    model = adapt(copy.deepcopy(base), config)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    for level, state in (("outer", trained.state_dict()), ("inner", trained.model.state_dict())):
        folder = tmp_path / level
        model.save_pretrained(folder, state_dict=state, save_function=torch.save, save_embedding_layers="auto")
        loaded = BOFTModel.from_pretrained(copy.deepcopy(base), folder)
        assert rel_err(call(loaded, inputs), call(trained, inputs)) < 1e-6, level
        assert rel_err(call(loaded, inputs), call(model, inputs)) > 1e-4, level
    with pytest.raises(KeyError, match="whole model's state dict"):
        model.save_pretrained(tmp_path / "partial", state_dict={"unrelated": torch.zeros(1)})
