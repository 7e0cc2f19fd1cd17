"""BOFT on diffusers models (UNet convs and attention, an SD3 DiT): parity with PEFT (N > 1
against PEFT's own N > 1 maths, with its CUDA extension's block-diagonal stood in), diffusers'
own ``add_adapter`` route under ``patch_peft()``, save and load, and merging back to the diffusers
class. Tiny models from configs (``tiny_diffusers``)."""

import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from boft_triton import BOFTConfig, BOFTLayer, BOFTModel, adapt, patched_peft  # noqa: E402
from tiny_diffusers import MODELS, out  # noqa: E402
from tiny_models import rel_err  # noqa: E402


def _config(cls, targets, N):
    return cls(target_modules=targets, boft_block_size=8, boft_n_butterfly_factor=N, init_weights=False)


def _peft_twin(base, ours: BOFTModel, targets, N):
    """PEFT's BOFT injected into a copy of ``base``, holding our adapter's values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.inject_adapter_in_model(_config(peft.BOFTConfig, targets, N), copy.deepcopy(base))
    mine = {n.removeprefix("model."): p for n, p in ours.named_parameters() if "boft_" in n}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "boft_" in name:
                p.copy_(mine.pop(name))
    assert not mine, f"parameters PEFT does not have: {sorted(mine)[:3]}"
    return theirs


def _adapter_grads(model, inputs, prefix=""):
    model.zero_grad()
    out(model, inputs).pow(2).mean().backward()
    return {n.removeprefix(prefix): p.grad.clone() for n, p in model.named_parameters() if "boft_R" in n}


@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_outputs_and_gradients_match_peft(kind, N, peft_with_butterfly):
    build, inputs_of, targets = MODELS[kind]
    base, inputs = build(), inputs_of()
    ours = adapt(copy.deepcopy(base), _config(BOFTConfig, targets, N))
    theirs = _peft_twin(base, ours, targets, N)
    convs = [m for m in ours.modules() if isinstance(m, BOFTLayer) and isinstance(m.base_layer, torch.nn.Conv2d)]
    assert (len(convs) > 0) == (kind == "unet")  # the UNet's ResNet convs and 1x1 projections are adapted
    expected = out(theirs, inputs)
    assert rel_err(expected, out(base, inputs)) > 1e-3, "the adapter must change the output"
    assert rel_err(out(ours, inputs), expected) < 1e-5
    mine, peft_grads = _adapter_grads(ours, inputs, "model."), _adapter_grads(theirs, inputs)
    assert mine.keys() == peft_grads.keys()
    for name in mine:
        assert rel_err(mine[name], peft_grads[name]) < 1e-4, name


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_diffusers_add_adapter_under_patch_peft(kind):
    """diffusers' own route (``model.add_adapter(peft.BOFTConfig)``) under ``patch_peft()``: N=2 is
    kept (PEFT alone would drop to 1 without its CUDA extension), it trains, and
    ``disable_adapters``/``enable_adapters`` give the base output exactly and the adapter's back."""
    build, inputs_of, targets = MODELS[kind]
    base_model, inputs = build(), inputs_of()
    with torch.no_grad():
        base_out = out(base_model, inputs)
    model = copy.deepcopy(base_model)
    with patched_peft(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(_config(peft.BOFTConfig, targets, 2))
        Rs = [p for n, p in model.named_parameters() if "boft_R" in n]
        assert Rs and all(R.shape[0] == 2 for R in Rs)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        before = [R.detach().clone() for R in Rs]
        out(model, inputs).pow(2).mean().backward()
        optimizer.step()
        assert any(not torch.equal(a, R) for a, R in zip(before, Rs)), "the adapter must train"
        model.eval()
        with torch.no_grad():
            adapted = out(model, inputs)
            model.disable_adapters()
            if kind == "unet":
                assert torch.equal(out(model, inputs), base_out)
            else:  # SD3's forward differs by float rounding once PEFT layers are in it (2e-7, LoRA's too)
                assert rel_err(out(model, inputs), base_out) < 1e-6
            model.enable_adapters()
            assert torch.equal(out(model, inputs), adapted)
    assert rel_err(adapted, base_out) > 1e-4


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_save_load_and_merge_back_to_the_diffusers_class(kind, tmp_path):
    build, inputs_of, targets = MODELS[kind]
    base, inputs = build(), inputs_of()
    ours = adapt(copy.deepcopy(base), _config(BOFTConfig, targets, 2)).eval()
    with torch.no_grad():
        expected = out(ours, inputs)
    ours.save_pretrained(tmp_path / "adapter")
    loaded = BOFTModel.from_pretrained(build(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel_err(out(loaded, inputs), expected) < 1e-6
    merged = loaded.merge_and_unload(safe_merge=True)
    assert type(merged) is type(base)
    assert not [m for m in merged.modules() if isinstance(m, BOFTLayer)]
    with torch.no_grad():
        assert rel_err(out(merged, inputs), expected) < 1e-5
    merged.save_pretrained(tmp_path / "merged")  # diffusers' own format, no adapter code needed
    again = type(base).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert rel_err(out(again, inputs), expected) < 1e-5


def test_our_unet_adapter_loads_in_peft(tmp_path, peft_with_butterfly):
    """PEFT's loader for our checkpoint of a UNet (attention and convs, N=2): PEFT's outputs."""
    build, inputs_of, targets = MODELS["unet"]
    base, inputs = build(), inputs_of()
    ours = adapt(copy.deepcopy(base), _config(BOFTConfig, targets, 2)).eval()
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(theirs(**inputs).sample, out(ours, inputs)) < 1e-5
