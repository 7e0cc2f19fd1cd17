"""FSDP2 through ``boft-triton train`` on 2 CPU processes (gloo); the Trainers and the own loop
under FSDP2 are in ``test_trainer_engines.py``.

accelerate picks FSDP only on accelerator devices, so ``distributed/fsdp2_on_cpu.py`` makes that one
decision for CPU processes (everything else is the CLI's, accelerate's and torch's own code: the
repository's ``configs/accelerate_fsdp2.yaml`` configures accelerate's FSDP2 plugin, ``prepare``
shards every BertLayer with ``fully_shard``, parameters are DTensors). Checked here:

- the sharded CLI run gives the adapter a one-process run gives on the same global batch;
- killed (SIGKILL right after checkpoint 4) and resumed, it gives the uninterrupted run's losses and
  adapter bit for bit; the checkpoint holds each process's DCP shards, not a gathered copy;
- its adapter loads in PEFT and in boft_triton and merges with ``boft-triton merge``; an unsharded
  run refuses its checkpoint.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from launching import adapter as _adapter  # noqa: E402
from launching import assert_adapter_matches, assert_resumed_equals_uninterrupted, launch  # noqa: E402
from launching import metrics as _metrics  # noqa: E402
from test_train_cli import csv_data, tiny_bert  # noqa: E402,F401  (fixtures)
from test_train_resume import _argv, _error  # noqa: E402
from tiny_models import rel_err  # noqa: E402

from boft_triton import BOFTModel  # noqa: E402
from boft_triton.cli import main, train_state  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHIM = ROOT / "tests" / "distributed" / "fsdp2_on_cpu.py"
CONFIG = ROOT / "configs" / "accelerate_fsdp2.yaml"


def _launch(cmd, cwd, **env):
    return launch(cmd, cwd, ACCELERATE_USE_CPU="1", **env)


def _torchrun(*args):
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *map(str, args)]


def _fsdp2_train(argv):
    return _torchrun(SHIM, CONFIG, *argv)


@pytest.fixture(scope="module")
def fsdp2_runs(tiny_bert, csv_data, tmp_path_factory):
    """Output folders of: an uninterrupted FSDP2 run, one killed after checkpoint 4 and resumed
    (8 steps, 6 per epoch, dropout on: RNG state and data position matter), and one process on
    the same global batch of 8."""
    root = tmp_path_factory.mktemp("fsdp2")
    ref, run, single = root / "ref", root / "run", root / "single"
    per_process = ("--save-every", "2", "--batch-size", "4")
    code, log = _launch(_fsdp2_train(_argv(tiny_bert, csv_data, ref, *per_process)), root)
    assert code == 0, log[-6000:]
    code, killed_log = _launch(_fsdp2_train(_argv(tiny_bert, csv_data, run, *per_process)), root,
                               BOFT_TRITON_DEBUG_KILL_AFTER_CHECKPOINT="4")
    assert code != 0 and "Signal 9 (SIGKILL)" in killed_log, killed_log[-6000:]
    after_kill = {"latest": (run / "checkpoints" / "latest").read_text().strip(),
                  "metrics": (run / "metrics.json").exists(), "adapter": (run / "adapter").exists()}
    code, log = _launch(_fsdp2_train(_argv(tiny_bert, csv_data, run, *per_process, "--resume")), root)
    assert code == 0, log[-6000:]
    assert main(_argv(tiny_bert, csv_data, single, "--save-every", "2")) == 0
    return {"ref": ref, "run": run, "single": single, "after_kill": after_kill}


def test_fsdp2_run_is_sharded_and_matches_one_process(fsdp2_runs):
    m, m1 = _metrics(fsdp2_runs["ref"]), _metrics(fsdp2_runs["single"])
    assert m["distributed"]["type"] == "FSDP" and m["training"]["num_processes"] == 2
    assert m["training"]["global_batch_size"] == m1["training"]["global_batch_size"] == 8
    assert "skipped" in m["merge_check"]  # sharded weights are not merged in place
    assert m["orthogonality"]["adapted_layers"] == 6
    # fp32; other GEMM shapes per rank (each pads its own batch): rounding only, measured 1.8e-6
    torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(m1["losses"]), rtol=1e-5, atol=1e-6)
    assert_adapter_matches(fsdp2_runs["ref"], fsdp2_runs["single"], 1e-5)
    assert "base_model.model.classifier.weight" in _adapter(fsdp2_runs["ref"])  # the head (modules_to_save)


def test_fsdp2_killed_and_resumed_is_bit_identical(fsdp2_runs):
    ref, run = fsdp2_runs["ref"], fsdp2_runs["run"]
    assert fsdp2_runs["after_kill"] == {"latest": "step-000004", "metrics": False, "adapter": False}
    assert_resumed_equals_uninterrupted(ref, run, "step-000004")
    assert [p.name for p in train_state.list_checkpoints(run / "checkpoints")] == ["step-000006", "step-000008"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    ckpt = run / "checkpoints" / "step-000008"
    state = train_state.verify(ckpt)  # the manifest covers the DCP files too
    assert state["layout"] == "dcp" and state["fingerprint"]["engine"] == "fsdp"
    # each process's shards and the DCP index; no gathered trainable.safetensors / optimizer.pt
    assert {p.name for p in ckpt.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.pt", "rng-1.pt",
                                                "scheduler.pt", "state.json", "manifest.json", "adapter"}
    # and the adapter, gathered, in PEFT's format: what the finished run writes at that step
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp2_adapter_loads_in_peft_and_boft_triton_and_merges(fsdp2_runs, tiny_bert, tmp_path):
    import peft
    from test_train_cli import _inputs

    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    adapter = fsdp2_runs["ref"] / "adapter"
    ours = BOFTModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    batch = _inputs(tiny_bert)
    with torch.no_grad():
        got, want = ours(**batch).logits, theirs(**batch).logits
    assert rel_err(got, want) < 1e-5
    with torch.no_grad(), ours.disable_adapter():
        assert rel_err(ours(**batch).logits, want) > 1e-3  # the adapter (and its head) did something
    # the run skipped its in-run merge check (sharded weights); the saved adapter merges offline
    assert main(["merge", str(adapter), "--output-dir", str(tmp_path / "merged"), "--model", str(tiny_bert)]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert rel_err(merged(**batch).logits, want) < 1e-5


def test_unsharded_run_refuses_an_fsdp2_checkpoint(fsdp2_runs, tiny_bert, csv_data, capsys):
    err = _error(capsys, _argv(tiny_bert, csv_data, fsdp2_runs["run"], "--resume", "--batch-size", "4"))
    assert "different run setup" in err and "engine: checkpoint 'fsdp', this run None" in err
