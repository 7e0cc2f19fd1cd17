"""``boft-triton train`` with DDP across two "machines" on loopback: two ``accelerate launch
--num_machines 2 --machine_rank i`` commands of one CPU process each (gloo), as on two hosts.

A machine's working directory plays its filesystem: ``--output-dir`` is relative, so two
launches in one folder share their checkpoints (a shared filesystem), and a launch in another
folder sees none of them (a machine without the shared mount). Checked here:

- the ranks end with identical adapters; killed and resumed gives the uninterrupted run bit for bit;
- a rank that dies (SIGKILL right after checkpoint 4) makes the other stop with a one-line error
  naming the last complete checkpoint, and leaves no partial checkpoint, adapter or metrics;
- a machine that cannot see the checkpoint to resume from, or the folder a checkpoint is being
  written to, stops every machine with that message (and the partial folder is removed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from launching import assert_resumed_equals_uninterrupted, free_port, launch_together  # noqa: E402
from launching import metrics as _metrics  # noqa: E402
from test_train_cli import csv_data, tiny_bert  # noqa: E402,F401  (fixtures)
from test_train_resume import _argv  # noqa: E402

from boft_triton.cli import train_state  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _two_machines(argv, cwd0: Path, cwd1: Path, env1=None) -> list[tuple[int, str]]:
    """Both machines' (exit code, output)."""
    port = free_port()
    return launch_together([
        ([BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "2",
          "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "boft_triton.cli", *argv],
         cwd, {"ACCELERATE_USE_CPU": "1", **extra})
        for rank, (cwd, extra) in enumerate(((cwd0, {}), (cwd1, env1 or {})))])


@pytest.fixture(scope="module")
def machines(tiny_bert, csv_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("machines")
    shared, elsewhere = root / "shared", root / "elsewhere"
    shared.mkdir()
    elsewhere.mkdir()

    def argv(out, *extra):  # per-process batch 4: the global batch of 8 of the other tests
        return _argv(tiny_bert, csv_data, out, "--save-every", "2", "--batch-size", "4", *extra)

    found = {"shared": shared}
    found["ref"] = _two_machines(argv("ref"), shared, shared)
    found["killed"] = _two_machines(argv("run"), shared, shared, {"BOFT_TRITON_DEBUG_KILL_AFTER_CHECKPOINT": "4"})
    run = shared / "run"
    found["after_kill"] = {"latest": (run / "checkpoints" / "latest").read_text().strip(),
                           "entries": sorted(p.name for p in (run / "checkpoints").iterdir()),
                           "outputs": sorted(p.name for p in run.iterdir()),
                           "verified_step": train_state.verify(run / "checkpoints" / "step-000004")["step"]}
    found["missing"] = _two_machines(argv("run", "--resume"), shared, elsewhere)
    found["unshared_save"] = _two_machines(argv("fresh"), shared, elsewhere)
    found["resumed"] = _two_machines(argv("run", "--resume"), shared, shared)
    return found


def test_two_machines_train_identical_replicas_and_resume_bit_for_bit(machines):
    for name in ("ref", "resumed"):
        for rank, (code, log) in enumerate(machines[name]):
            assert code == 0, f"{name}, machine {rank}:\n{log[-6000:]}"
    ref, run = machines["shared"] / "ref", machines["shared"] / "run"
    m_ref, m_run = _metrics(ref), _metrics(run)
    assert m_ref["training"]["num_processes"] == 2 and m_ref["distributed"]["type"] == "MULTI_CPU"
    assert m_ref["distributed"]["replicas"]["identical"] and m_run["distributed"]["replicas"]["identical"]
    assert_resumed_equals_uninterrupted(ref, run, "step-000004")


def test_a_dying_rank_stops_the_other_with_a_clear_error_and_nothing_half_written(machines):
    (code0, log0), (code1, log1) = machines["killed"]
    assert code1 != 0 and "SIGKILL" in log1, log1[-4000:]
    assert code0 != 0 and "(exitcode: 1)" in log0, log0[-4000:]  # its own error status, not an abort
    assert "error: another process of this run stopped or cannot be reached" in log0, log0[-4000:]
    assert "The last complete checkpoint is run/checkpoints/step-000004" in log0
    assert "Traceback" not in log0.split("error: another process", 1)[0][-2000:]  # one line, not gloo's stack
    after = machines["after_kill"]
    assert after["latest"] == "step-000004"
    assert after["entries"] == ["latest", "step-000002", "step-000004"]  # no .tmp-* left half-written
    assert after["outputs"] == ["checkpoints"]  # no adapter/, metrics.json
    assert after["verified_step"] == 4  # complete: every file matches its manifest


def test_a_machine_without_the_checkpoint_stops_every_machine(machines):
    for rank, (code, log) in enumerate(machines["missing"]):
        # the launcher fails (1) because its process exited with the CLI's error status 2
        assert code != 0 and "(exitcode: 2)" in log, f"machine {rank}:\n{log[-4000:]}"
        assert "error: --resume: rank 1 (host " in log and "cannot resume (1 of 2 processes cannot)" in log, log[-4000:]
        assert "no checkpoint under run/checkpoints" in log
        assert "put --output-dir on shared storage" in log


def test_a_machine_that_cannot_see_the_checkpoint_folder_stops_every_machine(machines):
    for rank, (code, log) in enumerate(machines["unshared_save"]):
        # the launcher fails (1) because its process exited with the CLI's error status 2
        assert code != 0 and "(exitcode: 2)" in log, f"machine {rank}:\n{log[-4000:]}"
        assert "error: rank 1 (host " in log and "does not see" in log and ".tmp-step-000002" in log, log[-4000:]
        assert "put --output-dir on shared storage" in log
    # the main process removed the folder it had begun; nothing else was written
    assert sorted(p.name for p in (machines["shared"] / "fresh" / "checkpoints").iterdir()) == []
