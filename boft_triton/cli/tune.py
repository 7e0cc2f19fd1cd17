"""``boft-triton tune``: autotune the kernels for the real layer shapes of an adapted model.

Builds (or loads) the model exactly as ``train`` does, adapts it with the given BOFT config,
collects the distinct (n, b, N) shapes of its adapted layers, times every candidate tile of the
butterfly forward and backward at ``--tokens`` rows, prints the winners and stores them in the
tuning cache (keyed by device, Triton version, dtype and shape) that the kernels read at run time.
Without a GPU it runs the kernels in Triton's interpreter with a CPU timer (slow; for testing).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from .errors import CLIError
from .train import DEFAULT_BLOCK_SIZE, DEFAULT_FACTORS, DEFAULT_MODEL, DEFAULT_TARGETS

HELP = "autotune the Triton kernels for the adapted layer shapes of a model and cache the winners"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # the same defaults as train: a bare `tune` tunes the shapes the main job runs
    p.add_argument("--model", default=DEFAULT_MODEL, help="model path or hub name (default: packaged MiniLM)")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"modules to adapt, as for train (default: {DEFAULT_TARGETS})")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"BOFT block size (default: {DEFAULT_BLOCK_SIZE}, as for train, unless --block-num)")
    p.add_argument("--block-num", type=int, default=0, help="BOFT block count (instead of --block-size)")
    p.add_argument("--factors", type=int, default=DEFAULT_FACTORS, help=f"butterfly factors N (default: {DEFAULT_FACTORS})")
    p.add_argument("--tokens", type=int, default=16384, help="rows (tokens per step per device) to tune for")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="activation dtype")
    p.add_argument("--cache", default=None,
                   help="cache file to write (default: the one kernel launches read, $BOFT_TRITON_TUNE_CACHE or the "
                        "user cache dir); launches read another file only with BOFT_TRITON_TUNE_CACHE=FILE")
    p.add_argument("--max-configs", type=int, default=None, help="try at most this many tiles per shape")


def _adapted_model(args):
    import torch
    from transformers import AutoConfig, AutoModel

    from .. import BOFTConfig, adapt
    from .train import parse_targets, resolve_model_path

    path = resolve_model_path(args.model)
    try:
        model = AutoModel.from_config(AutoConfig.from_pretrained(path))  # shapes only: no weights needed
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot load model {args.model!r}: {str(exc).splitlines()[0]}") from None
    block_size = args.block_size if args.block_size is not None else (0 if args.block_num else DEFAULT_BLOCK_SIZE)
    try:
        config = BOFTConfig(boft_block_size=block_size, boft_block_num=args.block_num,
                            boft_n_butterfly_factor=args.factors, target_modules=parse_targets(args.targets))
        return adapt(model.to(torch.float32), config)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import tuning

    if args.tokens < 1:
        raise CLIError(f"--tokens must be at least 1, got {args.tokens}")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise CLIError("tune needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels in the interpreter)")
    model = _adapted_model(args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shapes = tuning.collect_shapes(model)
    if os.environ.get("TRITON_INTERPRET") == "1" and args.max_configs is None:
        total = tuning.count_candidates(shapes, dtype=dtype)
        raise CLIError(
            f"under TRITON_INTERPRET=1 the kernels run in Triton's CPU interpreter: a full search over {total} tiles "
            f"of {len(shapes)} shape(s) takes many minutes and times nothing a GPU would see. For a quick check of "
            "the tuning path pass --max-configs 1 (and a small --tokens, e.g. 64); tune on a GPU for real tiles."
        )
    try:
        rows = tuning.tune(shapes, args.tokens, dtype=dtype, cache_path=args.cache, max_configs=args.max_configs,
                           verbose=False, progress=True)
    except tuning.TuneCacheError as exc:
        raise CLIError(str(exc)) from None
    print(tuning.format_table(rows))
    print(_where_launches_read(Path(args.cache) if args.cache else tuning.cache_path(), tuning))
    return 0


def _where_launches_read(written: Path, tuning) -> str:
    """Kernel launches read only ``$BOFT_TRITON_TUNE_CACHE`` or the user cache file: say whether
    they will read the file just written, and if not, how to make them."""
    try:
        read = tuning.cache_path()
    except tuning.TuneCacheError:  # platformdirs missing: launches read only the variable's file
        read = None
    if read is not None and written.resolve() == read.resolve():
        return f"cache: {written} (kernel launches read this file)"
    return (f"cache: {written}\nkernel launches read {read or 'no file unless the variable below is set'}; "
            "to use the tuned tiles, run them with "
            f"{tuning.CACHE_ENV}={shlex.quote(str(written.resolve()))}")
