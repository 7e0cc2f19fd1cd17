"""``BOFTTrainer``, TRL's ``BOFTSFTTrainer`` and a user's own accelerate loop on 2 CPU processes
(gloo) under three engines: DDP on one machine (torchrun), DDP across two machines (two torchrun
launches of one process each, rendezvous on loopback) and FSDP2 (``fully_shard`` through
accelerate's plugin; ``distributed/fsdp2_on_cpu.py`` makes accelerate's one GPU-only decision).

One launch per engine runs every lifecycle (``distributed/trainer_engines.py``). Checked per
engine and lifecycle:

- checkpoints are PEFT's format, written once by the main process (the Trainers: adapter files, no
  full model; the own loop: ``accelerator.save_state``), and PEFT loads the Trainers' checkpoints;
- resuming from the step-2 checkpoint (``resume_from_checkpoint`` / ``accelerator.load_state``)
  gives the uninterrupted run's adapter bit for bit;
- the adapter is the one a single process computes on the same global batch of 8 (fp32, relative
  error < 1e-5: each process multiplies its own half of the batch, so only rounding differs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from launching import free_port, launch_together  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import rel_err  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "tests" / "distributed" / "trainer_engines.py"
sys.path.insert(0, str(SCRIPT.parent))

import trainer_engines as te  # noqa: E402

ENGINES = ("ddp", "machines", "fsdp2")
PARTS = ("boft", "sft", "loop")


def _commands(engine: str, out: Path) -> list[list[str]]:
    script = [str(SCRIPT), "--engine", "fsdp2" if engine == "fsdp2" else "ddp", str(out)]
    if engine != "machines":
        return [[str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *script]]
    port = str(free_port())  # static rendezvous: machine 0 listens on it, as a head node would
    return [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
             "--master_addr", "127.0.0.1", "--master_port", port, *script] for rank in (0, 1)]


def _launch(engine: str, root: Path) -> dict:
    """Run the engine's launches; returns the main process's result."""
    out = root / "out"
    ended = launch_together([(cmd, root, {"ACCELERATE_USE_CPU": "1"}) for cmd in _commands(engine, out)])
    for i, (code, log) in enumerate(ended):
        assert code == 0, f"{engine}: launch {i}\n{log[-6000:]}"
    return {"out": out, **json.loads((out / "result.json").read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch per engine, made the first time a test asks for it (``-k ddp`` launches one)."""
    found: dict[str, dict] = {}

    def get(engine):
        if engine not in found:
            found[engine] = _launch(engine, tmp_path_factory.mktemp(engine))
        return found[engine]

    return get


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Each lifecycle's adapter after 4 steps on one process, global batch 8, no engine."""
    from test_trainer import CONFIG, _base, _data, _tokenizer

    from boft_triton import BOFTConfig, adapt
    from boft_triton.integrations.transformers import BOFTTrainer
    from boft_triton.integrations.trl import BOFTSFTTrainer

    root = tmp_path_factory.mktemp("single")
    boft = BOFTTrainer(model=adapt(_base(), BOFTConfig(**CONFIG)), args=te.args(root / "boft", 1),
                       train_dataset=_data())
    boft.train()
    sft = BOFTSFTTrainer(model=adapt(te.llama(), BOFTConfig(**te.LLAMA_CONFIG)), args=te.sft_args(root / "sft", 1),
                         train_dataset=te.sft_data(), processing_class=_tokenizer())
    sft.train()
    loop = adapt(_base(), BOFTConfig(**CONFIG))
    optimizer = torch.optim.AdamW([p for p in loop.parameters() if p.requires_grad], lr=1e-2)
    for batch in te.loop_batches():
        te.loop_step(loop, optimizer, batch)
    return {part: {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            for part, model in (("boft", boft.model), ("sft", sft.model), ("loop", loop))}


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_holds_the_model_as_configured(runs, engine):
    result = runs(engine)
    assert result["world"] == 2
    for part in PARTS:
        got = result[part]
        if engine == "fsdp2":
            assert got["distributed_type"] == "DistributedType.FSDP", part
            assert "FSDPModule" in got["model_class"] and got["boft_R_types"] == ["DTensor"], (part, got)
        else:
            assert got["distributed_type"] == "DistributedType.MULTI_CPU", part
            assert got["boft_R_types"] == ["Parameter"], (part, got)


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoints_are_peft_format_and_load_in_peft(runs, engine):
    from test_trainer import _base

    from boft_triton import BOFTModel

    result = runs(engine)
    out = result["out"]
    optimizer = "optimizer.bin" if engine == "fsdp2" else "optimizer.pt"  # accelerate's FSDP name, the Trainer's
    for part in ("boft", "sft"):
        for step in (2, 4):
            files = {p.name for p in (out / part / "full" / f"checkpoint-{step}").iterdir()}
            assert {"adapter_config.json", "adapter_model.safetensors", optimizer, "scheduler.pt"} <= files
            # never the frozen base (and under FSDP2 not the Trainer's gathered pytorch_model_fsdp.bin)
            assert not files & {"pytorch_model_fsdp.bin", "model.safetensors", "pytorch_model.bin"}, (part, files)
            assert any(k.endswith("boft_R") for k in load_file(out / part / "full" / f"checkpoint-{step}" /
                                                               "adapter_model.safetensors"))
    # what accelerator.save_state writes for the own loop: the model (whole; DCP shards under
    # FSDP2), the optimizer and every process's RNG state; the adapter saved by the main process
    files = {p.name for p in (out / "loop" / "full" / "checkpoint-2").iterdir()}
    model_files = {"pytorch_model_fsdp_0", "optimizer_0"} if engine == "fsdp2" else {"model.safetensors",
                                                                                      "optimizer.bin"}
    assert model_files | {"random_states_0.pkl", "random_states_1.pkl"} == files, files
    for name in ("full", "resumed"):
        assert {p.name for p in (out / "loop" / name / "adapter").iterdir()} == {"adapter_config.json",
                                                                                 "adapter_model.safetensors"}
    # the own loop's adapter file is the adapter the run ended with (gathered under FSDP2), in PEFT's keys
    saved, full = load_file(out / "loop" / "full" / "adapter" / "adapter_model.safetensors"), result["loop"]["full"]
    names = {}
    for key in saved:
        name = key.removeprefix("base_model.")
        names[key] = (f"{name}.default" if name.endswith(("boft_R", "boft_s"))
                      else name.replace(".classifier.", ".classifier.modules_to_save.default."))
    assert sorted(names.values()) == sorted(full)
    for key, name in names.items():
        assert torch.equal(saved[key], torch.tensor(full[name])), key
    for part, base, x in (("boft", _base, {"input_ids": torch.randint(1, 64, (2, 8))}),
                          ("sft", te.llama, {"input_ids": torch.randint(2, 64, (2, 8))})):
        folder = str(out / part / "full" / "checkpoint-4")
        ours, theirs = BOFTModel.from_pretrained(base(), folder).eval(), peft.PeftModel.from_pretrained(base(), folder)
        with torch.no_grad():
            assert rel_err(ours(**x).logits, theirs.eval()(**x).logits) < 1e-5, part


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("part", PARTS)
def test_resume_gives_the_uninterrupted_adapter(runs, engine, part):
    got = runs(engine)[part]
    if part != "loop":
        assert got["resumed_step"] == te.STEPS
    assert got["losses"]["resumed"][-te.SAVE_AT:] == got["losses"]["full"][-te.SAVE_AT:]  # exact
    assert got["full"].keys() == got["resumed"].keys()
    for key, value in got["full"].items():
        assert torch.equal(torch.tensor(got["resumed"][key]), torch.tensor(value)), key


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("part", PARTS)
def test_adapter_is_the_one_process_adapter(runs, single, engine, part):
    got, want = runs(engine)[part]["full"], single[part]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert rel_err(torch.tensor(got[key]), value) < 1e-5, key
