"""``BOFTTrainer``, TRL's ``BOFTSFTTrainer`` and a user's own accelerate loop on CPU processes
(gloo), under DDP or FSDP2, on one machine or several.

    torchrun --standalone --nproc_per_node 2 trainer_engines.py --engine ddp|fsdp2 OUT
    torchrun --nnodes 2 --node_rank I --nproc_per_node 1 --master_addr ... trainer_engines.py --engine ddp OUT

One launch runs every lifecycle in the same process group (process start-up is what costs, on a
2-core machine). Each lifecycle is a 4-step run checkpointing every 2 steps (OUT/<part>/full), then
a fresh model resumed from its step-2 checkpoint (OUT/<part>/resumed):

- ``boft``: ``BOFTTrainer`` on a tiny BERT (``SEQ_CLS``, the head in ``modules_to_save``);
- ``sft``: ``BOFTSFTTrainer`` on a tiny Llama (``CAUSAL_LM``);
- ``loop``: the user's own loop: ``Accelerator.prepare`` on an ``adapt()``-ed BERT, checkpoints with
  ``accelerator.save_state`` and resume with ``accelerator.load_state``.

The Trainers are configured for FSDP2 the way a GPU user does it (``fsdp=True`` and
``fsdp_config={"fsdp_version": 2, ...}`` in ``TrainingArguments``), the own loop with accelerate's
``FullyShardedDataParallelPlugin``; on CPU accelerate would turn either into plain DDP, so
:mod:`fsdp2_on_cpu` makes accelerate's one GPU-only decision (see there). The main process writes
OUT/result.json with what the test checks: per part, both runs' final adapters (gathered), their
losses, the resumed step, and how the engine held the model (wrapper classes, DTensor or not).
:func:`args`, :func:`sft_args`, :func:`llama` and :func:`loop_batches` are what the test's
one-process runs use too (the same global batch, no DDP or FSDP).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fsdp2_on_cpu import fsdp_on_cpu  # noqa: E402
from test_trainer import CONFIG, _base, _data, _tokenizer  # noqa: E402

from boft_triton import BOFTConfig, adapt  # noqa: E402
from boft_triton.cli.process_group import end_process_group, exit_without_finalizing  # noqa: E402
from boft_triton.integrations.transformers import BOFTTrainer  # noqa: E402

STEPS, GLOBAL_BATCH, SAVE_AT = 4, 8, 2
LLAMA_CONFIG = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], boft_block_size=4)


def _common(world, engine, layer, kw):
    fsdp = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [layer],
                                          "reshard_after_forward": True}} if world > 1 and engine == "fsdp2" else {}
    return {"max_steps": STEPS, "per_device_train_batch_size": GLOBAL_BATCH // world, "learning_rate": 1e-2,
            "report_to": [], "use_cpu": True, "save_strategy": "no", "logging_steps": 1, "seed": 0, "data_seed": 0,
            "dataloader_drop_last": True, **fsdp, **kw}


def args(out, world, engine="fsdp2", **kw):
    import transformers

    # transformers multiplies the loss by the process count when the model's forward takes
    # **kwargs, expecting it to divide by the global item count; BERT's classification loss is
    # a plain mean (with or without BOFT), so that would double its gradients on 2 processes
    kw = {"average_tokens_across_devices": False, **kw}
    return transformers.TrainingArguments(output_dir=str(out), **_common(world, engine, "BertLayer", kw))


def sft_args(out, world, engine="fsdp2", **kw):
    import trl

    # the causal LM loss does divide by the global token count it is given, so TRL's default
    # (average_tokens_across_devices) is what makes 2 processes compute one process's loss
    kw = {"max_length": 12, "dataset_kwargs": {"skip_prepare_dataset": True}, "bf16": False, **kw}
    return trl.SFTConfig(output_dir=str(out), **_common(world, engine, "LlamaDecoderLayer", kw))


def llama():
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, pad_token_id=0, eos_token_id=1))


def sft_data():
    import datasets

    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"input_ids": torch.randint(2, 64, (32, 12), generator=g).tolist()})


def loop_batches():
    """STEPS global batches of GLOBAL_BATCH rows (the Trainer's BERT data, in order)."""
    data = _data()
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    return [(ids[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH], labels[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH])
            for i in range(STEPS)]


def loop_step(model, optimizer, batch, backward=None):
    """One step of the own loop on this process's rows of a global batch."""
    loss = model(input_ids=batch[0], labels=batch[1]).loss
    (backward or torch.Tensor.backward)(loss)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _adapter(model) -> dict[str, list]:
    """Every trainable tensor, whole (gathered from the shards: every process must call)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).tolist()
    return out


def _wrapping(accelerator, model) -> dict:
    """How the engine holds the model: accelerate's type, the wrapper's classes, the adapter's tensors."""
    return {"distributed_type": str(accelerator.distributed_type),
            "model_class": [c.__name__ for c in type(model).__mro__],
            "boft_R_types": sorted({type(p).__name__ for n, p in model.named_parameters() if "boft_R" in n})}


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _fresh_accelerator_state():
    """Each part builds its own Accelerator (the Trainer's or the loop's, each with its FSDP plugin);
    accelerate keeps the first one's state for the whole process otherwise. The process group stays."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def run_trainers(out, world, engine):
    """(boft part, sft part) results: both Trainers' full and resumed runs."""
    from boft_triton.integrations.trl import BOFTSFTTrainer

    result = {}
    for part, make in (
        ("boft", lambda o, **kw: BOFTTrainer(model=adapt(_base(), BOFTConfig(**CONFIG)), train_dataset=_data(),
                                             args=args(o, world, engine, **kw))),
        ("sft", lambda o, **kw: BOFTSFTTrainer(model=adapt(llama(), BOFTConfig(**LLAMA_CONFIG)),
                                               train_dataset=sft_data(), processing_class=_tokenizer(),
                                               args=sft_args(o, world, engine, **kw))),
    ):
        _fresh_accelerator_state()
        full = make(f"{out}/{part}/full", save_strategy="steps", save_steps=SAVE_AT)
        full.train()
        found = {"full": _adapter(full.accelerator.unwrap_model(full.model)), "losses": {"full": _losses(full)},
                 **_wrapping(full.accelerator, full.model)}
        _fresh_accelerator_state()
        resumed = make(f"{out}/{part}/resumed")
        resumed.train(resume_from_checkpoint=f"{out}/{part}/full/checkpoint-{SAVE_AT}")
        found.update(resumed=_adapter(resumed.accelerator.unwrap_model(resumed.model)),
                     resumed_step=resumed.state.global_step)
        found["losses"]["resumed"] = _losses(resumed)
        result[part] = found
        del full, resumed
    return result


def _loop_accelerator(engine):
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    _fresh_accelerator_state()
    plugin = None
    if engine == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["BertLayer"],
                                                reshard_after_forward=True)
    return Accelerator(cpu=True, fsdp_plugin=plugin)


def run_loop(out, engine):
    """The own loop: 4 steps with accelerator.save_state after step 2, then a fresh model, optimizer
    and Accelerator that load_state that checkpoint and run steps 3 and 4."""
    batches = loop_batches()
    found = {"losses": {}}
    for name, start in (("full", 0), ("resumed", SAVE_AT)):
        accelerator = _loop_accelerator(engine)
        rank, world = accelerator.process_index, accelerator.num_processes
        share = GLOBAL_BATCH // world
        model = adapt(_base(), BOFTConfig(**CONFIG))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        if start:
            accelerator.load_state(f"{out}/loop/full/checkpoint-{start}")
        losses = []
        for step in range(start, STEPS):
            rows = tuple(t[rank * share:(rank + 1) * share] for t in batches[step])
            losses.append(loop_step(model, optimizer, rows, accelerator.backward))
            if step + 1 == SAVE_AT and not start:
                accelerator.save_state(f"{out}/loop/full/checkpoint-{SAVE_AT}")
        if not start:
            found.update(_wrapping(accelerator, model))
        found[name] = _adapter(accelerator.unwrap_model(model))
        found["losses"][name] = losses
        boft_model = accelerator.unwrap_model(model)
        boft_model.save_pretrained(f"{out}/loop/{name}/adapter", is_main_process=accelerator.is_main_process)
        del model, optimizer, boft_model
        accelerator.free_memory()
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("ddp", "fsdp2"), required=True)
    parser.add_argument("out")
    cli = parser.parse_args()
    if cli.engine == "fsdp2":
        fsdp_on_cpu()
    world = int(os.environ["WORLD_SIZE"])
    result = run_trainers(cli.out, world, cli.engine)
    result["loop"] = run_loop(cli.out, cli.engine)
    result["world"] = world
    if dist.get_rank() == 0:
        with open(os.path.join(cli.out, "result.json"), "w") as fh:
            json.dump(result, fh)
    if end_process_group():  # FSDP2's gloo threads on torch 2.13: see boft_triton.cli.process_group
        exit_without_finalizing(0)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
