"""``boft_triton.patch_peft()``: PEFT's own BOFT layers computing with boft_triton's ops.

The oracle is PEFT itself, unpatched, on its N > 1 code path (``peft_with_butterfly`` stands
``torch.block_diag`` in for its CUDA extension). Every parity test also checks that the patched
run went through ``boft_triton.ops`` and never through PEFT's block-diagonal helper, so a patch that
silently does nothing fails.
"""

import copy
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import boft_triton
from boft_triton import ops
from boft_triton.integrations import peft_patch
from boft_triton.integrations.peft_patch import PeftPatchError, patched_peft
from tiny_models import llama, rel_err

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as peft_layer  # noqa: E402

DROP_WARNING = "PEFT alone would silently train 1 factor"


class Net(nn.Module):
    """32 -> 16 -> 8, both layers adaptable with up to 3 factors of block size 4."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(32, 16, bias=bias)
        self.lin1 = nn.Linear(16, 8, bias=bias)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


class ConvNet(nn.Module):
    """A 3x3 conv and nothing after it (PEFT's conv output can differ in size from the base's)."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs):
        super().__init__()
        self.conv2d = nn.Conv2d(c_in, c_out, 3, **conv_kwargs)

    def forward(self, x):
        return torch.tanh(self.conv2d(x))


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of boft_triton's ops and of PEFT's own block-diagonal helper."""
    calls = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ops, "cayley", counting("cayley", ops.cayley))
    monkeypatch.setattr(ops, "butterfly", counting("butterfly", ops.butterfly))
    monkeypatch.setattr(peft_layer.FastBlockDiag, "apply", counting("peft_block_diag", peft_layer.FastBlockDiag.apply))
    return calls


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_model(base, adapters: dict[str, dict], active: list[str]):
    """PEFT model with these adapters (``init_weights=False``: random R and s), ``active`` active."""
    torch.manual_seed(0)
    names = list(adapters)
    model = _quiet(peft.get_peft_model, base, peft.BOFTConfig(init_weights=False, **adapters[names[0]]), names[0])
    for name in names[1:]:
        _quiet(model.add_adapter, name, peft.BOFTConfig(init_weights=False, **adapters[name]))
    model.base_model.set_adapter(active)
    return model


def _observe(model, x: torch.Tensor, weight_names: list[str]) -> dict[str, torch.Tensor]:
    """Train-mode output and gradients (a seeded dropout draw), eval output, the output with the
    adapters disabled, and the weights after merge, safe merge, merge_and_unload and unmerge.
    Leaves ``model`` as it found it (merges happen on copies)."""
    seen = {}
    model.train()
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    out = model(x)
    out.pow(2).sum().backward()
    seen["train_out"] = out.detach()
    seen["x_grad"] = x.grad
    for name, p in model.named_parameters():
        if p.requires_grad:
            seen[f"grad:{name}"] = p.grad.clone()
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        seen["eval_out"] = model(x)
        with model.disable_adapter():
            seen["disabled_out"] = model(x)

        merged = copy.deepcopy(model)
        _quiet(merged.merge_adapter)
        seen["merged_out"] = merged(x)
        modules = dict(merged.named_modules())
        for name in weight_names:
            seen[f"merged:{name}"] = modules[name].get_base_layer().weight.clone()
        _quiet(merged.unmerge_adapter)
        modules = dict(merged.named_modules())
        for name in weight_names:
            seen[f"unmerged:{name}"] = modules[name].get_base_layer().weight.clone()

        safe = copy.deepcopy(model)
        for module in safe.modules():
            if isinstance(module, peft_layer.BOFTLayer):
                _quiet(module.merge, safe_merge=True)
        seen["safe_merged_out"] = safe(x)

        unloaded = _quiet(copy.deepcopy(model).merge_and_unload)
        seen["unloaded_out"] = unloaded(x)
    return seen


def _assert_same(got: dict, want: dict, tolerance: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in want:
        # fp32 on small shapes: the dense n x n products PEFT forms differ from ours by rounding only.
        assert rel_err(got[key], want[key]) < tolerance, key


LINEAR_CASES = {
    "b4-N1": ({"default": {"boft_block_size": 4, "boft_n_butterfly_factor": 1}}, True),
    "b4-N2": ({"default": {"boft_block_size": 4, "boft_n_butterfly_factor": 2}}, True),
    "b4-N3": ({"default": {"boft_block_size": 4, "boft_n_butterfly_factor": 3}}, True),
    "D4-N2-nobias": ({"default": {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2}}, False),
    "b2-N3-dropout": ({"default": {"boft_block_size": 2, "boft_n_butterfly_factor": 3, "boft_dropout": 0.5}}, True),
    "two-adapters": ({"default": {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "boft_dropout": 0.25},
                      "other": {"boft_block_size": 4, "boft_n_butterfly_factor": 2}}, True),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_matches_peft(case, peft_with_butterfly, op_calls):
    adapters, bias = LINEAR_CASES[case]
    targets = {"target_modules": ["lin0", "lin1"]}
    model = _peft_model(Net(bias), {k: {**v, **targets} for k, v in adapters.items()}, list(adapters))
    x = torch.randn(6, 32)
    weights = ["base_model.model.lin0", "base_model.model.lin1"]

    want = _observe(model, x, weights)
    assert op_calls["peft_block_diag"] > 0 and op_calls["butterfly"] == 0  # the oracle is PEFT's N > 1 path
    op_calls.clear()
    with patched_peft():
        got = _observe(model, x, weights)
    assert op_calls["butterfly"] > 0 and op_calls["cayley"] > 0 and op_calls["peft_block_diag"] == 0
    _assert_same(got, want)


def test_linear_on_a_bf16_base_matches_peft(peft_with_butterfly, op_calls):
    """bf16 base, fp32 adapters (PEFT's default), PEFT's casts. PEFT rounds its rotation matrix
    to bf16 and we accumulate in fp32, so both are set against PEFT in fp64: ours is within
    bf16 tolerance of it, and no further from it than PEFT's own bf16 run."""
    config = {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": ["lin0", "lin1"]}
    model = _peft_model(Net().to(torch.bfloat16), {"default": config}, ["default"])
    assert model.base_model.model.lin0.boft_R["default"].dtype == torch.float32
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    weights = ["base_model.model.lin0", "base_model.model.lin1"]
    exact = _observe(copy.deepcopy(model).double(), x.double(), weights)
    theirs = _observe(model, x, weights)
    with patched_peft():
        ours = _observe(model, x, weights)
    assert op_calls["butterfly"] > 0
    assert all(v.dtype == torch.bfloat16 for k, v in ours.items() if "out" in k)
    assert ours.keys() == exact.keys()
    for key in exact:
        error, peft_error = rel_err(ours[key], exact[key]), rel_err(theirs[key], exact[key])
        assert error < 1e-2 and error <= 1.5 * peft_error + 1e-3, (key, error, peft_error)


CONV_CASES = {
    "b4-N2": (dict(c_in=8, c_out=32, padding=1, stride=2), {"boft_block_size": 4, "boft_n_butterfly_factor": 2}),
    # PEFT ignores dilation (and uses padding[0], stride[0]): the patched layer must too.
    "D4-N3-dilated-dropout": (dict(c_in=8, c_out=16, padding=(2, 1), stride=(1, 2), dilation=2),
                              {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3, "boft_dropout": 0.5}),
    "b9-N1": (dict(c_in=5, c_out=10), {"boft_block_size": 9, "boft_n_butterfly_factor": 1}),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_peft(case, peft_with_butterfly, op_calls):
    conv_kwargs, config = CONV_CASES[case]
    c_in, c_out = conv_kwargs.pop("c_in"), conv_kwargs.pop("c_out")
    base = ConvNet(c_in, c_out, **conv_kwargs)
    x = torch.randn(2, c_in, 7, 7)
    model = _peft_model(base, {"default": {**config, "target_modules": ["conv2d"]}}, ["default"])

    want = _observe(model, x, ["base_model.model.conv2d"])
    op_calls.clear()
    with patched_peft():
        got = _observe(model, x, ["base_model.model.conv2d"])
    assert op_calls["butterfly"] > 0 and op_calls["peft_block_diag"] == 0
    _assert_same(got, want)


def test_conv2d_with_a_non_square_kernel_fails_clearly():
    base = nn.Sequential(nn.Conv2d(4, 8, (3, 1)))
    model = _peft_model(base, {"default": {"boft_block_size": 4, "target_modules": ["0"]}}, ["default"])
    with patched_peft(), pytest.raises(ValueError, match="square kernels only"):
        model(torch.randn(1, 4, 5, 5))


def test_patched_layers_hold_pefts_own_parameters(peft_with_butterfly):
    """Built while patched (no CUDA extension) = built by PEFT with its extension: same keys,
    shapes, values (same seed) and buffers."""
    config = {"default": {"boft_block_size": 4, "boft_n_butterfly_factor": 3, "target_modules": ["lin0", "lin1"]}}
    torch.manual_seed(2)
    want = _peft_model(Net(), config, ["default"]).state_dict()
    peft_with_butterfly.get_fbd_cuda = lambda: None  # as without the extension...
    with patched_peft():  # ...but patched
        torch.manual_seed(2)
        got = _peft_model(Net(), config, ["default"]).state_dict()
    assert got.keys() == want.keys()
    assert got["base_model.model.lin0.boft_R.default"].shape == (3, 8, 4, 4)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_fbd_cuda_stand_in_computes_the_block_diagonal():
    """Code that still calls PEFT's FastBlockDiag gets the block diagonal and its gradient."""
    blocks = torch.randn(2, 3, 4, 4, requires_grad=True)
    with patched_peft():
        assert peft_layer.get_fbd_cuda()
        got = peft_layer.FastBlockDiag.apply(blocks)
        weights = torch.randn_like(got)
        (got * weights).sum().backward()
    want_blocks = blocks.detach().clone().requires_grad_(True)
    want = torch.stack([torch.block_diag(*f.unbind(0)) for f in want_blocks])
    (want * weights).sum().backward()
    assert torch.equal(got, want)
    assert torch.equal(blocks.grad, want_blocks.grad)


def test_cayley_batch_goes_through_boft_triton(op_calls):
    layer = _peft_model(Net(), {"default": {"boft_block_size": 4, "target_modules": ["lin0"]}}, ["default"])
    layer = layer.base_model.model.lin0
    data = torch.randn(6, 4, 4)
    want = layer.cayley_batch(data)
    with patched_peft():
        got = layer.cayley_batch(data)
    assert op_calls["cayley"] == 1
    assert rel_err(got, want) < 1e-6


# ----------------------------------------------------------------------------- save and load


def _llama_inputs():
    return torch.randint(0, 64, (2, 8))


def _llama_peft(n_factors=2):
    torch.manual_seed(0)
    config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=n_factors, init_weights=False,
                             target_modules=["q_proj", "v_proj"])
    return _quiet(peft.get_peft_model, llama(), config)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_and_load_round_trip_while_patched(tmp_path, peft_with_butterfly):
    ids = _llama_inputs()
    with patched_peft():
        model = _llama_peft()
        base = copy.deepcopy(model.get_base_model())  # weights identical to the model's base
        want = _logits(model, ids)
        model.save_pretrained(tmp_path)
        loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
        assert rel_err(_logits(loaded, ids), want) < 1e-6
        assert loaded.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 2
    # The same folder in unpatched PEFT (with its N > 1 path): PEFT's format, same outputs.
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    assert rel_err(_logits(theirs, ids), want) < 1e-5


def test_a_peft_checkpoint_with_several_factors_loads_while_patched(tmp_path, monkeypatch, peft_with_butterfly):
    """A checkpoint PEFT wrote with its CUDA extension (N=2) loads, patched, on a machine where
    PEFT alone would build N=1 layers and fail to load it, and gives PEFT's outputs."""
    ids = _llama_inputs()
    theirs = _llama_peft()
    base = copy.deepcopy(theirs.get_base_model())
    want = _logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    monkeypatch.undo()  # PEFT as installed on this CPU machine: no fbd_cuda extension
    with patched_peft(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert rel_err(_logits(loaded, ids), want) < 1e-5
    assert sum(DROP_WARNING in str(w.message) for w in caught) == 1


def test_warns_once_when_peft_alone_would_drop_factors(monkeypatch):
    def drop_warnings(build):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build()
        return [w for w in caught if DROP_WARNING in str(w.message)]

    def build(n_factors):
        config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=n_factors, target_modules=["lin0", "lin1"])
        return lambda: peft.get_peft_model(Net(), config)

    with patched_peft():
        assert drop_warnings(build(1)) == []
        first = drop_warnings(build(2))
        assert len(first) == 1 and "boft_n_butterfly_factor=2" in str(first[0].message)
        assert drop_warnings(build(3)) == []  # once per patch_peft()
    with patched_peft():
        assert len(drop_warnings(build(2))) == 1
    monkeypatch.setattr(peft_layer, "_FBD_CUDA", object())  # PEFT's extension is loaded: PEFT keeps N too
    with patched_peft():
        assert drop_warnings(build(2)) == []


# ----------------------------------------------------------------------------- patch / unpatch


def _seam_objects():
    """Each seam's current object (None where an added one is absent)."""
    import importlib

    out = {}
    for seam in peft_patch.SEAMS:
        module = importlib.import_module(seam.module)
        owner = module if seam.owner == "module" else getattr(module, seam.owner)
        out[(seam.owner, seam.name)] = vars(owner).get(seam.name)
    return out


def test_unpatch_restores_the_original_objects_and_both_are_idempotent():
    originals = _seam_objects()
    assert not peft_patch.is_patched()
    boft_triton.patch_peft()
    boft_triton.patch_peft()
    try:
        patched = _seam_objects()
        assert peft_patch.is_patched()
        for key in originals:
            assert patched[key] is not originals[key], key
    finally:
        boft_triton.unpatch_peft()
    restored = _seam_objects()
    for key in originals:
        assert restored[key] is originals[key], key
    boft_triton.unpatch_peft()
    assert not peft_patch.is_patched()
    assert all(_seam_objects()[key] is originals[key] for key in originals)


def test_patched_peft_leaves_an_outer_patch_alone():
    with patched_peft():
        with patched_peft():
            pass
        assert peft_patch.is_patched()
    assert not peft_patch.is_patched()


@pytest.mark.parametrize("owner,name", [("Linear", "get_delta_weight"), ("Conv2d", "forward")])
def test_a_peft_without_a_seam_gets_a_clear_error_and_no_partial_patch(owner, name, monkeypatch):
    originals = _seam_objects()
    monkeypatch.delattr(getattr(peft_layer, owner), name)
    with pytest.raises(PeftPatchError, match=f"{owner}.{name} is missing"):
        boft_triton.patch_peft()
    assert not peft_patch.is_patched()
    now = _seam_objects()
    for key, original in originals.items():
        if key != (owner, name):
            assert now[key] is original, key


def test_a_peft_that_has_the_mixed_batch_hook_for_boft_gets_a_clear_error(monkeypatch):
    """The patch adds PEFT's ``_enable_peft_forward_hooks`` to its BOFT model; a PEFT that already
    has one (a version not checked here) is refused, nothing replaced."""
    import peft.tuners.boft.model as peft_boft_model

    monkeypatch.setattr(peft_boft_model.BOFTModel, "_enable_peft_forward_hooks", lambda self: None, raising=False)
    with pytest.raises(PeftPatchError, match="_enable_peft_forward_hooks already exists"):
        boft_triton.patch_peft()
    assert not peft_patch.is_patched()


def test_a_peft_with_another_update_layer_signature_gets_a_clear_error(monkeypatch):
    def old_update_layer(self, adapter_name, boft_block_size, boft_block_num, boft_n_butterfly_factor):
        pass

    monkeypatch.setattr(peft_layer.BOFTLayer, "update_layer", old_update_layer)
    with pytest.raises(PeftPatchError, match="without \\['config'\\]"):
        boft_triton.patch_peft()
    assert not peft_patch.is_patched()


# ----------------------------------------------------------------------------- Trainer


def test_transformers_trainer_trains_a_patched_peft_model(tmp_path, op_calls):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 64, (8, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    with patched_peft():
        torch.manual_seed(0)
        config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"])
        model = _quiet(peft.get_peft_model, llama(), config)
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                 logging_steps=1, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
        R = model.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"]
        assert R.shape == (2, 8, 4, 4) and R.abs().sum() > 0  # N kept, and trained away from zero
        assert op_calls["butterfly"] > 0 and op_calls["peft_block_diag"] == 0

        trainer.save_model(str(tmp_path / "adapter"))
        want = _logits(model, ids[:2])
        loaded = _quiet(peft.PeftModel.from_pretrained, _base_like(model), str(tmp_path / "adapter"))
        assert rel_err(_logits(loaded, ids[:2]), want) < 1e-6


def _base_like(peft_model):
    """A fresh copy of the (unadapted) base model of ``peft_model``."""
    torch.manual_seed(0)
    return llama()


def test_trl_sft_trainer_with_a_peft_config_trains_patched(tmp_path, op_calls):
    """TRL builds the PEFT model itself from ``peft_config=BOFTConfig(...)``; patched, that model
    keeps N=2 and trains through boft_triton's ops."""
    trl = pytest.importorskip("trl")
    import datasets
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 64)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, pad_token_id=0, eos_token_id=1))
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(2, 64, (8, 12), generator=g).tolist()})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", max_length=12,
                         dataset_kwargs={"skip_prepare_dataset": True}, seed=0, bf16=False, disable_tqdm=True)
    config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    with patched_peft():
        trainer = _quiet(trl.SFTTrainer, model=base, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=config)
        trainer.train()
        model = trainer.model
        assert isinstance(model, peft.PeftModel)
        R = model.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"]
        assert R.shape == (2, 8, 4, 4) and R.abs().sum() > 0
        assert op_calls["butterfly"] > 0 and op_calls["peft_block_diag"] == 0
        trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
