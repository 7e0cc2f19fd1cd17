"""``boft-triton train`` checkpoints, resume, divergence, several processes, bf16, accelerate configs.

- A run killed with SIGKILL right after its 2nd checkpoint and resumed gives the losses and adapter of
  an uninterrupted run, bit for bit (CPU, same seed; BOFT dropout on, so RNG state matters, and
  the run crosses an epoch boundary, so the data position matters).
- Damaged, foreign or missing checkpoints are ``error: ...`` and nothing is deleted.
- A NaN loss stops the run before the optimizer step and keeps the last checkpoint.
- ``accelerate launch`` with 2 CPU processes (gloo): identical adapters on both ranks, only the
  trainable parameters all-reduced, and the adapter of a 1-process run with the same global batch.
- A bf16 base model keeps bf16 activations through the adapters and fp32 adapter parameters.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from launching import adapter as _adapter  # noqa: E402
from launching import assert_adapter_matches, assert_resumed_equals_uninterrupted, launch_ok, launch_together  # noqa: E402
from launching import metrics as _metrics  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_train_cli import csv_data, tiny_bert  # noqa: E402,F401  (fixtures)
from tiny_models import rel_err  # noqa: E402

from boft_triton import BOFTConfig, adapt  # noqa: E402
from boft_triton.cli import train_state  # noqa: E402
from boft_triton.cli import main  # noqa: E402
from boft_triton.layer import BOFTLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _argv(tiny_bert, data, out, *extra, steps=8):
    return ["train", "--model", str(tiny_bert), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--steps", str(steps), "--batch-size", "8", "--lr", "1e-2",
            "--max-length", "16", "--block-size", "4", "--dropout", "0.25", "--eval-size", "4",
            "--output-dir", str(out), "--no-progress", *extra]


def _cli(args):
    return [sys.executable, "-m", "boft_triton.cli", *args]


def _run(cmd, cwd, **env):
    """A full command line, or the arguments of ``python -m boft_triton.cli``; must succeed."""
    return launch_ok(cmd if cmd[0] not in ("train", "merge") else _cli(cmd), cwd, **env)


# ----------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_bert, csv_data, tmp_path_factory):
    """(uninterrupted run, killed-then-resumed run) output folders; 8 steps of 6 per epoch."""
    root = tmp_path_factory.mktemp("resume")
    ref, run = root / "ref", root / "run"
    # the killed run SIGKILLs itself right after checkpoint 2 (step 4) is complete: no timing window;
    # the uninterrupted run goes alongside
    (ref_code, ref_log), (code, log) = launch_together([
        (_cli(_argv(tiny_bert, csv_data, ref)), root, {}),
        (_cli(_argv(tiny_bert, csv_data, run, "--save-every", "2")), root,
         {"BOFT_TRITON_DEBUG_KILL_AFTER_CHECKPOINT": "4"})])
    assert ref_code == 0, ref_log[-4000:]
    assert code == -signal.SIGKILL, log[-4000:]
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000004"
    _run(_argv(tiny_bert, csv_data, run, "--save-every", "2", "--resume"), root)
    return ref, run


def test_resumed_run_is_bit_identical(killed_and_resumed):
    ref, run = killed_and_resumed
    assert_resumed_equals_uninterrupted(ref, run, "step-000004")
    m_ref, m_run = _metrics(ref), _metrics(run)
    assert m_run["accuracy_after"] == m_ref["accuracy_after"]
    # checkpoints 6 and 8 were written after the resume; 2 was pruned (keep 2)
    names = [p.name for p in train_state.list_checkpoints(run / "checkpoints")]
    assert names == ["step-000006", "step-000008"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_checkpoint_holds_what_resume_needs(killed_and_resumed):
    _, run = killed_and_resumed
    ckpt = run / "checkpoints" / "step-000008"
    state = train_state.verify(ckpt)
    assert state["step"] == 8 and len(state["losses"]) == 8
    assert {p.name for p in ckpt.iterdir()} == {
        "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt", "state.json", "manifest.json", "adapter"}
    assert {p.name for p in (ckpt / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))  # PEFT's keys, same values
    assert adapter and all(k.startswith("base_model.model.") and ".default" not in k for k in adapter)
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    assert any(k.endswith("boft_R.default") for k in tensors)
    assert any(".modules_to_save." in k for k in tensors)
    assert not any(k.endswith("query.base_layer.weight") for k in tensors)  # frozen: not saved


def _error(capsys, argv, code=2):
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_damaged_checkpoint_is_an_error_and_kept(killed_and_resumed, tiny_bert, csv_data, tmp_path, capsys):
    import shutil

    _, run = killed_and_resumed
    out = tmp_path / "run"
    shutil.copytree(run / "checkpoints", out / "checkpoints")
    victim = out / "checkpoints" / "step-000008" / "trainable.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    err = _error(capsys, _argv(tiny_bert, csv_data, out, "--resume"))
    assert "step-000008 is damaged: trainable.safetensors has" in err and "truncated" in err
    assert "step-000006" in err  # names the good one to resume from instead
    assert victim.exists() and train_state.verify(out / "checkpoints" / "step-000006")["step"] == 6
    (out / "checkpoints" / "step-000006" / "manifest.json").unlink()
    err = _error(capsys, _argv(tiny_bert, csv_data, out, "--resume", str(out / "checkpoints" / "step-000006")))
    assert "incomplete or damaged" in err


def test_foreign_or_missing_checkpoint_is_an_error(killed_and_resumed, tiny_bert, csv_data, tmp_path, capsys):
    _, run = killed_and_resumed
    err = _error(capsys, _argv(tiny_bert, csv_data, run, "--resume", "--lr", "5e-3"))
    assert "different run setup" in err and "lr: checkpoint 0.01, this run 0.005" in err
    err = _error(capsys, _argv(tiny_bert, csv_data, run, "--resume", "--block-size", "8"))
    assert "block_size: checkpoint 4, this run 8" in err
    err = _error(capsys, _argv(tiny_bert, csv_data, tmp_path / "fresh", "--resume"))
    assert "no checkpoint under" in err
    err = _error(capsys, _argv(tiny_bert, csv_data, tmp_path, "--resume", str(tmp_path)))
    assert "not a checkpoint" in err
    assert train_state.verify(run / "checkpoints" / "step-000008")["step"] == 8  # untouched


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_bert, csv_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOFT_TRITON_DEBUG_NAN_STEP", "3")
    out = tmp_path / "run"
    err = _error(capsys, _argv(tiny_bert, csv_data, out, "--save-every", "2", steps=4), code=1)
    assert "training loss became nan at step 3" in err
    assert "last good checkpoint is" in err and "step-000002" in err
    assert train_state.verify(out / "checkpoints" / "step-000002")["step"] == 2
    assert not (out / "adapter").exists()
    monkeypatch.delenv("BOFT_TRITON_DEBUG_NAN_STEP")
    assert main(_argv(tiny_bert, csv_data, out, "--save-every", "2", "--resume", steps=4)) == 0
    assert _metrics(out)["training"]["resumed_from"].endswith("step-000002")


# ----------------------------------------------------------------------------- two processes


def test_ddp_two_processes_match_one_process(tiny_bert, csv_data, tmp_path):
    """Per-process batch 4 on 2 processes vs batch 8 on 1: accelerate deals the seeded sampler's
    batches of 4 round-robin, so each step sees the same 8 examples. Not bit-identical: each rank
    pads its own batch to its own longest text, so the GEMMs have other shapes (float rounding)."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",  # a free port
              "-m", "boft_triton.cli"]
    _run(launch + _argv(tiny_bert, csv_data, ddp, "--dropout", "0", "--batch-size", "4", steps=4),
         tmp_path, ACCELERATE_USE_CPU="1")
    assert main(_argv(tiny_bert, csv_data, single, "--dropout", "0", steps=4)) == 0
    m, m1 = _metrics(ddp), _metrics(single)
    assert m["training"]["num_processes"] == 2 and m["training"]["global_batch_size"] == 8
    assert m["distributed"]["type"] == "MULTI_CPU"
    replicas = m["distributed"]["replicas"]
    assert replicas["identical"] and len(replicas["sha256_per_process"]) == 2
    # DDP's reducer holds exactly the trainable parameters (adapters + head), no frozen weight
    assert m["distributed"]["all_reduced"]["elements"] == m["adapter"]["trainable_params"]
    assert m1["distributed"]["all_reduced"] is None
    torch.testing.assert_close(torch.tensor(m["losses"]), torch.tensor(m1["losses"]), rtol=1e-5, atol=1e-6)
    assert_adapter_matches(ddp, single, 1e-5)
    assert m["dataset"]["test_size"] == m1["dataset"]["test_size"] == 4  # gathered, not per rank


# ----------------------------------------------------------------------------- bf16


def _tiny_models(tiny_bert):
    """The tiny BERT with larger initial weights (initializer_range 0.2: with BERT's 0.02 the
    encoder's adapter gradients are ~1e-8, rounding noise in bf16), in fp32 and as a bf16 copy,
    carrying the same random adapter and head."""
    import copy

    config = transformers.AutoConfig.from_pretrained(str(tiny_bert), num_labels=2, initializer_range=0.2)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config)
    boft = BOFTConfig(target_modules=["query", "key", "value"], boft_block_size=4, init_weights=False,
                      modules_to_save=["classifier"])
    torch.manual_seed(0)
    fp32 = adapt(copy.deepcopy(base), boft)
    torch.manual_seed(0)
    bf16 = adapt(copy.deepcopy(base).to(torch.bfloat16), boft)
    return fp32, bf16


def test_bf16_base_keeps_bf16_activations_and_fp32_adapters(tiny_bert, monkeypatch):
    from test_train_cli import _inputs

    from boft_triton import ops

    fp32, bf16 = _tiny_models(tiny_bert)
    seen, butterfly = [], ops.butterfly

    def check(module, args, output):
        seen.append(("layer", args[0].dtype, output.dtype))

    def recording_butterfly(x, Q, transpose=False):
        out = butterfly(x, Q, transpose)
        seen.append(("rotation", x.dtype, out.dtype))
        return out

    hooks = [m.register_forward_hook(check) for m in bf16.modules() if isinstance(m, BOFTLayer)]
    batch = _inputs(tiny_bert)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    with monkeypatch.context() as mp:
        mp.setattr(ops, "butterfly", recording_butterfly)
        out16 = bf16(**batch, labels=labels)
    out32 = fp32(**batch, labels=labels)
    for h in hooks:
        h.remove()
    # 6 adapted layers: the rotated activations and the layer outputs stay bf16 (no fp32 promotion)
    assert sorted(seen) == [("layer", torch.bfloat16, torch.bfloat16)] * 6 + [("rotation", torch.bfloat16, torch.bfloat16)] * 6
    assert out16.logits.dtype == torch.bfloat16
    out16.loss.backward()
    out32.loss.backward()
    # the adapter adds no error of its own beyond what the bf16 base model has anyway
    with torch.no_grad(), bf16.disable_adapter(), fp32.disable_adapter():
        base_err = rel_err(bf16(**batch).logits.float(), fp32(**batch).logits)
    err = rel_err(out16.logits.float(), out32.logits)
    # (each adapted layer rounds its rotated input to bf16 once more: measured 3.5e-2 against the
    # base model's own 2.1e-2 on these reviews, a deep chain at initializer_range 0.2)
    assert err < 2.5 * base_err, (err, base_err)
    grads32 = {n: p.grad for n, p in fp32.named_parameters() if p.requires_grad}
    g16, g32 = [], []
    for name, p in bf16.named_parameters():
        if "boft_" in name:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name
            g16.append(p.grad.flatten())
            g32.append(grads32[name].flatten())
    # over all adapter gradients together: some layers' gradients are ~1e-10 on this tiny random
    # model, pure rounding noise in either dtype, so a per-tensor relative error says nothing
    assert rel_err(torch.cat(g16), torch.cat(g32)) < 5e-2


def test_cli_bf16_base_model(tiny_bert, csv_data, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny_bert, csv_data, out, "--base-dtype", "bf16", steps=6)) == 0
    m = _metrics(out)
    assert m["training"]["base_dtype"] == "bf16"
    assert all(torch.isfinite(torch.tensor(m["losses"])))
    orth = m["orthogonality"]
    assert orth["adapted_layers"] == 6 and orth["blocks"] == 6 * 8
    assert 0 < orth["max_abs_QtQ_minus_I_per_block"] < 1e-5
    assert m["merge_check"]["passed"]
    adapter = _adapter(out)
    assert all(v.dtype == torch.float32 for k, v in adapter.items() if "boft_" in k)


# ----------------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize("name", ["accelerate_ddp.yaml", "accelerate_fsdp2.yaml"])
def test_accelerate_config_files_parse(name, monkeypatch):
    """Through accelerate's own loader and `accelerate launch`'s argument merge; the FSDP2 file
    must also build accelerate's FSDP plugin from the environment launch would set."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    path = ROOT / "configs" / name
    config = load_config_from_file(str(path))
    assert config.num_machines == 1 and config.mixed_precision == "no"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    env = prepare_multi_gpu_env(args)
    if name == "accelerate_ddp.yaml":
        assert config.distributed_type == "MULTI_GPU" and args.multi_gpu and not args.use_fsdp
        return
    assert config.distributed_type == "FSDP" and args.use_fsdp
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["BertLayer"]
    assert plugin.reshard_after_forward is True
