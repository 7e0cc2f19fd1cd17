"""Bases offloaded by accelerate: the adapted layer calls its base layer, so the offload hook
loads the weight for it; the outputs and gradients equal those of the same adapter on a base that
is not offloaded. On a CPU-only machine disk and CPU offload still run the hooks."""

import copy

import pytest
import torch
from accelerate import cpu_offload, disk_offload, dispatch_model

from boft_triton import BOFTConfig, adapt
from tiny_models import gpt2, rel_err

CONFIG = dict(target_modules=["c_attn", "c_fc"], boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
DEVICE_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
              "transformer.h.0": "disk", "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}


def offload(model, how: str, folder):
    if how == "disk_offload":
        return disk_offload(model, folder, execution_device="cpu")
    if how == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    return dispatch_model(model, device_map=DEVICE_MAP, offload_dir=folder, main_device="cpu")


def count_hook_calls(layer, counts: dict, key: str, monkeypatch):
    hook = layer._hf_hook
    original = hook.pre_forward

    def pre_forward(module, *args, **kwargs):
        counts[key] = counts.get(key, 0) + 1
        return original(module, *args, **kwargs)

    monkeypatch.setattr(hook, "pre_forward", pre_forward)


def step(model, ids):
    torch.manual_seed(1)  # GPT-2's dropout draws the same masks in both runs
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("how", ["disk_offload", "cpu_offload", "dispatch_model"])
def test_offloaded_base_gives_the_same_outputs_and_gradients(how, tmp_path, monkeypatch):
    base = gpt2()  # Conv1D layers with biases: the unscaled bias is read through the hook's weights map
    reference = adapt(copy.deepcopy(base), BOFTConfig(**CONFIG))
    offloaded = offload(copy.deepcopy(base), how, tmp_path / "offload")
    model = adapt(offloaded, BOFTConfig(**CONFIG))
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if "boft_" in k}, strict=False)

    adapted = {n: m for n, m in model.model.named_modules() if hasattr(m, "boft_R")}
    assert len(adapted) == 4 and not any(layer.boft_R["default"].is_meta for layer in adapted.values())
    layers = {n: m for n, m in adapted.items() if m.base_layer.weight.is_meta}  # dispatch_model: block 0 only
    assert len(layers) == (2 if how == "dispatch_model" else 4)
    counts = {}
    for name, layer in layers.items():
        count_hook_calls(layer.base_layer, counts, name, monkeypatch)

    ids = torch.randint(0, 64, (2, 8))
    loss, grads = step(model, ids)
    ref_loss, ref_grads = step(reference, ids)
    assert counts == {name: 1 for name in layers}  # every adapted base ran through its offload hook
    assert rel_err(loss, ref_loss) <= 1e-6
    assert grads.keys() == ref_grads.keys() and len(grads) == 8
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
    assert all(layer.base_layer.weight.is_meta for layer in layers.values())  # offloaded again after the step


def test_offloading_the_adapted_model_itself_says_to_offload_the_base_first():
    model = adapt(gpt2(), BOFTConfig(**CONFIG))
    cpu_offload(model.model, execution_device="cpu")  # offloads the adapter's parameters too
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(RuntimeError, match="Offload or dispatch the base model first, then adapt"):
        model(input_ids=ids)


def test_merging_into_an_offloaded_base_is_refused(tmp_path):
    model = adapt(disk_offload(gpt2(), tmp_path / "offload", execution_device="cpu"), BOFTConfig(**CONFIG))
    with pytest.raises(ValueError, match="offloaded by accelerate.*nothing was merged"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in model._boft_layers())
