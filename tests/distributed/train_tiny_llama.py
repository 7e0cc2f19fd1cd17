"""Train a BOFT adapter on a tiny Llama for a few steps, on one process or several.

    python train_tiny_llama.py --mode single OUT
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_tiny_llama.py --mode ddp OUT
    torchrun --standalone --nproc_per_node 2 train_tiny_llama.py --mode fsdp2 OUT
    accelerate launch --config_file configs/accelerate_deepspeed_zero3.yaml --num_processes 2 \
        train_tiny_llama.py --mode zero3 --base BASE_DIR OUT          (zero2 likewise)

Every mode trains on the same global batch (each rank on its equal share), so the adapters must
agree. The main process writes OUT/adapter (PEFT format) and OUT/losses.json. The DeepSpeed modes
load the base with from_pretrained from BASE_DIR (the same tiny Llama, saved): under ZeRO-3 with
zero3_init_flag it is partitioned while it loads, and OUT/zero3.json records what the ZeRO-3 run
checked besides (partitioned base, merge refused, adapters loaded into the partitioned model).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tiny_models import llama  # noqa: E402

from boft_triton import BOFTConfig, adapt  # noqa: E402
from boft_triton.cli.process_group import end_process_group, exit_without_finalizing  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 4, 4, 8


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("single", "ddp", "fsdp2", "zero2", "zero3"), required=True)
    parser.add_argument("--base", default=None, help="the tiny Llama saved with save_pretrained (DeepSpeed modes)")
    parser.add_argument("out")
    args = parser.parse_args()
    rank, accelerator = train(args)  # the (wrapped) model and optimizer are gone once it returns
    threads_left = end_process_group(accelerator)
    # every rank reports how it left the process group (the test checks both ranks did)
    os.makedirs(os.path.join(args.out, "ended"), exist_ok=True)
    with open(os.path.join(args.out, "ended", f"rank{rank}"), "w") as fh:
        json.dump({"initialised": dist.is_available() and dist.is_initialized(), "gloo_threads": threads_left,
                   "exit": "without_finalizing" if threads_left else "interpreter_shutdown"}, fh)
    if threads_left:  # torch 2.13 kept the gloo backend alive: see boft_triton.cli.process_group
        exit_without_finalizing(0)


def train(args):
    accelerator = None
    if args.mode.startswith("zero"):
        accelerator = deepspeed_accelerator()  # first: ZeRO-3 partitions the base while it loads
        from transformers import LlamaForCausalLM

        base = LlamaForCausalLM.from_pretrained(args.base)
    else:
        torch.manual_seed(0)
        base = llama()
    partitioned = base_is_partitioned(base)
    torch.manual_seed(1)  # the same random adapter whichever way the base was built
    model = adapt(base, BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=8,
                                   boft_n_butterfly_factor=2, init_weights=False))
    ids = torch.randint(0, 64, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    rank, world, main_process = 0, 1, True
    if args.mode.startswith("zero"):
        # from torch.distributed: accelerate counts 1 process per rank under DeepSpeed on CPU
        # until deepspeed_accelerator() corrected it; the test checks both agree
        rank, world, main_process = dist.get_rank(), dist.get_world_size(), dist.get_rank() == 0
        assert (accelerator.num_processes, accelerator.process_index) == (world, rank)
    elif args.mode == "ddp":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank, world, main_process = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world, main_process = dist.get_rank(), dist.get_world_size(), dist.get_rank() == 0
        for layer in model.model.model.layers:
            fully_shard(layer)  # adapters live inside the sharded blocks, frozen and trainable mixed
        fully_shard(model.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    share = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        batch = ids[step, rank * share:(rank + 1) * share]
        loss = model(input_ids=batch, labels=batch).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    boft_model = accelerator.unwrap_model(model) if accelerator is not None else model
    boft_model.save_pretrained(os.path.join(args.out, "adapter"), is_main_process=main_process)
    if main_process:
        with open(os.path.join(args.out, "losses.json"), "w") as fh:
            json.dump(losses, fh)
    if args.mode in ("fsdp2", "zero3"):
        try:
            boft_model.merge_and_unload()  # refused on every rank alike, before any collective
        except RuntimeError as err:
            if main_process:
                with open(os.path.join(args.out, "merge_error.txt"), "w") as fh:
                    fh.write(str(err))
    if args.mode == "zero3":
        # PEFT's and Trainer's way: a consolidated state dict (a collective; rank 0 gets it), then
        # save_pretrained(state_dict=) on the main process only
        state_dict = model._zero3_consolidated_16bit_state_dict()
        if main_process:
            boft_model.save_pretrained(os.path.join(args.out, "adapter_from_state_dict"), state_dict=state_dict)
        checks = zero3_checks(model, boft_model, os.path.join(args.out, "adapter"))
        if main_process:
            with open(os.path.join(args.out, "zero3.json"), "w") as fh:
                json.dump({"base_partitioned_at_load": partitioned, **checks}, fh)
    return rank, accelerator


def deepspeed_accelerator():
    from accelerate import Accelerator

    from boft_triton.deepspeed_support import fix_accelerate_process_count

    accelerator = Accelerator()  # the DeepSpeed plugin comes from the launch config
    fix_accelerate_process_count()
    # no dataloader is prepared, so DeepSpeed is told the per-process batch
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // dist.get_world_size()
    return accelerator


def base_is_partitioned(base) -> bool:
    """Every q_proj weight is a ZeRO-3 parameter with no local data (the whole base never loaded)."""
    weights = [m.self_attn.q_proj.weight for m in base.model.layers]
    return all(hasattr(w, "ds_id") and w.numel() == 0 for w in weights)


def zero3_checks(engine, boft_model, adapter_dir):
    """Load the saved adapter into the partitioned, trained model two ways and compare logits."""
    from boft_triton import checkpoint

    inputs = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(2))
    engine.eval()
    with torch.no_grad():
        trained = engine(input_ids=inputs).logits
        # 1. as a second adapter (load_adapter), made active
        boft_model.load_adapter(adapter_dir, "reloaded")
        boft_model.set_adapter("reloaded")
        reloaded = engine(input_ids=inputs).logits
        boft_model.set_adapter("default")
        # 2. written into the partitioned trained adapter (gathered, rank 0's copy re-partitioned):
        # the identity adapter (R = 0, s = 1) must give the base model's logits
        weights = checkpoint.read_adapter_weights(adapter_dir)
        identity = {k: torch.zeros_like(v) if k.endswith("boft_R") else torch.ones_like(v) for k, v in weights.items()}
        checkpoint.load_adapter_state_dict(boft_model.model, identity, "default")
        identity_logits = engine(input_ids=inputs).logits
        with boft_model.disable_adapter():
            base_logits = engine(input_ids=inputs).logits
    return {"reloaded_max_abs_diff": float((reloaded - trained).abs().max()),
            "identity_vs_base_max_abs_diff": float((identity_logits - base_logits).abs().max()),
            "trained_vs_base_max_abs_diff": float((trained - base_logits).abs().max())}

if __name__ == "__main__":
    main()
