"""The models and batches the benchmarks run on, built offline."""

from __future__ import annotations

import torch

from .training_step import Workload


def minilm_reviews(batch_size: int = 16, max_length: int = 128) -> Workload:
    """The default training job's setup: packaged all-MiniLM-L6-v2, a batch of real reviews,
    BOFT/LoRA on the attention projections, the classification head trained."""
    from boft_triton.data import TokenizingCollate, load_reviews
    from boft_triton.train import load_model, resolve_model_path

    data = load_reviews()
    tokenizer, model, _ = load_model(resolve_model_path("all-MiniLM-L6-v2"), data.label_names)
    pairs = list(zip(data.train_texts[:batch_size], data.train_labels[:batch_size]))
    batch = TokenizingCollate(tokenizer, max_length)(pairs)
    return Workload("minilm-reviews", model, batch, ["query", "key", "value"], ["classifier"])


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
          batch_size: int, seq_len: int, targets: list[str], name: str, dtype=torch.float32) -> Workload:
    """A Llama-shaped causal LM from a config (random weights: speed and memory only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=max(seq_len, 128))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    return Workload(name, model, {"input_ids": ids, "labels": ids.clone()}, targets, [])


def tiny_llama(batch_size: int = 4, seq_len: int = 128) -> Workload:
    return llama(256, 4, 8, 4, 688, 2048, batch_size, seq_len, ["q_proj", "v_proj"], "tiny-llama")


LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256)
LLAMA_3B = dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
