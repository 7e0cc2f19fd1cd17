"""BOFTTrainer and TRL's BOFTSFTTrainer on a tiny Llama under DeepSpeed (launched with
configs/accelerate_deepspeed_zero{2,3}.yaml):

    accelerate launch --config_file configs/accelerate_deepspeed_zero3.yaml --num_processes 2 \\
        trainer_tiny_llama.py OUT

Trains 4 steps with a checkpoint every 2 steps (OUT/whole), then, in the same processes, a fresh
model and trainer resume from OUT/whole/checkpoint-2 (OUT/resumed). The main process writes
OUT/report.json: the process count the Trainer saw, the files of each checkpoint. Then the same
with BOFTSFTTrainer under OUT/sft (whole, resumed), when trl is installed.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tiny_models import llama  # noqa: E402

from boft_triton import BOFTConfig, adapt  # noqa: E402
from boft_triton.cli.process_group import end_process_group, exit_without_finalizing  # noqa: E402
from boft_triton.integrations.transformers import BOFTTrainer  # noqa: E402

SEQ = 8


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.ids = torch.randint(0, 64, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(out):
    import transformers

    torch.manual_seed(0)
    base = llama()
    torch.manual_seed(1)
    model = adapt(base, BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=8, init_weights=False))
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        save_strategy="steps", save_steps=2, logging_steps=1, seed=0, data_seed=0, max_grad_norm=1.0,
        lr_scheduler_type="linear", warmup_steps=1)
    return BOFTTrainer(model=model, args=args, train_dataset=Tokens())


def sft_trainer(out):
    """The same run through TRL: a causal-LM dataset of token ids, SFTConfig's defaults otherwise."""
    import datasets
    import trl

    from test_trainer import _tokenizer  # a word-level tokenizer built in memory (no download)

    from boft_triton.integrations.trl import BOFTSFTTrainer

    torch.manual_seed(0)
    base = llama()
    torch.manual_seed(1)
    model = adapt(base, BOFTConfig(target_modules=["q_proj", "v_proj"], boft_block_size=8, init_weights=False))
    ids = Tokens().ids
    args = trl.SFTConfig(
        output_dir=out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        save_strategy="steps", save_steps=2, logging_steps=1, seed=0, data_seed=0, max_grad_norm=1.0,
        max_length=SEQ, dataset_kwargs={"skip_prepare_dataset": True}, bf16=False)
    return BOFTSFTTrainer(model=model, args=args, processing_class=_tokenizer(),
                          train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}))


def sft(out):
    """BOFTSFTTrainer: 4 steps, then a resume from checkpoint 2; the resumed step on record."""
    first = sft_trainer(os.path.join(out, "whole"))
    first.train()
    del first
    second = sft_trainer(os.path.join(out, "resumed"))
    second.train(resume_from_checkpoint=os.path.join(out, "whole", "checkpoint-2"))
    step = second.state.global_step
    del second
    return step


def main():
    out = sys.argv[1]
    first = trainer(os.path.join(out, "whole"))
    first.train()
    report = {"world_size": first.args.world_size, "process_index": first.args.process_index,
              "torch_world_size": dist.get_world_size(),
              "should_save_ranks": [], "stage": first.accelerator.state.deepspeed_plugin.zero_stage}
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(first.args.should_save))
    report["should_save_ranks"] = [i for i, f in enumerate(flags) if f]
    del first
    second = trainer(os.path.join(out, "resumed"))
    second.train(resume_from_checkpoint=os.path.join(out, "whole", "checkpoint-2"))
    report["resumed_global_step"] = second.state.global_step
    del second
    try:
        import trl  # noqa: F401
    except ImportError:
        pass
    else:
        report["sft_resumed_global_step"] = sft(os.path.join(out, "sft"))
    rank = dist.get_rank()
    if rank == 0:
        with open(os.path.join(out, "report.json"), "w") as fh:
            json.dump(report, fh)
    if end_process_group():  # DeepSpeed keeps gloo threads alive: leave without finalizing
        exit_without_finalizing(0)


if __name__ == "__main__":
    main()
