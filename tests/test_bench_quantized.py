"""``boft-triton bench --quantize``: QBOFT against QLoRA on the same bitsandbytes base (a smoke
run at a tiny size on CPU: the rows and the workload record, not the timings)."""

import argparse
import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from boft_triton.bench import command  # noqa: E402
from boft_triton.bench.training_step import validate  # noqa: E402

METHODS = "floor,peft-lora-r16,peft-boft-b4-N2,boft_triton-b4-N2"


def bench(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([
        "--workload", "tiny-llama", "--batch-size", "1", "--seq-len", "16", "--device", "cpu", "--warmup", "1",
        "--steps", "1", "--boft", "4x2", "--lora-ranks", "16", "--oft-block-sizes", "", "--methods", METHODS,
        "--output-dir", str(tmp_path), "--name", "run", "--no-plots", *extra,
    ])
    assert command.run(args) == 0
    payload = json.loads((tmp_path / "run.json").read_text())
    validate(payload)
    return payload


def test_qlora_and_qboft_rows_on_a_4bit_base(tmp_path):
    payload = bench(tmp_path, "--quantize", "nf4")
    work = payload["workload"]
    assert work["name"] == "tiny-llama-nf4" and work["quantization"] == "nf4"
    rows = {row["method"]: row for row in payload["rows"]}
    assert rows["peft-boft-b4-N2"]["status"] == "skipped"
    assert "does not adapt bitsandbytes layers" in rows["peft-boft-b4-N2"]["reason"]
    for name in ("floor", "peft-lora-r16", "boft_triton-b4-N2"):
        assert rows[name]["status"] == "ok", rows[name].get("reason")
    assert rows["boft_triton-b4-N2"]["loss_last"] < rows["boft_triton-b4-N2"]["loss_first"]
    assert rows["boft_triton-b4-N2"]["ratios"]["peft-lora-r16"]["step_ms"] > 0

    plain = bench(tmp_path / "plain", "--methods", "floor")["workload"]
    assert plain["quantization"] is None
    # 4-bit block linears: the base's weights shrink (embeddings stay fp32, so by less than 8x)
    assert work["base_weights_mib"] < 0.8 * plain["base_weights_mib"]


def test_interleaved_timing_runs_on_a_4bit_base(capsys):
    from boft_triton.bench import interleaved

    assert interleaved.main([
        "--workload", "tiny-llama", "--quantize", "nf4", "--batch-size", "1", "--seq-len", "16", "--boft", "4x2",
        "--lora-ranks", "16", "--methods", "peft-lora-r16,peft-boft-b4-N2,boft_triton-b4-N2", "--rounds", "1",
    ]) == 0
    out = capsys.readouterr().out
    assert "peft-boft-b4-N2: skipped, does not adapt bitsandbytes layers" in out
    assert "tiny-llama-nf4" in out and "boft_triton-b4-N2" in out and "peft-lora-r16" in out
