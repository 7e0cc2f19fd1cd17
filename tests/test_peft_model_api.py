"""The rest of PEFT's model contract: task types (heads trained and saved, adapters PEFT loads
with identical outputs), a second adapt(), PEFT's names (all-linear, peft_config=, base_model,
status reports, set_adapter(inference_mode=), loading keywords, push_to_hub) and the saves
that used to be empty or surprising."""

import copy
import json
import os
import warnings

import pytest
import torch
import transformers

from boft_triton import BOFTConfig, BOFTModel, adapt
from tiny_models import MLP, llama

peft = pytest.importorskip("peft")

BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _bart(cls):
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0)
    return cls(cfg)


def _llama(cls):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, pad_token_id=0)
    return cls(cfg)


# task type -> (base model builder, targets, head names PEFT puts in modules_to_save)
TASKS = {
    "SEQ_CLS-bert": ("SEQ_CLS", lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)),
                     ["query", "value"], {"classifier"}),
    "SEQ_CLS-llama-score": ("SEQ_CLS", lambda: _llama(transformers.LlamaForSequenceClassification),
                            ["q_proj", "v_proj"], {"score"}),
    "TOKEN_CLS": ("TOKEN_CLS", lambda: transformers.BertForTokenClassification(transformers.BertConfig(**BERT)),
                  ["query", "value"], {"classifier"}),
    "QUESTION_ANS": ("QUESTION_ANS", lambda: transformers.BertForQuestionAnswering(transformers.BertConfig(**BERT)),
                     ["query", "value"], {"qa_outputs"}),
    "CAUSAL_LM": ("CAUSAL_LM", lambda: _llama(transformers.LlamaForCausalLM), ["q_proj", "v_proj"], set()),
    "SEQ_2_SEQ_LM": ("SEQ_2_SEQ_LM", lambda: _bart(transformers.BartForConditionalGeneration),
                     ["q_proj", "v_proj"], set()),
    "FEATURE_EXTRACTION": ("FEATURE_EXTRACTION", lambda: transformers.BertModel(transformers.BertConfig(**BERT)),
                           ["query", "value"], set()),
}


def _inputs(task):
    ids = torch.randint(1, 64, (2, 8))
    if task == "SEQ_2_SEQ_LM":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 64, (2, 5))}
    return {"input_ids": ids}


def _outputs(model, inputs):
    out = model(**inputs)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


def _quiet_peft(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _trainable(model, strip):
    return {n.removeprefix(strip) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(TASKS), ids=list(TASKS))
def test_task_type_heads_train_save_and_load_in_peft(case, tmp_path):
    task, build, targets, heads = TASKS[case]
    torch.manual_seed(0)
    base = build().eval()
    config = dict(task_type=task, target_modules=targets, boft_block_size=4, init_weights=False)
    ours = adapt(copy.deepcopy(base), BOFTConfig(**config))
    theirs = _quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.BOFTConfig(**config))
    # PEFT's task model decides which heads train; ours trains the same parameters.
    assert _trainable(ours, "model.") == _trainable(theirs, "base_model.model.")
    wrapped = {n.rsplit(".", 1)[-1] for n, _ in ours.model.named_modules() if type(_).__name__ == "ModulesToSaveWrapper"}
    assert wrapped == heads
    with torch.no_grad():  # a trained head: its saved copy must be what PEFT loads
        for name, param in ours.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))
    ours.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task
    loaded = _quiet_peft(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
    assert type(loaded).__name__ == type(theirs).__name__  # PEFT picked its task model from our config
    inputs = _inputs(task)
    with torch.no_grad():
        for a, b in zip(_outputs(ours, inputs), _outputs(loaded, inputs), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_invalid_task_type_is_refused():
    with pytest.raises(ValueError, match="Invalid task type: 'SEQ_CLASSIFICATION'"):
        BOFTConfig(task_type="SEQ_CLASSIFICATION")
    assert BOFTConfig(task_type=peft.TaskType.SEQ_CLS).task_type == "SEQ_CLS"


# -- a second adapt() ---------------------------------------------------------------------------

def test_second_adapt_is_refused_and_training_survives():
    model = adapt(MLP(), BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 10)).pow(2).sum().backward()
    optimizer.step()
    R = model.model.lin0.boft_R["default"]
    trained = R.detach().clone()
    assert trained.abs().sum() > 0
    for again in (model, model.model):  # the BOFTModel, and the base it adapted in place
        with pytest.raises(ValueError, match="add_adapter"):
            adapt(again, BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    assert model.model.lin0.boft_R["default"] is R  # the optimizer's Parameter, untouched
    torch.testing.assert_close(R.detach(), trained, rtol=0, atol=0)


# -- PEFT's names -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama-causal", "bert-seq-cls-task", "bert-seq-cls-no-task"])
def test_all_linear_targets_what_peft_targets(case):
    torch.manual_seed(0)
    if case == "llama-causal":
        base, task = llama(), None
    else:
        base = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT))
        task = "SEQ_CLS" if case == "bert-seq-cls-task" else None
    config = dict(target_modules="all-linear", boft_block_size=4, task_type=task)
    ours = adapt(copy.deepcopy(base), BOFTConfig(**config))
    theirs = _quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.BOFTConfig(**config))
    assert [s.name for s in ours.get_layer_status()] == [s.name for s in theirs.get_layer_status()]
    assert "model.lm_head" not in {s.name for s in ours.get_layer_status()}


def test_peft_config_keyword_and_base_model():
    config = BOFTConfig(target_modules=["lin0"], boft_block_size=2)
    model = adapt(MLP(), peft_config=config)
    model.add_adapter("b", peft_config=config)
    with pytest.raises(TypeError, match="once"):
        adapt(MLP(), config, peft_config=config)
    # PEFT: peft_model.base_model is the tuner model, .model the transformers model under it.
    assert model.base_model.model is model.get_base_model()
    model.base_model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"]
    base = llama()
    lm = adapt(base, BOFTConfig(target_modules=["q_proj"], boft_block_size=4))
    assert lm.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape == (1, 8, 4, 4)


def test_layer_and_model_status_match_peft():
    torch.manual_seed(0)
    base = MLP()
    config = dict(target_modules=["lin0", "lin1"], boft_block_size=2)
    ours = adapt(copy.deepcopy(base), BOFTConfig(**config))
    theirs = _quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.BOFTConfig(**config))
    for model in (ours, theirs):
        model.add_adapter("b", BOFTConfig(**config) if model is ours else peft.BOFTConfig(**config))
        model.base_model.set_adapter(["default", "b"])
        model.base_model.merge_adapter(["default"])
    mine, peft_layers = ours.get_layer_status(), theirs.get_layer_status()
    assert [vars(s) for s in mine] == [vars(s) for s in peft_layers]
    mine, their_model = vars(ours.get_model_status()), vars(theirs.get_model_status())
    for key in ("base_model_type", "adapter_model_type"):
        mine.pop(key), their_model.pop(key)
    assert mine == their_model


def test_set_adapter_inference_mode_freezes_like_peft():
    model = adapt(MLP(), BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    model.add_adapter("b", BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    model.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter("b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"model.lin0.boft_R.b", "model.lin0.boft_s.b"}


def test_loading_keywords_and_hub_revision(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trained = adapt(MLP(), BOFTConfig(target_modules=["lin0"], boft_block_size=2, init_weights=False))
    trained.save_pretrained(tmp_path / "repo")
    x = torch.randn(3, 10)
    base = copy.deepcopy(trained).unload()
    loaded = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path / "repo", low_cpu_mem_usage=True,
                                       torch_device="cpu")
    torch.testing.assert_close(loaded(x), trained(x))
    with pytest.raises(TypeError, match="ephemeral_gpu_offload"):  # never silently ignored
        BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path / "repo", ephemeral_gpu_offload=True)
    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, revision=revision)
        return str(tmp_path / "repo")

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = BOFTModel.from_pretrained(copy.deepcopy(base), "someone/boft-adapter", revision="v1")
    assert asked == {"repo_id": "someone/boft-adapter", "revision": "v1"}
    loaded.load_adapter("someone/boft-adapter", "again", revision="v2")
    assert asked["revision"] == "v2"
    torch.testing.assert_close(loaded(x), trained(x))


def test_push_to_hub_uploads_the_peft_format_adapter(tmp_path, monkeypatch):
    import huggingface_hub
    calls = {}

    class Repo:
        repo_id = "someone/boft-adapter"

    def create_repo(repo_id, private=None, token=None, exist_ok=False, **kwargs):
        calls["create"] = dict(repo_id=repo_id, private=private, exist_ok=exist_ok)
        return Repo()

    def upload_folder(repo_id, folder_path, commit_message=None, **kwargs):
        files = {os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs}
        calls["upload"] = dict(repo_id=repo_id, files=sorted(files), message=commit_message)
        peft_loaded = _quiet_peft(peft.PeftModel.from_pretrained, MLP(), folder_path)
        calls["peft_loads"] = type(peft_loaded).__name__
        return "commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    model = adapt(MLP(), BOFTConfig(target_modules=["lin0"], boft_block_size=2, modules_to_save=["lin1"]))
    assert model.push_to_hub("someone/boft-adapter", private=True, commit_message="first") == "commit"
    assert calls["create"] == {"repo_id": "someone/boft-adapter", "private": True, "exist_ok": True}
    assert calls["upload"] == {"repo_id": "someone/boft-adapter", "message": "first",
                               "files": ["adapter_config.json", "adapter_model.safetensors"]}
    assert calls["peft_loads"] == "PeftModel"


# -- empty or surprising saves ------------------------------------------------------------------

def test_save_after_deleting_every_adapter_is_refused(tmp_path):
    model = adapt(MLP(), BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter left"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_deleting_the_active_adapter_warns_and_falls_back_like_peft():
    model = adapt(MLP(), BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    for name in ("c", "b"):
        model.add_adapter(name, BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    model.set_adapter("c")
    with pytest.warns(UserWarning, match="Adapter c was active which is now deleted. Setting active adapter to b."):
        model.delete_adapter("c")
    assert model.active_adapters == ["b"]


def test_exact_name_targets_with_layers_to_transform_match_peft(tmp_path):
    """PEFT takes a module named in full as it is, whatever layers_to_transform says."""
    torch.manual_seed(0)
    base = llama()
    config = dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1],
                  boft_block_size=4, init_weights=False)
    theirs = _quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.BOFTConfig(**config))
    theirs.save_pretrained(tmp_path)
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert [s.name for s in ours.get_layer_status()] == [s.name for s in theirs.get_layer_status()]
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_active_peft_config_modules_to_save_and_set_requires_grad_like_peft():
    torch.manual_seed(0)
    base = MLP()
    config = dict(target_modules=["lin0"], boft_block_size=2, modules_to_save=["lin1"])
    ours = adapt(copy.deepcopy(base), BOFTConfig(**config))
    theirs = _quiet_peft(peft.get_peft_model, copy.deepcopy(base), peft.BOFTConfig(**config))
    for model in (ours, theirs):
        model.add_adapter("b", BOFTConfig(**config) if model is ours else peft.BOFTConfig(**config))
        model.set_requires_grad("b")
        model.set_requires_grad(["default"], requires_grad=False)
    assert _trainable(ours, "model.") == _trainable(theirs, "base_model.model.")
    assert ours.modules_to_save == theirs.modules_to_save == {"lin1"}
    assert ours.active_peft_config.modules_to_save == ["lin1"]
