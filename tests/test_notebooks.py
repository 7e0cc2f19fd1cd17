"""The notebooks run top to bottom (small mode) on the test interpreter, and are committed clean."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "bench" / "results"
NAMES = ["quickstart", "benchmarks", "diffusion_dreambooth"]


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    """A ``python3`` kernel spec that runs this very interpreter, first on JUPYTER_PATH."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(str(root / "kernels" / "python3"))
    spec = json.loads((root / "kernels" / "python3" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return root


def _fixture_results(folder: Path) -> Path:
    """A small schema-valid results file, for a checkout without measured results."""
    from boft_triton.bench.training_step import KIND, SCHEMA, add_ratios, baselines, memory_metric

    def row(method, family, label, step_ms, rss, saved, **config):
        return {"method": method, "label": label, "family": family, "config": config, "status": "ok",
                "reason": None, "workload": "tiny-llama", "step_ms": step_ms, "step_ms_all": [step_ms],
                "tokens_per_s": 64 / step_ms * 1e3, "trainable_params": 1000, "saved_activations_mib": saved,
                "rss_peak_growth_mib": rss, "rss_at_step_start_mib": 500.0, "peak_mem_mib": None,
                "peak_mem_growth_mib": None, "losses": [7.7, 7.6], "loss_first": 7.7, "loss_last": 7.6}

    rows = add_ratios([
        row("floor", "floor", "floor (frozen base)", 10.0, 5.0, 3.0),
        row("peft-lora-r16", "lora", "LoRA r16", 12.0, 5.5, 3.2, r=16),
        row("peft-boft-b4-N1", "boft", "PEFT BOFT b4 N1", 30.0, 12.0, 8.0, impl="peft"),
        row("boft_triton-b4-N1", "boft", "ours b4 N1", 14.0, 6.0, 3.5, impl="boft_triton"),
        {"method": "boft_triton-b12-N2", "label": "ours b12 N2", "family": "boft", "config": {},
         "status": "skipped", "reason": "boft_block_size=12 does not divide 256"},
    ])
    payload = {
        "schema": SCHEMA, "kind": KIND,
        "environment": {"device": "CPU (fixture)", "device_type": "cpu", "torch": "x", "transformers": "x",
                        "peft": "x", "commit": None, "date": "2026-01-01"},
        "workload": {"name": "tiny-llama", "description": "fixture", "batch_size": 2, "seq_len": 32,
                     "tokens": 64, "dtype": "fp32", "targets": ["q_proj", "v_proj"]},
        "settings": {"warmup": 1, "steps": 1, "lr": 1e-3},
        "memory_metric": memory_metric(rows), "baselines": baselines(rows), "rows": rows,
    }
    path = folder / "cpu-2026-01-01-fixture.json"
    path.write_text(json.dumps(payload))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("BOFT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # steadier on a shared 2-core machine
    monkeypatch.setenv("BOFT_BENCH_FIGURES", str(tmp_path / "figures"))
    if name == "benchmarks" and not any(RESULTS.glob("*.json")):
        monkeypatch.setenv("BOFT_BENCH_RESULTS", str(_fixture_results(tmp_path)))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if name == "benchmarks":
        assert sorted(p.suffix for p in (tmp_path / "figures").iterdir()) == [".png", ".png"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs"
