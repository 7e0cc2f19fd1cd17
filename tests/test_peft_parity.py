"""Parity with PEFT's BOFT: same parameters give PEFT's outputs, gradients and merged weights,
and checkpoints cross both ways (PEFT -> boft_triton, boft_triton -> PEFT)."""

import copy
import warnings

import pytest
import torch

from boft_triton import BOFTConfig, BOFTLayer, BOFTModel, adapt
from tiny_models import CONFIG_MATRIX, build, call, rel_err

peft = pytest.importorskip("peft")
# PEFT adapts nn.Linear and nn.Conv2d only (GPT-2's Conv1D is ours alone).
PEFT_CASES = [c for c in CONFIG_MATRIX if c[1] != "GPT2"]
IDS = [c[0] for c in PEFT_CASES]


def _peft_model(base, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(init_weights=False, **kwargs)).eval()


def _grads(model, inputs):
    model.zero_grad()
    call(model, inputs).pow(2).sum().backward()
    return {n.removeprefix("base_model.").replace(".default", ""): p.grad.clone()
            for n, p in model.named_parameters() if "boft_" in n}


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in PEFT_CASES], ids=IDS)
def test_peft_checkpoint_loads_with_same_outputs_and_gradients(model_name, kwargs, tmp_path, peft_with_butterfly):
    base, inputs = build(model_name)
    theirs = _peft_model(base, kwargs)
    theirs.save_pretrained(tmp_path)
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    assert rel_err(call(ours, inputs), call(theirs, inputs)) < 1e-5

    their_grads, our_grads = _grads(theirs, inputs), _grads(ours, inputs)
    assert their_grads.keys() == our_grads.keys()
    for key in their_grads:
        assert rel_err(our_grads[key], their_grads[key]) < 1e-4, key


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in PEFT_CASES], ids=IDS)
def test_our_checkpoint_loads_in_peft(model_name, kwargs, tmp_path, peft_with_butterfly):
    base, inputs = build(model_name)
    ours = adapt(copy.deepcopy(base), BOFTConfig(init_weights=False, **kwargs)).eval()
    with torch.no_grad():  # trained-looking extras: biases and modules_to_save away from their init
        for name, p in ours.named_parameters():
            if p.requires_grad and "boft_" not in name:
                p.add_(0.1 * torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel_err(call(theirs, inputs), call(ours, inputs)) < 1e-5


@pytest.mark.parametrize("model_name,kwargs", [c[1:] for c in PEFT_CASES], ids=IDS)
def test_merged_weights_match_peft(model_name, kwargs, tmp_path, peft_with_butterfly):
    base, inputs = build(model_name)
    theirs = _peft_model(base, kwargs)
    theirs.save_pretrained(tmp_path)
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    their_merged = theirs.merge_and_unload()
    our_merged = ours.merge_and_unload()
    their_weights = dict(their_merged.named_parameters())
    for name, p in our_merged.named_parameters():
        assert rel_err(p, their_weights[name]) < 1e-5, name
    assert rel_err(call(our_merged, inputs), call(their_merged, inputs)) < 1e-5


def test_dropout_draws_match_peft(tmp_path, peft_with_butterfly):
    """In training mode with the same seed, PEFT and boft_triton drop the same blocks."""
    kwargs = {"target_modules": ["lin0"], "boft_block_size": 2, "boft_n_butterfly_factor": 3, "boft_dropout": 0.5}
    base, inputs = build("MLP2")
    theirs = _peft_model(base, kwargs)
    theirs.save_pretrained(tmp_path)
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    theirs.train(), ours.train()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = call(theirs, inputs)
        torch.manual_seed(seed)
        assert rel_err(call(ours, inputs), expected) < 1e-5
    torch.manual_seed(0)
    first = call(ours, inputs)
    assert rel_err(call(ours, inputs), first) > 1e-4, "each forward call draws a fresh mask"


def test_peft_n1_fallback_checkpoint_takes_n_from_tensors(tmp_path, monkeypatch):
    """PEFT without its CUDA extension silently trains N=1 but writes the config's N; we load
    what the tensors hold, so outputs match what PEFT computed."""
    import peft.tuners.boft.layer as peft_boft_layer

    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: None)
    kwargs = {"target_modules": ["lin0"], "boft_block_size": 4, "boft_n_butterfly_factor": 2}
    base, inputs = build("MLP2")
    theirs = _peft_model(base, kwargs)
    assert theirs.base_model.model.lin0.boft_R["default"].shape[0] == 1
    theirs.save_pretrained(tmp_path)
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    layer = ours.model.lin0
    assert isinstance(layer, BOFTLayer) and layer.boft_R["default"].shape[0] == 1
    assert ours.peft_config["default"].boft_n_butterfly_factor == 1
    assert rel_err(call(ours, inputs), call(theirs, inputs)) < 1e-5


def test_bin_checkpoint_and_legacy_boft_p_are_accepted(tmp_path):
    base, inputs = build("MLP")
    ours = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2, init_weights=False))
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    state["base_model.model.lin0.boft_P"] = torch.eye(10)[None]
    torch.save(state, tmp_path / "adapter_model.bin")
    loaded = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert rel_err(call(loaded, inputs), call(ours, inputs)) < 1e-6
