"""Every command line README.md shows must stay true.

The commands are read from the README itself: lines of its fenced code blocks and inline code
spans that call ``boft-triton`` (or ``-m boft_triton.cli``). Placeholders (ADAPTER, OUT, BASE)
become tiny fixtures, ``[optional parts]`` are included, ``...`` is dropped. Each command then
1. parses with the real ``boft-triton`` argument parser, and
2. runs to exit code 0 on tiny fixtures, with small-size options appended (argparse keeps the
   last value of an option, so the README's own options still parse, and those not overridden,
   such as ``bench --threads 1``, take effect). The full-size runs (the default job takes minutes)
   are covered by ``test_default_job_smoke`` and the benchmarks' own tests. The ``accelerate launch``
   line is parsed, not launched: ``tests/test_distributed.py`` runs it on several processes.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from boft_triton.cli import COMMANDS, build_parser, main
from launching import launch_ok
from test_train_cli import csv_data, tiny_bert  # noqa: F401  (fixtures)

README = Path(__file__).resolve().parent.parent / "README.md"
LAUNCHER = "-m boft_triton.cli"


def _command_lines(text: str) -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    candidates = [line for block in blocks for line in block.splitlines()]
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    candidates += re.findall(r"`([^`\n]+)`", prose)
    found = []
    for line in candidates:
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("boft-triton ") or part == "boft-triton" or LAUNCHER in part:
                found.append(part)
            elif " boft-triton " in f" {part} ":  # after environment assignments (HF_HUB_OFFLINE=1 ...)
                found.append(part[part.index("boft-triton"):])
    return list(dict.fromkeys(found))


COMMAND_LINES = _command_lines(README.read_text())


def _argv(line: str, fixtures: dict[str, str]) -> list[str]:
    """The ``boft-triton`` arguments of a README line, placeholders filled in."""
    rest = line.split(LAUNCHER, 1)[1] if LAUNCHER in line else line.removeprefix("boft-triton")
    rest = rest.replace("[", " ").replace("]", " ").replace("...", " ")
    return [fixtures.get(word, word) for word in shlex.split(rest)]


def test_readme_shows_every_command():
    shown = {_argv(line, {})[0] for line in COMMAND_LINES}
    assert shown == set(COMMANDS), f"README shows {sorted(shown)}; the CLI has {sorted(COMMANDS)}"


def test_readme_merge_line_is_the_real_synopsis():
    assert "boft-triton merge ADAPTER --output-dir OUT [--model BASE]" in COMMAND_LINES


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_readme_command_parses(line, tmp_path):
    fixtures = {"ADAPTER": str(tmp_path / "adapter"), "OUT": str(tmp_path / "out"), "BASE": str(tmp_path / "base")}
    args = build_parser().parse_args(_argv(line, fixtures))
    assert args.command in COMMANDS


@pytest.fixture(scope="module")
def small(tiny_bert, csv_data, tmp_path_factory):  # noqa: F811
    """Small-size options per command, and the placeholders' fixtures."""
    from transformers import BertConfig

    root = tmp_path_factory.mktemp("readme")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
               vocab_size=64).save_pretrained(root / "tune-bert")
    options = {
        "train": ["--model", str(tiny_bert), "--data", str(csv_data), "--text-column", "review",
                  "--label-column", "sentiment", "--steps", "2", "--batch-size", "8", "--max-length", "16",
                  "--output-dir", str(root / "train"), "--no-progress"],
        "merge": [],
        "tune": ["--model", str(root / "tune-bert"), "--targets", "query,value", "--block-size", "4", "--tokens", "8",
                 "--dtype", "fp32", "--cache", str(root / "tune.json"), "--max-configs", "1"],
        "bench": ["--workload", "tiny-llama", "--batch-size", "1", "--seq-len", "16", "--device", "cpu",
                  "--warmup", "1", "--steps", "1", "--boft", "4x2", "--lora-ranks", "16", "--oft-block-sizes", "",
                  "--methods", "floor,boft_triton-b4-N2", "--output-dir", str(root / "bench"), "--name", "readme",
                  "--no-plots"],
    }
    # ADAPTER: an adapter of the tiny model, trained here so that each test stands alone
    assert main(["train", *options["train"], "--output-dir", str(root / "fixture-run")]) == 0
    fixtures = {"ADAPTER": str(root / "fixture-run" / "adapter"), "OUT": str(root / "merged"), "BASE": str(tiny_bert)}
    return options, fixtures


RUNNABLE = [line for line in COMMAND_LINES if LAUNCHER not in line]


@pytest.mark.parametrize("line", RUNNABLE)
def test_readme_command_runs_on_tiny_fixtures(line, small, tmp_path):
    options, fixtures = small
    argv = _argv(line, fixtures)
    if "--quantize" in argv:
        pytest.importorskip("bitsandbytes")  # the [quant] extra (the GPU image gets it as a carried wheel)
    if "--threads" in argv:
        # In a process of its own: with torch 2.13.0+cpu (MKL 2024.2) a torch.set_num_threads call
        # leaves batched linalg.inv/solve from about 150 wide wrong or failing for the rest of the
        # process, and a later test of this one (b = 160 wide levels) failed with it under xdist.
        launch_ok([sys.executable, "-m", "boft_triton.cli", *argv, *options[argv[0]]], tmp_path)
        return
    assert main(argv + options[argv[0]]) == 0
