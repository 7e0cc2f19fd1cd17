"""Mixed-adapter batches (PEFT's ``adapter_names=``): each sample gets exactly what a batch of that
sample alone gives under ``set_adapter(name)`` (``"__base__"``: the base model alone), output scale
and ``modules_to_save`` heads included, for Linear, Conv1D and Conv2d layers, in forward and
``generate``; and the refusals PEFT makes."""

import copy

import pytest
import torch

from boft_triton import BOFTConfig, adapt
from tiny_models import build, call, rel_err

# (model, adapter "a" config, adapter "b" config): b targets fewer layers or other shapes
CASES = {
    "Llama": ({"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 8, "boft_n_butterfly_factor": 2},
              {"target_modules": ["q_proj"], "boft_block_size": 4}),
    "GPT2": ({"target_modules": ["c_attn", "c_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2},
             {"target_modules": ["c_attn"], "boft_block_size": 8}),
    "Dinov2": ({"target_modules": ["q_proj", "v_proj"], "boft_block_size": 8, "modules_to_save": ["classifier"]},
               {"target_modules": ["q_proj", "k_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2,
                "modules_to_save": ["classifier"]}),
    "Bert": ({"target_modules": ["query", "value"], "boft_block_size": 8, "modules_to_save": ["classifier"]},
             {"target_modules": ["query", "key", "dense"], "boft_block_size": 4, "boft_n_butterfly_factor": 2,
              "modules_to_save": ["classifier"]}),
    "Conv2d2": ({"target_modules": ["conv2d"], "boft_block_size": 2, "boft_n_butterfly_factor": 2},
                {"target_modules": ["conv2d"], "boft_block_size": 8}),
}
NAMES = ["a", "b", "__base__", "a"]


# transformers renamed ViT-style attention projections (query/key/value -> q_proj/k_proj/v_proj);
# the GPU image's 5.17 has the old names
_OLD_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def _configs(base, model_name):
    """CASES' two configs, with the attention names this transformers version uses."""
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    out = []
    for config in CASES[model_name]:
        targets = [t if t in names else _OLD_NAMES.get(t, t) for t in config["target_modules"]]
        out.append({**config, "target_modules": targets})
    return out


def _two_adapters(model_name):
    base, _ = build(model_name)
    config_a, config_b = _configs(base, model_name)
    model = adapt(copy.deepcopy(base), BOFTConfig(init_weights=False, **config_a), adapter_name="a")
    model.add_adapter("b", BOFTConfig(init_weights=False, **config_b))
    with torch.no_grad():  # scales and heads away from their init, so a wrong row would show
        for name, p in model.named_parameters():
            if "boft_s" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _batch(model_name, size):
    torch.manual_seed(1)
    if model_name in ("Llama", "GPT2", "Bert"):
        return {"input_ids": torch.randint(0, 64, (size, 8))}
    if model_name == "Dinov2":
        return {"pixel_values": torch.randn(size, 3, 28, 28)}
    return (torch.randn(size, 8, 6, 6),)


def _row(inputs, i):
    if isinstance(inputs, dict):
        return {k: v[i:i + 1] for k, v in inputs.items()}
    return tuple(v[i:i + 1] for v in inputs)


def _alone(model, inputs, i, name):
    """Sample i alone under set_adapter(name), or with the adapters disabled for the base."""
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return call(model, _row(inputs, i))
        model.set_adapter(name)
        return call(model, _row(inputs, i))


def _mixed(model, inputs, names):
    with torch.no_grad():
        if isinstance(inputs, dict):
            out = model(**inputs, adapter_names=names)
        else:
            out = model(*inputs, adapter_names=names)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("model_name", list(CASES))
def test_each_sample_gets_its_adapter(model_name):
    model = _two_adapters(model_name)
    inputs = _batch(model_name, len(NAMES))
    mixed = _mixed(model, inputs, NAMES)
    expected = torch.cat([_alone(model, inputs, i, name) for i, name in enumerate(NAMES)])
    assert rel_err(mixed, expected) < 1e-5
    # the three answers differ, so a sample given another adapter's rows would fail
    assert rel_err(expected[0], expected[1]) > 1e-3 and rel_err(expected[0], expected[2]) > 1e-3
    model.set_adapter("a")  # the call left no mixed state behind: a plain call is plain again
    assert rel_err(call(model, inputs), torch.cat([_alone(model, inputs, i, "a") for i in range(len(NAMES))])) < 1e-5


def test_mixed_batch_on_the_triton_kernels(monkeypatch):
    """The same mixed batch with the butterflies on the Triton kernels (interpreted on CPU)."""
    model = _two_adapters("Llama")
    inputs = _batch("Llama", len(NAMES))
    expected = _mixed(model, inputs, NAMES)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("BOFT_TRITON_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import importlib

    launches = importlib.import_module("boft_triton.kernels._common").LAST_LAUNCH
    launches.pop("butterfly_segmented", None)
    on_kernels = _mixed(model.to(device), {k: v.to(device) for k, v in inputs.items()}, NAMES)
    assert rel_err(on_kernels.cpu(), expected) < 1e-5
    assert "butterfly_segmented" in launches  # one segmented launch for the mixed rows, not one per adapter


def test_generate_with_mixed_adapters_equals_per_sample_generate():
    model = _two_adapters("Llama")
    prompts = _batch("Llama", len(NAMES))["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=prompts, adapter_names=NAMES, **kwargs)
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=prompts[i:i + 1], **kwargs)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=prompts[i:i + 1], **kwargs)
            assert torch.equal(mixed[i], alone[0]), (i, name)
        # two sequences per prompt (rows repeated per sample): each name covers its sample's copies
        both = model.generate(input_ids=prompts, adapter_names=NAMES, num_beams=2, num_return_sequences=2, **kwargs)
        model.set_adapter("b")
        alone = model.generate(input_ids=prompts[1:2], num_beams=2, num_return_sequences=2, **kwargs)
    assert torch.equal(both[2:4], alone)


def test_refusals():
    model = _two_adapters("Llama")
    inputs = _batch("Llama", 2)
    with pytest.raises(ValueError, match="Unknown adapter name.*'c'"):
        model(**inputs, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="2 names for a batch of 3"):
        model(input_ids=_batch("Llama", 3)["input_ids"], adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="one per sample"):
        model(**inputs, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**inputs, adapter_names=["a", "b"])
    model.eval()
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged model"):
        model(**inputs, adapter_names=["a", "b"])
    model.unmerge_adapter()
    assert _mixed(model, inputs, ["b", "a"]).shape[0] == 2  # fine again


def test_hotswap_changes_values_in_place_without_recompiling(tmp_path):
    """Another saved adapter of the same shapes loads into the existing one's parameters: the
    compiled model runs it with no new compile, and gives what loading it normally gives."""
    from torch._dynamo.testing import CompileCounter

    from boft_triton import BOFTModel, hotswap_adapter

    base, inputs = build("Llama")
    config = BOFTConfig(init_weights=False, **CASES["Llama"][0])
    torch.manual_seed(1)
    adapt(copy.deepcopy(base), config).save_pretrained(tmp_path / "one")
    torch.manual_seed(2)
    adapt(copy.deepcopy(base), config).save_pretrained(tmp_path / "two")
    expected = call(BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path / "two"), inputs)

    model = BOFTModel.from_pretrained(copy.deepcopy(base), tmp_path / "one")
    before = {n: p for n, p in model.named_parameters()}
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        first = compiled(**inputs).logits
        frames = counter.frame_count
        hotswap_adapter(model, tmp_path / "two", "default")
        swapped = compiled(**inputs).logits
    torch._dynamo.reset()
    assert counter.frame_count == frames, "hot swap made torch.compile recompile"
    assert all(p is before[n] for n, p in model.named_parameters())  # the same tensors, new values
    assert rel_err(swapped, expected) < 1e-5 and rel_err(first, expected) > 1e-3


def test_hotswap_refuses_a_misfit_before_changing_anything(tmp_path):
    from boft_triton import hotswap_adapter

    model = _two_adapters("Llama")
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    base, _ = build("Llama")
    other_shape = dict(CASES["Llama"][0], boft_n_butterfly_factor=1)
    adapt(copy.deepcopy(base), BOFTConfig(**other_shape)).save_pretrained(tmp_path / "n1")
    with pytest.raises(ValueError, match="does not fit adapter 'a'"):
        hotswap_adapter(model, tmp_path / "n1", "a")
    adapt(copy.deepcopy(base), BOFTConfig(**dict(CASES["Llama"][0], boft_block_size=4))).save_pretrained(tmp_path / "b4")
    with pytest.raises(ValueError, match="shape"):
        hotswap_adapter(model, tmp_path / "b4", "a")
    adapt(copy.deepcopy(base), BOFTConfig(**dict(CASES["Llama"][0], bias="boft_only"))).save_pretrained(tmp_path / "bias")
    with pytest.raises(ValueError, match="bias"):
        hotswap_adapter(model, tmp_path / "bias", "a")
    with pytest.raises(ValueError, match="No adapter 'c'"):
        hotswap_adapter(model, tmp_path / "n1", "c")
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n


@pytest.mark.parametrize("model_name", ["Llama", "Bert", "Conv2d2"])
def test_patched_peft_boft_takes_adapter_names(model_name):
    """Under patch_peft(), PEFT's own BOFT model answers ``adapter_names`` per sample (PEFT alone
    has the hook for LoRA only and drops the argument for BOFT); unpatch removes the hook again."""
    peft = pytest.importorskip("peft")
    import peft.tuners.boft.model as peft_boft_model

    from boft_triton import patched_peft

    base, _ = build(model_name)
    config_a, config_b = _configs(base, model_name)
    inputs = _batch(model_name, len(NAMES))
    with patched_peft():
        model = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(init_weights=False, **config_a),
                                    adapter_name="a")
        model.add_adapter("b", peft.BOFTConfig(init_weights=False, **config_b))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "boft_s" in name or "modules_to_save" in name:
                    p.add_(0.2 * torch.randn_like(p))
        model.eval()
        mixed = _mixed(model, inputs, NAMES)
        expected = torch.cat([_alone(model, inputs, i, name) for i, name in enumerate(NAMES)])
        assert rel_err(mixed, expected) < 1e-5
        assert rel_err(expected[0], expected[1]) > 1e-3
        with pytest.raises(ValueError, match="non-existing adapter"):
            _mixed(model, inputs, ["a", "c", "a", "a"])
    assert not hasattr(peft_boft_model.BOFTModel, "_enable_peft_forward_hooks")


def test_inference_solves_each_adapters_cayley_once_per_value():
    """Without gradients (generate calls the model once per token) Q is solved once per value of
    R; an in-place change of R (an optimizer step, a hot swap) is seen at once."""
    from boft_triton import ops

    model = _two_adapters("Llama")
    inputs = _batch("Llama", 2)
    calls = []
    real = ops.cayley

    def counting(R, mask=None):
        calls.append(R.shape)
        return real(R, mask)

    layer = model.model.model.layers[0].self_attn.q_proj
    try:
        ops.cayley = counting
        with torch.no_grad():
            first = _mixed(model, inputs, ["a", "b"])
            solved = len(calls)
            again = _mixed(model, inputs, ["a", "b"])
            assert len(calls) == solved and torch.equal(first, again)
            layer.boft_R["a"].mul_(0.5)  # in place: the version counter moves
            changed = _mixed(model, inputs, ["a", "b"])
        assert len(calls) == solved + 1 and rel_err(changed[0], first[0]) > 1e-4
        with torch.enable_grad():  # with gradients nothing is cached
            call(model, inputs).sum().backward()
        assert len(calls) > solved + 1
    finally:
        ops.cayley = real


@pytest.mark.parametrize("patched", [False, True], ids=["ours", "patched-peft"])
def test_bf16_model_with_fp32_adapters(patched):
    """A bf16 base with fp32 adapters (PEFT's default): each sample as alone, at bf16's tolerance."""
    peft = pytest.importorskip("peft")
    from boft_triton import patched_peft

    base, _ = build("Llama")
    base = base.to(torch.bfloat16)
    config_a, config_b = CASES["Llama"]
    inputs = _batch("Llama", len(NAMES))
    import contextlib

    with patched_peft() if patched else contextlib.nullcontext():
        if patched:
            model = peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(init_weights=False, **config_a),
                                        adapter_name="a")
            model.add_adapter("b", peft.BOFTConfig(init_weights=False, **config_b))
        else:
            model = adapt(copy.deepcopy(base), BOFTConfig(init_weights=False, **config_a), adapter_name="a")
            model.add_adapter("b", BOFTConfig(init_weights=False, **config_b))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "boft_s" in name:
                    assert p.dtype == torch.float32
                    p.add_(0.003)  # below bf16's resolution at 1: lost if the scale were rounded to bf16
        model.eval()
        mixed = _mixed(model, inputs, NAMES)
        expected = torch.cat([_alone(model, inputs, i, name) for i, name in enumerate(NAMES)])
    assert mixed.dtype == torch.bfloat16
    assert rel_err(mixed.float(), expected.float()) < 1e-2
