"""``boft-triton merge``: fold a saved BOFT adapter into its base model and save the plain model.

Loads the base model (``--model``, default: the adapter config's ``base_model_name_or_path``),
loads the adapter with :meth:`BOFTModel.from_pretrained`, calls ``merge_and_unload`` and writes the
result with ``save_pretrained`` (plus the tokenizer when the base ships one). The merged model needs
neither boft_triton nor PEFT to run. A ``--model`` other than the adapter's
``base_model_name_or_path`` is merged with a warning naming both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CLIError

HELP = "merge a saved BOFT adapter into its base model and save the merged model"
_HEAD_NAMES = ("classifier", "score")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output-dir", required=True, help="where the merged model is saved")
    p.add_argument("--model", default=None,
                   help="base model path or hub name (default: the adapter's base_model_name_or_path)")
    p.add_argument("--model-class", choices=("auto", "sequence-classification", "causal-lm", "base"),
                   default="auto",
                   help="transformers class to load the base with (default: auto = sequence "
                        "classification when the adapter saves a classification head, else from "
                        "the adapter's task_type)")
    p.add_argument("--label-names", default=None,
                   help="comma-separated class names for a classifier (default: from a train "
                        "run's metrics.json next to the adapter, else LABEL_i)")
    p.add_argument("--safe-merge", action="store_true", help="check merged weights for NaNs")


def _adapter_head_rows(adapter_dir: Path) -> int | None:
    """Output rows of a saved classification head in the adapter weights, if there is one."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if parts[-1] == "weight" and any(h in parts for h in _HEAD_NAMES):
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2:
                    return int(shape[0])
    return None


def _label_names(args, adapter_dir: Path, rows: int | None) -> list[str] | None:
    if args.label_names:
        names = [s.strip() for s in args.label_names.split(",") if s.strip()]
        if rows is not None and len(names) != rows:
            raise CLIError(f"--label-names has {len(names)} names but the adapter's head has {rows} outputs")
        return names
    metrics = adapter_dir.parent / "metrics.json"
    if metrics.is_file():
        try:
            names = json.loads(metrics.read_text())["dataset"]["label_names"]
            if rows is None or len(names) == rows:
                return [str(n) for n in names]
        except (ValueError, KeyError, TypeError):
            pass
    return None


def run(args: argparse.Namespace) -> int:
    adapter_dir = Path(args.adapter)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise CLIError(f"{adapter_dir} is not an adapter directory (no adapter_config.json)")
    try:
        adapter_config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CLIError(f"{config_path}: invalid JSON: {exc}") from None

    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)
    from transformers.utils import logging as hf_logging

    from .. import BOFTModel
    from ..model import TargetModulesNotFound
    from .train import resolve_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_name = args.model or adapter_config.get("base_model_name_or_path")
    if not model_name:
        raise CLIError("the adapter config names no base model; pass --model")
    model_path = resolve_model_path(model_name)

    rows = _adapter_head_rows(adapter_dir)
    kind = args.model_class
    if kind == "auto":
        task = adapter_config.get("task_type")
        kind = ("sequence-classification" if rows is not None or task == "SEQ_CLS"
                else "causal-lm" if task == "CAUSAL_LM" else "base")
    kwargs = {}
    if kind == "sequence-classification":
        names = _label_names(args, adapter_dir, rows)
        num_labels = rows or (len(names) if names else None)
        if num_labels:
            kwargs["num_labels"] = num_labels
        if names:
            kwargs["id2label"] = dict(enumerate(names))
            kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    cls = {"sequence-classification": AutoModelForSequenceClassification,
           "causal-lm": AutoModelForCausalLM, "base": AutoModel}[kind]
    try:
        base = cls.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CLIError(f"cannot load base model {model_path!r}: {first}") from None
    trained_for = adapter_config.get("base_model_name_or_path")
    other_base = bool(trained_for) and not _same_model(model_name, trained_for)
    if other_base:
        print(f"warning: {adapter_dir} was trained on {trained_for} (its base_model_name_or_path), but --model is "
              f"{model_name}: the merged model is that other base rotated by an adapter not trained for it",
              file=sys.stderr, flush=True)
    try:
        model = BOFTModel.from_pretrained(base, str(adapter_dir))
    except TargetModulesNotFound as exc:
        if other_base:
            raise CLIError(
                f"cannot load adapter {adapter_dir} onto {model_name}: the adapter was trained for another model, "
                f"{trained_for}, and its target modules {adapter_config.get('target_modules')!r} name no module of "
                f"{model_name}. Merge it into the model it was trained on (leave out --model)."
            ) from None
        raise CLIError(f"cannot load adapter {adapter_dir} onto {model_name}: {exc}") from None
    except (ValueError, KeyError) as exc:
        raise CLIError(f"cannot load adapter {adapter_dir} onto {model_name}: {exc}") from None
    merged = model.merge_and_unload(progressbar=False, safe_merge=args.safe_merge)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer = "no tokenizer (the base has none)"
    if _has_tokenizer(model_path):
        AutoTokenizer.from_pretrained(model_path).save_pretrained(str(out))
        tokenizer = "the base's tokenizer"
    print(f"merged {adapter_dir} into {model_name} ({type(merged).__name__}); saved it and {tokenizer} to {out}")
    return 0


# Files one of which every saved tokenizer has (fast tokenizers, SentencePiece, WordPiece, BPE).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _has_tokenizer(model_path: str) -> bool:
    """Whether the base ships a tokenizer. Without its files transformers 5 still builds one from
    the config (BERT: a 5-token stub of special tokens), which must not be saved as the model's."""
    if Path(model_path).is_dir():
        return any((Path(model_path) / name).is_file() for name in _TOKENIZER_FILES)
    from transformers.utils import cached_file

    return any(cached_file(model_path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False) for name in _TOKENIZER_FILES)


def _same_model(a: str, b: str) -> bool:
    """Whether two model names or paths denote the same base (the packaged MiniLM's aliases, paths
    to one folder)."""
    from .train import resolve_model_path

    if a == b:
        return True
    try:
        a, b = resolve_model_path(a), resolve_model_path(b)
    except CLIError:
        return False
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())
