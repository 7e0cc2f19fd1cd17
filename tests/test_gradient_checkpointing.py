"""Gradient checkpointing on an adapted HF model, with BOFT's multiplicative dropout on.

The dropout mask is drawn from the CPU generator inside the forward (``layer.dropout_mask``).
``torch.utils.checkpoint`` saves the CPU RNG state with each checkpointed block and restores it
when it recomputes the block in backward, so the recomputation draws the same masks; these tests
hold that, and show that a recomputation that redrew (``preserve_rng_state=False``) would fail.
"""

import copy

import pytest
import torch

from boft_triton import BOFTConfig, adapt
from tiny_models import llama, rel_err

# transformers 5 renames gradient_checkpointing_* to activation_checkpointing_* (FutureWarning).
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CONFIG = dict(target_modules=["q_proj", "v_proj", "down_proj"], boft_block_size=4, boft_n_butterfly_factor=2,
              boft_dropout=0.5, init_weights=False)


def gradients(model, ids, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpointed(model, **kwargs):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if kwargs.get("use_reentrant"):
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad (as in PEFT)
    assert model.is_gradient_checkpointing
    return model


def max_rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(rel_err(a[k], b[k]) for k in a)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients_with_dropout(use_reentrant):
    base = llama()
    plain = adapt(copy.deepcopy(base), BOFTConfig(**CONFIG)).train()
    ckpt = checkpointed(copy.deepcopy(plain), use_reentrant=use_reentrant)
    ids = torch.randint(0, 64, (2, 16))

    expected = gradients(plain, ids, seed=3)
    assert max_rel_err(gradients(ckpt, ids, seed=3), expected) <= 1e-6
    assert max_rel_err(gradients(plain, ids, seed=4), expected) > 1e-2  # the dropout draw matters
    # A recomputation that redraws the masks gives other gradients: the check above can fail.
    redraw = checkpointed(copy.deepcopy(plain), use_reentrant=use_reentrant, preserve_rng_state=False)
    assert max_rel_err(gradients(redraw, ids, seed=3), expected) > 1e-2


def test_peft_prepare_model_for_kbit_training_works_on_boft_models(tmp_path):
    """PEFT's own ``prepare_model_for_kbit_training`` (freeze, fp32 non-quantized weights, input
    grads, reentrant checkpointing) then ``adapt()``: training runs and checkpointing changes nothing."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    base = LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    assert base.model.norm.weight.dtype == torch.bfloat16
    base = peft.prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert base.model.norm.weight.dtype == torch.float32 and base.is_gradient_checkpointing
    model = adapt(base, BOFTConfig(**CONFIG)).train()
    ids = torch.randint(0, 64, (2, 16))

    with_checkpointing = gradients(model, ids, seed=3)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in with_checkpointing.values())
    assert any("q_proj.boft_R" in k for k in with_checkpointing)
    model.gradient_checkpointing_disable()
    assert max_rel_err(gradients(model, ids, seed=3), with_checkpointing) <= 1e-6

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
