"""``boft-triton`` command line: ``boft-triton <command> [options]``.

Each subcommand lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; register it in :data:`COMMANDS`. Modules are imported when the parser
is built, so keep their top-level imports light (import torch inside ``run``).

Problems the user can fix raise :class:`~boft_triton.cli.errors.CLIError`: ``main`` prints
``error: <message>`` and returns 2 instead of showing a traceback (``BOFT_TRITON_DEBUG=1`` shows
it). Runs under ``accelerate launch -m boft_triton.cli train ...`` unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CLIError

# name -> module
COMMANDS: dict[str, str] = {
    "train": "boft_triton.cli.train",
    "merge": "boft_triton.cli.merge",
    "tune": "boft_triton.cli.tune",
    "bench": "boft_triton.bench.command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boft-triton",
        description="BOFT / OFT orthogonal finetuning with PEFT's semantics, on Triton kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments, recorded in outputs
    try:
        return int(args._run(args) or 0)
    except CLIError as exc:
        if os.environ.get("BOFT_TRITON_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        from .process_group import leave_after_error

        leave_after_error(exc.exit_code)  # a multi-process run ends here, with this status
        return exc.exit_code

