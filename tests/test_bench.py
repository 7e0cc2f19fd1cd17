"""The training-step benchmark end to end on CPU at a tiny size: the machinery, the results JSON
schema, the Markdown and the PNG charts. A smoke test, not a timing assertion.

The runs here are in-process, so they never pass ``--threads``: with torch 2.13.0+cpu (MKL
2024.2), once ``torch.set_num_threads`` has been called, batched ``torch.linalg.inv``/``solve``
of matrices from about 150 wide return wrong values or hang in MKL, and the later tests of the
same process (PEFT parity at b = 160) would see it. ``--threads`` is covered in a subprocess
(``test_readme_commands``)."""

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from boft_triton.bench import command  # noqa: E402
from boft_triton.bench.methods import FLOOR, ours, peft_boft, peft_oft  # noqa: E402
from boft_triton.bench.training_step import validate  # noqa: E402

METHODS = "floor,peft-lora-r16,peft-boft-b4-N2,peft-boft-patched-b4-N2,boft_triton-b4-N2,boft_triton-b12-N2"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([
        "--workload", "tiny-llama", "--batch-size", "1", "--seq-len", "16", "--device", "cpu",
        "--warmup", "1", "--steps", "1", "--boft", "4x2,12x2", "--lora-ranks", "16", "--oft-block-sizes", "",
        "--methods", METHODS, "--output-dir", str(out), "--name", "smoke", "--strict",
    ])
    assert command.run(args) == 0
    return out


def test_results_json_follows_the_schema(bench_run):
    payload = json.loads((bench_run / "smoke.json").read_text())
    validate(payload)
    assert payload["workload"]["name"] == "tiny-llama"
    assert payload["workload"]["tokens"] == 16
    assert payload["environment"]["device_type"] == "cpu"
    assert {k: payload["settings"][k] for k in ("warmup", "steps", "lr")} == {"warmup": 1, "steps": 1, "lr": 1e-3}
    assert payload["baselines"] == ["floor", "peft-lora-r16"]
    assert [r["method"] for r in payload["rows"]] == METHODS.split(",")
    status = {r["method"]: r["status"] for r in payload["rows"]}
    assert status.pop("boft_triton-b12-N2") == "skipped"
    assert set(status.values()) == {"ok"}


def test_rows_carry_times_memory_ratios_and_losses(bench_run):
    payload = json.loads((bench_run / "smoke.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    skipped = rows.pop("boft_triton-b12-N2")
    assert "does not divide 256" in skipped["reason"]
    for name, r in rows.items():
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0, name
        assert len(r["step_ms_all"]) == 1 and len(r["losses"]) == 3, name  # warm-up, timed, memory step
        assert r["saved_activations_mib"] > 0, name
        assert r["peak_mem_mib"] is None, name  # CPU run
        if payload["environment"]["cpu_rss_note"] is None:
            assert r["rss_peak_growth_mib"] is not None and r["rss_peak_growth_mib"] >= 0, name
        assert set(r["ratios"]) == {"floor", "peft-lora-r16"}, name
    assert rows["floor"]["ratios"]["floor"]["step_ms"] == pytest.approx(1.0)
    assert rows["peft-lora-r16"]["ratios"]["peft-lora-r16"]["saved_activations_mib"] == pytest.approx(1.0)
    assert rows["floor"]["trainable_params"] == 0  # no head on a causal LM: nothing to train
    # The two BOFT implementations train the same parameters...
    assert rows["peft-boft-b4-N2"]["trainable_params"] == rows["boft_triton-b4-N2"]["trainable_params"]
    # ...and every adapter starts at the identity, so the first loss is the floor's for all.
    first = rows["floor"]["loss_first"]
    for name, r in rows.items():
        assert r["loss_first"] == pytest.approx(first, rel=1e-5), name
    assert rows["boft_triton-b4-N2"]["loss_last"] == pytest.approx(rows["peft-boft-b4-N2"]["loss_last"], rel=1e-4)
    # PEFT under patch_peft(): PEFT's parameters and training, boft_triton's compute.
    patched = rows["peft-boft-patched-b4-N2"]
    assert patched["config"]["impl"] == "peft+patch_peft"
    assert patched["trainable_params"] == rows["peft-boft-b4-N2"]["trainable_params"]
    assert patched["losses"] == pytest.approx(rows["peft-boft-b4-N2"]["losses"], rel=1e-4)
    # ...and it ran patched: no dense n x n rotation saved for backward (an exact byte count).
    assert patched["saved_activations_mib"] < 0.5 * rows["peft-boft-b4-N2"]["saved_activations_mib"]


def test_the_patched_peft_row_runs_under_patch_peft_and_leaves_peft_unpatched():
    from boft_triton.bench.methods import peft_boft_patched
    from boft_triton.integrations import peft_patch

    method = peft_boft_patched(4, 2)
    with method.context():
        assert peft_patch.is_patched()
    assert not peft_patch.is_patched()


def test_markdown_and_charts_are_written(bench_run):
    table = (bench_run / "smoke.md").read_text()
    assert "| floor |" in table and "| boft_triton-b4-N2 |" in table and "skipped" in table
    for suffix in ("time", "memory"):
        png = bench_run / f"smoke-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_plots_redraw_from_the_json(bench_run, tmp_path):
    from boft_triton.bench.plots import plot_results

    paths = plot_results(bench_run / "smoke.json", tmp_path)
    assert sorted(p.name for p in paths) == ["smoke-memory.png", "smoke-time.png"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"schema": 2}))
    with pytest.raises(ValueError, match="missing"):
        plot_results(broken, tmp_path)


def test_shapes_that_do_not_fit_are_explained():
    from torch import nn

    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(384, 384))
    assert FLOOR.skip_reason(model, ["q_proj"]) is None
    assert ours(4, 4).skip_reason(model, ["q_proj"]) is None
    assert peft_boft(8, 2).skip_reason(model, ["q_proj"]) is None
    assert "does not divide 384" in ours(4, 8).skip_reason(model, ["q_proj"])
    assert "does not divide 384" in peft_oft(256).skip_reason(model, ["q_proj"])
    assert "no module" in ours(4, 1).skip_reason(model, ["v_proj"])


def test_unknown_method_names_are_refused():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--methods", "floor,peft-lora-r7"])
    from boft_triton.cli.errors import CLIError

    with pytest.raises(CLIError, match="peft-lora-r7"):
        command.select_methods(args)


def test_gpu_summary_reads_every_step_and_flags_failures(tmp_path):
    """The table ``bench/gpu_run.sh`` prints last: a timed-out step, a wrong kernel result and a
    failed test are all visible, and the exit status says whether everything passed."""
    from boft_triton.bench import gpu_summary

    (tmp_path / "steps.tsv").write_text("gpu-check\t0\t50\nllama-1b\t124\t120\nkernel-tests\t1\t90\n")
    row = {"op": "butterfly", "impl": "triton", "T": 8, "n": 16, "b": 4, "N": 1, "fwd_ms": 0.5, "fwd_bwd_ms": 1.5,
           "fwd_bw_fraction": 0.8, "bwd_bw_fraction": 0.6, "rel_err": {"y": 2e-3, "dx": 0.5, "dQ": 1e-3},
           "correct": False}
    (tmp_path / "gpu-check-card-2026-11-30.json").write_text(json.dumps(
        {"card": "Card", "torch": "2.11", "triton": "3.6.0", "copy_bandwidth_gbs": 4000.0, "rows": [row]}))
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_kernels" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_kernels" name="test_b"/></testsuite></testsuites>')
    text = gpu_summary.summary(tmp_path)
    assert "llama-1b" in text and "TIMED OUT" in text and "FAILED (exit 1)" in text
    assert "err 5.0e-01  WRONG" in text
    assert "3 tests: 1 failed" in text and "FAILED tests.test_kernels::test_a" in text
    assert "(no training-step results)" in text
    assert gpu_summary.main([str(tmp_path)]) == 1
    (tmp_path / "steps.tsv").write_text("gpu-check\t0\t50\n")
    assert gpu_summary.main([str(tmp_path)]) == 0


def test_gpu_scripts_parse():
    """The device call's scripts are at least valid bash (they run on a machine CI never sees; the
    full dress rehearsal is bench/gpu_preflight.sh)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    for script in ("gpu_run.sh", "gpu_preflight.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(root / "bench" / script)], check=True)


def test_unet_workload_runs_every_method_family(tmp_path):
    """The diffusion workload: a UNet's denoising step with attention and ResNet convs adapted;
    the floor runs the frozen UNet's backward, every method starts from the same loss, and
    boft_triton's BOFT trains the same as PEFT's (same maths)."""
    pytest.importorskip("diffusers")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([
        "--workload", "unet", "--batch-size", "1", "--seq-len", "64", "--device", "cpu", "--warmup", "0",
        "--steps", "1", "--boft", "4x2", "--lora-ranks", "16", "--oft-block-sizes", "",
        "--methods", "floor,peft-lora-r16,peft-boft-b4-N2,boft_triton-b4-N2", "--output-dir", str(tmp_path),
        "--name", "unet", "--strict", "--no-plots",
    ])
    assert command.run(args) == 0
    payload = json.loads((tmp_path / "unet.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert payload["workload"]["tokens"] == 64 and "conv1" in payload["workload"]["targets"]
    assert len({round(r["loss_first"], 6) for r in rows.values()}) == 1
    assert rows["boft_triton-b4-N2"]["losses"] == pytest.approx(rows["peft-boft-b4-N2"]["losses"], rel=1e-5)
    assert rows["floor"]["trainable_params"] == 0 and rows["boft_triton-b4-N2"]["trainable_params"] > 0


def test_conv_widths_are_checked_like_linear_ones():
    from torch import nn

    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(8, 8, 3))  # BOFT rotates 8 x 3 x 3 = 72 inputs
    assert ours(8, 1).skip_reason(model, ["conv1"]) is None
    assert "does not divide 72" in ours(16, 1).skip_reason(model, ["conv1"])


def test_serving_benchmark_runs_every_method_at_every_k(tmp_path, monkeypatch):
    """``boft-triton bench --workload serve``: base, merged, mixed, loop and PEFT LoRA's mixed batch
    at K = 1, 4, 16, timed forward and generate, written as JSON and Markdown. Without
    ``--threads`` the thread count is never touched (see the module docstring)."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--workload", "serve", "--device", "cpu", "--batch-size", "4", "--seq-len", "8",
                              "--steps", "1", "--output-dir", str(tmp_path), "--name", "serve"])
    assert command.run(args) == 0
    assert calls == []
    payload = json.loads((tmp_path / "serve.json").read_text())
    got = {(r["method"], r["K"]) for r in payload["rows"]}
    assert {("base", 0), ("boft merged", 1)} <= got
    assert {(m, k) for m in ("boft mixed", "boft loop", "lora mixed") for k in (1, 4, 16)} <= got
    assert all(r["forward_ms"] > 0 and r["generate_ms"] > 0 for r in payload["rows"])
    assert "| 16 | boft mixed |" in (tmp_path / "serve.md").read_text()


def test_engines_table_gives_ratios_to_lora_per_engine():
    """bench/engines.py's table: per engine, each method's per-rank step time and memory, and its
    ratio to LoRA under the same engine (mean over ranks of the per-rank ratios)."""
    from boft_triton.bench import engines

    rows = [{"engine": e, "method": m, "rank": k, "step_ms": t * (k + 1), "rss_peak_growth_mib": mem}
            for e, m, t, mem in [("ddp", "peft-lora-r16", 100.0, 10.0), ("ddp", "boft_triton-b8-N2", 110.0, 12.0),
                                 ("zero3", "peft-lora-r16", 200.0, 20.0), ("zero3", "boft_triton-b8-N2", 180.0, None)]
            for k in (0, 1)]
    env = {"device": "cpu", "nproc": 2, "torch": "x", "date": "d", "commit": "c"}
    table = engines.markdown(rows, env)
    assert "| ddp | boft_triton-b8-N2 | 110.0 / 220.0 | 12.0 / 12.0 | 1.10x | 1.20x |" in table
    assert "| zero3 | boft_triton-b8-N2 | 180.0 / 360.0 | n/a / n/a | 0.90x | n/a |" in table
