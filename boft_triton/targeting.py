"""Which modules an adapter config targets, by name, exactly as PEFT decides it."""

from __future__ import annotations

import re

from .config import BOFTConfig

# PEFT's default BOFT targets (identical to its LoRA defaults) for common architectures.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


def default_targets(model) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"target_modules is not set and boft_triton has no default targets for model type {model_type!r}; "
            "pass target_modules, e.g. ['q_proj', 'v_proj'] or a regex."
        )
    return DEFAULT_TARGET_MODULES[model_type]


def _matches_names(names: list[str] | str, key: str) -> bool:
    """A regex string must match the whole key; a list matches a key equal to or ending in ``.name``."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{name}") for name in names)


def is_excluded(config: BOFTConfig, key: str) -> bool:
    if config.exclude_modules and _matches_names(config.exclude_modules, key):
        return True
    # Adapters never go inside modules_to_save: the two would fight over the same weights.
    return bool(config.modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in config.modules_to_save
    )


def _layer_index(config: BOFTConfig, key: str) -> int | None:
    patterns = config.layers_pattern
    if not patterns:
        # The first numbered segment is the layer index (not an expert index nested below it).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(config: BOFTConfig, targets: list[str] | str, key: str) -> bool:
    """Whether module ``key`` gets an adapter under ``config`` (targets resolved for the model)."""
    if is_excluded(config, key) or not _matches_names(targets, key):
        return False
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted) or isinstance(targets, str):
        return True
    if key in targets:
        return True  # PEFT: a module named in full is taken as it is, whatever layers_to_transform says
    index = _layer_index(config, key)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def is_module_to_save(config: BOFTConfig, key: str) -> bool:
    """PEFT's rule, a bare suffix match: ``classifier`` also wraps ``pre_classifier``. Matching
    it exactly is what makes PEFT's checkpoints load into the same modules."""
    return bool(config.modules_to_save) and any(key.endswith(m) for m in config.modules_to_save)


# PEFT's task models add their heads to ``modules_to_save`` (PeftModelForSequenceClassification
# and ForTokenClassification: "classifier" and "score"; ForQuestionAnswering: "qa_outputs"), so the
# head trains and is saved with the adapter. The other task types add nothing.
TASK_TYPE_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


def add_task_heads(config: BOFTConfig) -> None:
    """Extend ``config.modules_to_save`` with the heads of its ``task_type``, as PEFT does."""
    heads = TASK_TYPE_HEADS.get(config.task_type or "", [])
    if heads:
        config.modules_to_save = list(config.modules_to_save or []) + [
            h for h in heads if h not in (config.modules_to_save or [])
        ]


ALL_LINEAR = "all-linear"


def all_linear_targets(model, config: BOFTConfig) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every ``nn.Linear`` / ``Conv1D`` by its full name,
    except the output layer (a transformers model's output embeddings, or for SEQ_CLS its
    ``score`` / ``classifier`` head) and anything inside an existing adapter layer."""
    from torch import nn

    from .layer import BOFTLayer, Conv1D

    linear_classes = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
    names = set()
    excluded = set()
    for name, module in model.named_modules():
        if isinstance(module, BOFTLayer) and isinstance(module.base_layer, linear_classes):
            names.add(name)
            excluded.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
        elif isinstance(module, linear_classes):
            names.add(name)
    output = _output_layer(model, config)
    if output is not None:
        excluded.update(name for name, module in model.named_modules() if module is output)
    return sorted(names - excluded)


def _output_layer(model, config: BOFTConfig):
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None  # PEFT only knows the output layer of transformers models
    output = model.get_output_embeddings()
    if output is not None:
        return output
    if config.task_type == "SEQ_CLS":
        for head in ("score", "classifier"):  # PEFT's SEQ_CLS_HEAD_NAMES, in its order
            if getattr(model, head, None) is not None:
                return getattr(model, head)
    return None
