"""Tiny models built from code or configs (no downloads) and the contract-test config matrix."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """PEFT's test MLP: 10 -> 20 -> 2."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class MLP2(nn.Module):
    """32 -> 32 -> 2, wide enough for 3 butterfly factors."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(32, 32)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(32, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class ConvModel(nn.Module):
    def __init__(self, c_in: int, c_out: int, **conv_kwargs):
        super().__init__()
        self.conv2d = nn.Conv2d(c_in, c_out, 3, **conv_kwargs)
        self.relu = nn.ReLU()
        self.lin0 = nn.LazyLinear(2)

    def forward(self, x):
        return self.lin0(self.relu(self.conv2d(x)).flatten(1))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=64)
    return GPT2LMHeadModel(cfg)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def dinov2():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=28,
                       patch_size=14, num_labels=3)
    return Dinov2ForImageClassification(cfg)


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                     max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg)


def _tokens(batch=2, length=8, vocab=64):
    return {"input_ids": torch.randint(0, vocab, (batch, length))}


BUILDERS = {
    "MLP": (MLP, lambda: (torch.randn(4, 10),)),
    "MLP2": (MLP2, lambda: (torch.randn(4, 32),)),
    "Conv2d": (lambda: ConvModel(5, 10), lambda: (torch.randn(2, 5, 6, 6),)),
    "Conv2d2": (lambda: ConvModel(8, 32, padding=1, stride=2), lambda: (torch.randn(2, 8, 6, 6),)),
    "GPT2": (gpt2, _tokens),
    "Llama": (llama, _tokens),
    "Dinov2": (dinov2, lambda: {"pixel_values": torch.randn(2, 3, 28, 28)}),
    "Bert": (bert, _tokens),
}

# (id, model, config kwargs): PEFT's BOFT cases, plus the Conv1D, Llama and reference-page cases.
CONFIG_MATRIX = [
    ("MLP-b2", "MLP", {"target_modules": ["lin0"], "boft_block_size": 2}),
    ("MLP-D2", "MLP", {"target_modules": ["lin0"], "boft_block_size": 0, "boft_block_num": 2}),
    ("MLP-b10-N2", "MLP", {"target_modules": ["lin1"], "boft_block_size": 10, "boft_n_butterfly_factor": 2}),
    ("MLP-dropout", "MLP", {"target_modules": ["lin1"], "boft_block_size": 2, "boft_dropout": 0.1}),
    ("MLP-save", "MLP", {"target_modules": ["lin0"], "boft_block_size": 2, "modules_to_save": ["lin1"]}),
    ("MLP2-b2-N3", "MLP2", {"target_modules": ["lin0", "lin1"], "boft_block_size": 2, "boft_n_butterfly_factor": 3}),
    ("MLP2-D8-N3", "MLP2", {"target_modules": ["lin0"], "boft_block_size": 0, "boft_block_num": 8,
                            "boft_n_butterfly_factor": 3}),
    ("Conv2d-b45", "Conv2d", {"target_modules": ["conv2d"], "boft_block_size": 45}),
    ("Conv2d-D1", "Conv2d", {"target_modules": ["conv2d"], "boft_block_size": 0, "boft_block_num": 1}),
    ("Conv2d2-b2-N2", "Conv2d2", {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_n_butterfly_factor": 2}),
    ("Conv2d2-b2-N3", "Conv2d2", {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_n_butterfly_factor": 3}),
    ("GPT2-Conv1D", "GPT2", {"target_modules": ["c_attn", "c_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2}),
    ("Llama", "Llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 8,
                        "boft_n_butterfly_factor": 2}),
    ("Dinov2-reference-page", "Dinov2", {"target_modules": ["query", "value", "key", "output.dense", "mlp.fc1", "mlp.fc2"],
                                         "boft_block_size": 8, "boft_n_butterfly_factor": 1, "boft_dropout": 0.1,
                                         "bias": "boft_only", "modules_to_save": ["classifier"]}),
]


def build(model_name: str, seed: int = 0):
    torch.manual_seed(seed)
    make_model, make_inputs = BUILDERS[model_name]
    model = make_model().eval()
    inputs = make_inputs()
    with torch.no_grad():  # materialise lazy modules
        call(model, inputs)
    return model, inputs


def call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.logits if hasattr(out, "logits") else out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in norm; NaN anywhere fails."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
