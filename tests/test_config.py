"""BOFTConfig: every field of PEFT's, same defaults, and PEFT's adapter_config.json both ways."""

import dataclasses
import json

import pytest

from boft_triton import BOFTConfig

peft = pytest.importorskip("peft")


def test_fields_and_defaults_match_peft():
    ours = {f.name: f.default for f in dataclasses.fields(BOFTConfig)}
    theirs_obj = peft.BOFTConfig()
    reference_page = ["peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
                      "inference_mode", "boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                      "target_modules", "boft_dropout", "fan_in_fan_out", "bias", "modules_to_save",
                      "init_weights", "layers_to_transform", "layers_pattern", "exclude_modules"]
    for name in reference_page:
        assert name in ours, name
        if name != "peft_type":
            assert ours[name] == getattr(theirs_obj, name), name
    assert BOFTConfig().peft_type == "BOFT"


def test_json_round_trip_and_peft_reads_ours(tmp_path):
    config = BOFTConfig(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2, target_modules=["q", "v"],
                        boft_dropout=0.1, bias="boft_only", modules_to_save=["classifier"], layers_to_transform=[0, 1],
                        layers_pattern="layers")
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOFT"
    assert BOFTConfig.from_pretrained(tmp_path) == config
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.BOFTConfig)
    assert (theirs.boft_block_num, theirs.boft_n_butterfly_factor, theirs.bias) == (8, 2, "boft_only")


def test_reads_peft_config_with_extra_keys(tmp_path):
    peft.BOFTConfig(boft_block_size=2, target_modules=["lin0"]).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["some_future_field"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_field"):
        config = BOFTConfig.from_pretrained(tmp_path)
    assert config.boft_block_size == 2 and config.target_modules == ["lin0"]


def test_other_peft_types_are_refused(tmp_path):
    peft.LoraConfig(target_modules=["lin0"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not 'BOFT'"):
        BOFTConfig.from_pretrained(tmp_path)


def test_layers_to_transform_selects_layers():
    from boft_triton import adapt
    from tiny_models import build

    model, _ = build("Llama")
    adapted = adapt(model, BOFTConfig(target_modules=["q_proj"], boft_block_size=8, layers_to_transform=[1]))
    names = [n for n, m in adapted.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "boft_R")]
    assert names == ["model.model.layers.1.self_attn.q_proj"]
