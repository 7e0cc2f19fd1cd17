"""transformers' Trainer and TRL's SFTTrainer with boft_triton models, on tiny models: default
arguments train, save_model and every checkpoint write the PEFT-format adapter (never the full
model), and training resumes from such a checkpoint."""

import copy
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from boft_triton import BOFTConfig, BOFTModel, adapt
from boft_triton.integrations.transformers import BOFTTrainer

datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIG = dict(task_type="SEQ_CLS", target_modules=["query", "value"], boft_block_size=4)


def _base():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=2))


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    # A text column the model does not take: with remove_unused_columns (the default) the
    # Trainer drops it, keeping the columns the forward names.
    return datasets.Dataset.from_dict({
        "text": [f"review {i}" for i in range(n)],
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones_like(ids).tolist(),
        "labels": (ids[:, 0] % 2).tolist(),
    })


def _args(out, **kw):
    kw = {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "report_to": [],
          "use_cpu": True, "save_strategy": "no", "logging_steps": 1, "seed": 0, "data_seed": 0, **kw}
    return transformers.TrainingArguments(output_dir=str(out), **kw)


def _adapter_tensors(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "boft_" in k or "modules_to_save" in k}


def test_plain_trainer_trains_with_default_arguments(tmp_path):
    model = adapt(_base(), BOFTConfig(**CONFIG))
    before = _adapter_tensors(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data())
    trainer.train()
    after = _adapter_tensors(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if "boft_R" in k or "classifier" in k)
    assert trainer.state.log_history[0]["loss"] > 0


def _files(folder):
    return sorted(os.listdir(folder))


def test_save_model_and_checkpoints_write_the_peft_adapter(tmp_path):
    model = adapt(_base(), BOFTConfig(**CONFIG))
    trainer = BOFTTrainer(model=model, args=_args(tmp_path / "run", save_strategy="steps", save_steps=2),
                          train_dataset=_data(), eval_dataset=_data(8))
    assert trainer.label_names == ["labels"]  # the wrapped model's, so evaluation computes a loss
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        files = _files(folder)
        assert "adapter_model.safetensors" in files and "adapter_config.json" in files, files
        assert not {"model.safetensors", "pytorch_model.bin"} & set(files), files
        keys = set(load_file(folder / "adapter_model.safetensors"))
        assert "base_model.model.classifier.weight" in keys  # modules_to_save (the SEQ_CLS head)
        assert all(k.endswith(("boft_R", "boft_s")) or ".classifier." in k for k in keys), keys
    # PEFT loads what the Trainer saved and computes what the trained model computes.
    loaded = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "final")).eval()
    x = torch.randint(1, 64, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits,
                                   rtol=1e-5, atol=1e-6)


def test_resume_from_an_adapter_checkpoint_continues_the_run(tmp_path):
    full = BOFTTrainer(model=adapt(_base(), BOFTConfig(**CONFIG)),
                       args=_args(tmp_path / "full", save_strategy="steps", save_steps=2), train_dataset=_data())
    full.train()
    resumed_model = adapt(_base(), BOFTConfig(**CONFIG))
    resumed = BOFTTrainer(model=resumed_model, args=_args(tmp_path / "resumed"), train_dataset=_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    ours, expected = _adapter_tensors(resumed_model), _adapter_tensors(full.model)
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # resume_from_checkpoint=True picks the last checkpoint of output_dir
    again = BOFTTrainer(model=adapt(_base(), BOFTConfig(**CONFIG)),
                        args=_args(tmp_path / "full", max_steps=5), train_dataset=_data())
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 5


def _tokenizer():
    """A word-level tokenizer over 64 tokens, built in memory (no download)."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 64)}}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                                pad_token="<pad>", eos_token="</s>")


def test_sft_trainer_trains_and_saves_the_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    from boft_triton.integrations.trl import BOFTSFTTrainer

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, pad_token_id=0, eos_token_id=1))
    reference = copy.deepcopy(base)
    model = adapt(base, BOFTConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], boft_block_size=4))
    before = _adapter_tensors(model)
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(2, 64, (16, 12), generator=g).tolist()})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", max_length=12,
                         dataset_kwargs={"skip_prepare_dataset": True}, seed=0, bf16=False)
    trainer = BOFTSFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
    trainer.train()
    assert not torch.equal(before["model.model.layers.0.self_attn.q_proj.boft_R.default"],
                           _adapter_tensors(model)["model.model.layers.0.self_attn.q_proj.boft_R.default"])
    trainer.save_model(str(tmp_path / "adapter"))
    files = _files(tmp_path / "adapter")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = BOFTModel.from_pretrained(reference, str(tmp_path / "adapter")).eval()
    x = torch.randint(2, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)


def test_forward_signature_survives_copies_pickling_and_replicas(tmp_path):
    import inspect

    model = adapt(_base(), BOFTConfig(**CONFIG))
    expected = list(inspect.signature(model.get_base_model().forward).parameters)
    assert "input_ids" in expected and "labels" in expected
    path = tmp_path / "whole.pt"
    torch.save(model, path)  # the per-instance forward is rebuilt on load, not pickled
    for other in (copy.deepcopy(model), torch.load(path, weights_only=False), model._replicate_for_data_parallel()):
        assert list(inspect.signature(other.forward).parameters) == expected
        assert other.forward.__self__ is other  # bound to the copy, not to the original


def test_load_best_model_at_end_reloads_the_best_adapter_checkpoint(tmp_path):
    model = adapt(_base(), BOFTConfig(**CONFIG))
    args = _args(tmp_path, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="loss", learning_rate=5e-2)
    trainer = BOFTTrainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    assert any(k.endswith("boft_R") for k in saved)
    for key, value in saved.items():  # PEFT key -> our parameter name (adapter "default")
        name = key.removeprefix("base_model.")
        name = (f"{name}.default" if name.endswith(("boft_R", "boft_s"))
                else name.replace(".classifier.", ".classifier.modules_to_save.default."))
        torch.testing.assert_close(model.get_parameter(name).detach(), value, rtol=0, atol=0, msg=key)
