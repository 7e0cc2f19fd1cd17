"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, on 2 CPU processes (DeepSpeed's CPU accelerator,
gloo), launched with the shipped configs/accelerate_deepspeed_zero{2,3}.yaml.

Own accelerate loop (tests/distributed/train_tiny_llama.py): the adapter equals a one-process run
on the same global batch; under ZeRO-3 (zero3_init_flag) the base is partitioned while
from_pretrained runs, the adapter is saved whole (gathered) and loads in PEFT and boft_triton,
merging is refused with the recipe, and adapters load into the partitioned model. Tolerances:
relative error 1e-5 for both stages (observed about 5e-7 for ZeRO-2 and 3e-6 for ZeRO-3, which
reduce-scatters the gradients in another order than one process sums them).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import test_train_cli
import torch
from launching import adapter as _adapter
from launching import assert_adapter_matches, assert_resumed_equals_uninterrupted, launch_ok
from launching import metrics as _metrics
from safetensors.torch import load_file
from test_distributed import SCRIPT
from tiny_models import call, llama, rel_err

from boft_triton import BOFTModel

pytest.importorskip("deepspeed")
tiny_bert, csv_data = test_train_cli.tiny_bert, test_train_cli.csv_data  # the CLI tests' fixtures
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOLERANCE = {"zero2": 1e-5, "zero3": 1e-5}


def deepspeed_launch(stage: int) -> list[str]:
    """``accelerate launch`` with the shipped config, 2 processes, a free port."""
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs" / f"accelerate_deepspeed_zero{stage}.yaml"),
            "--num_processes", "2", "--main_process_port", "0"]


@pytest.fixture(scope="module")
def own_loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    torch.manual_seed(0)
    llama().save_pretrained(root / "base")  # the script's single-process base, for from_pretrained
    for mode in ("single", "zero2", "zero3"):
        (root / mode).mkdir()
    launch_ok([sys.executable, str(SCRIPT), "--mode", "single", str(root / "single")], root)
    for stage in (2, 3):
        launch_ok(deepspeed_launch(stage) + [str(SCRIPT), "--mode", f"zero{stage}", "--base", str(root / "base"),
                                        str(root / f"zero{stage}")], root)
    return root


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_zero_adapter_equals_single_process(own_loop, mode):
    assert_adapter_matches(own_loop / mode, own_loop / "single", TOLERANCE[mode])


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_every_rank_leaves_cleanly(own_loop, mode):
    ended = {p.name: json.loads(p.read_text()) for p in (own_loop / mode / "ended").iterdir()}
    assert sorted(ended) == ["rank0", "rank1"]
    assert not any(e["initialised"] for e in ended.values())


def test_zero3_partitions_the_base_and_loads_into_it(own_loop):
    checks = json.loads((own_loop / "zero3" / "zero3.json").read_text())
    assert checks["base_partitioned_at_load"]  # zero3_init_flag: no rank held the whole base
    assert checks["trained_vs_base_max_abs_diff"] > 1e-3  # the adapter does something ...
    assert checks["reloaded_max_abs_diff"] < 1e-6  # ... and load_adapter gives it back
    assert checks["identity_vs_base_max_abs_diff"] < 1e-6  # written into the partitioned adapter


def test_zero3_save_pretrained_with_a_consolidated_state_dict(own_loop):
    """save_pretrained(state_dict=) as PEFT and Trainer call it under ZeRO-3: the same files."""
    gathered, given = _adapter(own_loop / "zero3"), load_file(own_loop / "zero3" / "adapter_from_state_dict" /
                                                              "adapter_model.safetensors")
    assert gathered.keys() == given.keys() and all(torch.equal(gathered[k], given[k]) for k in given)


def test_zero3_merge_is_refused_with_the_recipe(own_loop):
    message = (own_loop / "zero3" / "merge_error.txt").read_text()
    assert "partitioned by DeepSpeed ZeRO-3" in message and "boft-triton merge" in message


def test_zero3_adapter_loads_in_peft_and_boft_triton(own_loop, peft_with_butterfly):
    import peft

    torch.manual_seed(0)
    base = llama()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), own_loop / "zero3" / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), own_loop / "zero3" / "adapter")
    assert rel_err(call(ours, inputs), call(theirs, inputs)) < 1e-5


# ----------------------------------------------------------------------------- boft-triton train


def _cli_argv(tiny_bert, data, out, *extra, batch_size=4):
    """4 steps with a checkpoint every 2, no dropout (the one-process run must draw nothing the
    ranks do not), 4 eval rows."""
    return ["train", "--model", str(tiny_bert), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--steps", "4", "--batch-size", str(batch_size), "--lr", "1e-2",
            "--max-length", "16", "--block-size", "4", "--dropout", "0", "--eval-size", "4", "--save-every", "2",
            "--output-dir", str(out), "--no-progress", *extra]


def _cli_launch(stage, argv, cwd, **env):
    launch_ok(deepspeed_launch(stage) + ["-m", "boft_triton.cli", *argv], cwd, **env)


@pytest.fixture(scope="module")
def cli_runs(tiny_bert, csv_data, tmp_path_factory):
    """One process with batch 8; ZeRO-3 uninterrupted; ZeRO-3 and ZeRO-2 killed (SIGKILL) right
    after the checkpoint of step 2, then resumed. 2 processes x batch 4 = the same global batch."""
    from boft_triton.cli import main

    root = tmp_path_factory.mktemp("deepspeed_cli")
    assert main(_cli_argv(tiny_bert, csv_data, root / "single", batch_size=8)) == 0
    _cli_launch(3, _cli_argv(tiny_bert, csv_data, root / "zero3"), root)
    for stage in (3, 2):
        out = root / f"zero{stage}_resumed"
        with pytest.raises(AssertionError):  # the ranks kill themselves once checkpoint 2 is complete
            _cli_launch(stage, _cli_argv(tiny_bert, csv_data, out), root, BOFT_TRITON_DEBUG_KILL_AFTER_CHECKPOINT="2")
        assert not (out / "adapter").exists()
        _cli_launch(stage, _cli_argv(tiny_bert, csv_data, out, "--resume"), root)
    return root


@pytest.mark.parametrize("run", ["zero3", "zero2_resumed"])
def test_cli_zero_matches_one_process(cli_runs, run):
    assert_adapter_matches(cli_runs / run, cli_runs / "single", TOLERANCE[run[:5]])
    m, m1 = _metrics(cli_runs / run), _metrics(cli_runs / "single")
    # accelerate's CPU count (1 process, every rank the main one) was corrected: DDP's batch and shards
    assert m["training"]["num_processes"] == 2 and m["training"]["global_batch_size"] == 8
    assert m["distributed"]["type"] == "DEEPSPEED" and m["distributed"]["zero_stage"] == int(run[4])
    assert m["dataset"]["test_size"] == m1["dataset"]["test_size"] == 4  # gathered, not per rank
    torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(m1["losses"]), rtol=1e-5, atol=1e-6)


def test_cli_zero3_resume_equals_uninterrupted(cli_runs):
    assert_resumed_equals_uninterrupted(cli_runs / "zero3", cli_runs / "zero3_resumed", "step-000002", steps=4)


def test_cli_zero_checkpoint_is_deepspeeds_own(cli_runs):
    from boft_triton.cli import train_state

    for run in ("zero3", "zero2_resumed"):
        ckpt = cli_runs / run / "checkpoints" / "step-000004"
        train_state.verify(ckpt)  # every file, DeepSpeed's partitions included, against the manifest
        names = {p.name for p in ckpt.iterdir()}
        assert "deepspeed" in names and not {"optimizer.pt", "trainable.safetensors"} & names
        assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()  # PEFT files, adapter gathered
        assert len(list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))) == 2  # one partition per rank


def test_cli_zero_merge(cli_runs, tiny_bert, tmp_path):
    """ZeRO-2 merges a copy in the run (as DDP); ZeRO-3 skips that and the saved adapter merges
    with `boft-triton merge` on one process."""
    import transformers

    from boft_triton.cli import main

    check = _metrics(cli_runs / "zero2_resumed")["merge_check"]
    assert check["passed"] and check["max_abs_logit_diff"] <= check["tolerance"]
    assert _metrics(cli_runs / "zero2_resumed")["distributed"]["replicas"]["identical"]
    assert "ZeRO-3" in _metrics(cli_runs / "zero3")["merge_check"]["skipped"]
    out = tmp_path / "merged"
    assert main(["merge", str(cli_runs / "zero3" / "adapter"), "--model", str(tiny_bert), "--output-dir", str(out)]) == 0
    assert transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).config.id2label


# ----------------------------------------------------------------------------- BOFTTrainer

TRAINER_SCRIPT = Path(__file__).parent / "distributed" / "trainer_tiny_llama.py"


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed_trainer")
    for stage in (2, 3):
        (root / f"zero{stage}").mkdir()
        launch_ok(deepspeed_launch(stage) + [str(TRAINER_SCRIPT), str(root / f"zero{stage}")], root)
    return root


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_trainer_sees_both_processes_and_one_writes(trainer_runs, mode):
    report = json.loads((trainer_runs / mode / "report.json").read_text())
    assert report["world_size"] == report["torch_world_size"] == 2 and report["stage"] == int(mode[-1])
    assert report["should_save_ranks"] == [0]


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_trainer_checkpoints_are_peft_adapters_and_load(trainer_runs, mode, peft_with_butterfly):
    import peft

    checkpoint = trainer_runs / mode / "whole" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names  # never the base model
    torch.manual_seed(0)
    base = llama()  # the script's base model
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), checkpoint)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), checkpoint)
    assert rel_err(call(ours, inputs), call(theirs, inputs)) < 1e-5
    assert rel_err(call(ours, inputs), call(base.eval(), inputs)) > 1e-4  # it did train


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_trainer_resume_equals_uninterrupted(trainer_runs, mode):
    """resume_from_checkpoint loads DeepSpeed's own checkpoint (optimizer partitions) and the
    scheduler; the adapter after step 4 is the uninterrupted run's, bit for bit."""
    assert json.loads((trainer_runs / mode / "report.json").read_text())["resumed_global_step"] == 4
    whole = load_file(trainer_runs / mode / "whole" / "checkpoint-4" / "adapter_model.safetensors")
    resumed = load_file(trainer_runs / mode / "resumed" / "checkpoint-4" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_sft_trainer_checkpoints_load_in_peft_and_resume(trainer_runs, mode, peft_with_butterfly):
    """TRL's BOFTSFTTrainer under ZeRO-2/3 (the same launch as the Trainer's): PEFT-format
    checkpoints that PEFT loads with our outputs, and a resume equal to the uninterrupted run."""
    pytest.importorskip("trl")
    import peft

    root = trainer_runs / mode / "sft"
    assert json.loads((trainer_runs / mode / "report.json").read_text())["sft_resumed_global_step"] == 4
    checkpoint = root / "whole" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names
    torch.manual_seed(0)
    base = llama()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), checkpoint)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), checkpoint)
    assert rel_err(call(ours, inputs), call(theirs, inputs)) < 1e-5
    whole = load_file(root / "whole" / "checkpoint-4" / "adapter_model.safetensors")
    resumed = load_file(root / "resumed" / "checkpoint-4" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_files_parse(stage):
    """Through accelerate's loader and `accelerate launch`'s argument merge."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )

    path = ROOT / "configs" / f"accelerate_deepspeed_zero{stage}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == "DEEPSPEED" and config.num_machines == 1 and config.mixed_precision == "no"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    assert args.use_deepspeed and args.zero_stage == stage and args.gradient_clipping == 1.0
    assert args.zero3_init_flag == (stage == 3)  # the launches above build the plugin from these
