"""Bad input gets a clear error that says what to change, and leaves the user's things intact."""

import copy
import json

import pytest
import torch
from torch import nn

from boft_triton import BOFTConfig, BOFTModel, adapt
from tiny_models import build, call


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"boft_block_size": 0, "boft_block_num": 0}, "Either `boft_block_size` or `boft_block_num`"),
        ({"boft_block_size": 4, "boft_block_num": 2}, "not both"),
        ({"boft_n_butterfly_factor": 0}, "positive integer"),
        ({"layers_pattern": "layers"}, "`layers_to_transform` must also be specified"),
        ({"bias": "some"}, "`bias` must be one of"),
        ({"boft_dropout": 1.5}, "`boft_dropout`"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BOFTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"boft_block_size": 3}, r"boft_block_size=3 does not divide 10.*valid boft_block_size values for this layer: \[1, 2, 5, 10\]"),
        ({"boft_block_size": 0, "boft_block_num": 3}, "boft_block_num=3 does not divide 10"),
        ({"boft_block_size": 10, "boft_n_butterfly_factor": 2}, r"times 2\*\*1 does not divide 10"),
        ({"boft_block_size": 0, "boft_block_num": 5, "boft_n_butterfly_factor": 2}, r"not a multiple of 2\*\*1"),
        ({"boft_block_size": 5, "boft_n_butterfly_factor": 2}, "no block size fits with boft_n_butterfly_factor=2"),
    ],
)
def test_block_geometry_errors_name_the_layer_and_valid_choices(kwargs, message):
    base, _ = build("MLP")
    with pytest.raises(ValueError, match=message) as info:
        adapt(base, BOFTConfig(target_modules=["lin0"], **kwargs))
    assert "lin0" in str(info.value)


def test_unknown_target_lists_adaptable_names():
    base, _ = build("MLP")
    with pytest.raises(ValueError, match=r"matched no module.*'lin0'"):
        adapt(base, BOFTConfig(target_modules=["q_proj"], boft_block_size=2))


def test_unsupported_target_type():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(TypeError, match=r"0 \(Embedding\).*not supported"):
        adapt(model, BOFTConfig(target_modules=["0", "1"], boft_block_size=2))


def test_no_default_targets_for_unknown_architecture():
    base, _ = build("MLP")
    with pytest.raises(ValueError, match="no default targets"):
        adapt(base, BOFTConfig(boft_block_size=2))


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1 only"):
        adapt(model, BOFTConfig(target_modules=["0"], boft_block_size=2))


def test_mismatched_checkpoint_names_key_and_shapes(tmp_path):
    base, _ = build("MLP")
    adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["boft_block_size"] = 5  # the config now disagrees with the tensors
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"base_model\.model\.lin0\.boft_R.*expected shape \(1, 2, 5, 5\), found \(1, 5, 2, 2\)"):
        BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("model_name,block_size,n_factors", [("MLP", 2, 2), ("MLP2", 4, 5), ("MLP2", 4, 0)],
                         ids=["D5-odd", "N5-needs-16-blocks", "N0"])
def test_checkpoint_factor_count_that_cannot_fit_fails_at_load(tmp_path, model_name, block_size, n_factors):
    """A boft_R whose factor count cannot fit the layer (D blocks of b) is refused at load with the
    key named; it must not load and then fail in the forward."""
    from safetensors.torch import load_file, save_file

    base, inputs = build(model_name)
    adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=block_size)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.lin0.boft_R"
    tensors[key] = torch.zeros(n_factors, *tensors[key].shape[1:])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}.*\({n_factors}, .*do not fit"):
        BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=block_size))
    with pytest.raises(ValueError, match=key.replace(".", "[.]")):
        model.load_adapter(tmp_path, "loaded")
    assert list(model.peft_config) == ["default"]
    call(model, inputs)


def test_checkpoint_for_other_targets(tmp_path):
    base, _ = build("MLP")
    adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin1"], boft_block_size=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["lin0"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no BOFT layer 'lin1'"):
        BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_corrupt_checkpoint(tmp_path):
    base, _ = build("MLP")
    adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2)).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_safe_merge_on_nan_raises_and_leaves_model_untouched():
    base, inputs = build("MLP2")
    model = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=2, init_weights=False))
    with torch.no_grad():
        model.model.lin1.boft_s["default"][0, 0] = float("nan")  # lin0 merges fine, lin1 is broken
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="NaNs or infs detected.*'default'"):
        model.merge_and_unload(safe_merge=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]) or torch.isnan(weights[name]).any(), name
    assert not model.model.lin0.merged and not model.model.lin1.merged


def test_save_is_atomic_and_keeps_the_old_adapter_on_failure(tmp_path, monkeypatch):
    base, inputs = build("MLP")
    model = adapt(copy.deepcopy(base), BOFTConfig(target_modules=["lin0"], boft_block_size=2, init_weights=False))
    model.save_pretrained(tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()

    import boft_triton.checkpoint as ckpt

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with torch.no_grad():
        model.model.lin0.boft_R["default"].add_(1)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_forced_triton_backend_without_gpu_is_a_clear_error(monkeypatch):
    from boft_triton import ops

    monkeypatch.setenv("BOFT_TRITON_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        ops.cayley(torch.zeros(1, 2, 2, 2))
    monkeypatch.setenv("BOFT_TRITON_BACKEND", "fast")
    with pytest.raises(ValueError, match="BOFT_TRITON_BACKEND must be one of"):
        ops.cayley(torch.zeros(1, 2, 2, 2))
