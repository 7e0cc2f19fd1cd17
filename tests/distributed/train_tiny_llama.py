"""Train a BOFT adapter on a tiny Llama for a few steps, on one process or several.

    python train_tiny_llama.py --mode single OUT
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_tiny_llama.py --mode ddp OUT
    torchrun --standalone --nproc_per_node 2 train_tiny_llama.py --mode fsdp2 OUT

Every mode trains on the same global batch (each rank on its equal share), so the adapters must
agree. The main process writes OUT/adapter (PEFT format) and OUT/losses.json.
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
    parser.add_argument("--mode", choices=("single", "ddp", "fsdp2"), required=True)
    parser.add_argument("out")
    args = parser.parse_args()
    rank, accelerator = train(args)  # the (wrapped) model and optimizer are gone once it returns
    threads_left = end_process_group(accelerator)
    # every rank reports how it left the process group (the test checks both ranks did)
    os.makedirs(os.path.join(args.out, "ended"), exist_ok=True)
    with open(os.path.join(args.out, "ended", f"rank{rank}"), "w") as fh:
        json.dump({"initialised": dist.is_available() and dist.is_initialized(), "gloo_threads": threads_left}, fh)
    if threads_left:  # FSDP2 on torch 2.13: see boft_triton.cli.process_group
        exit_without_finalizing(0)


def train(args):
    torch.manual_seed(0)
    model = adapt(llama(), BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=8,
                                      boft_n_butterfly_factor=2, init_weights=False))
    ids = torch.randint(0, 64, (STEPS, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    rank, world, main_process = 0, 1, True
    accelerator = None
    if args.mode == "ddp":
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
    if args.mode == "fsdp2":
        try:
            boft_model.merge_and_unload()  # refused on every rank alike, before any collective
        except RuntimeError as err:
            if main_process:
                with open(os.path.join(args.out, "merge_error.txt"), "w") as fh:
                    fh.write(str(err))
    return rank, accelerator

if __name__ == "__main__":
    main()
