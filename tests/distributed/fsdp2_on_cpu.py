"""``boft-triton`` under accelerate's FSDP2 plugin on CPU processes (gloo), for tests.

    torchrun --standalone --nproc_per_node 2 fsdp2_on_cpu.py CONFIG.yaml train --cpu ...

accelerate picks FSDP only for accelerator devices: on CPU it turns ``ACCELERATE_USE_FSDP`` into
plain multi-CPU DDP, so the CLI's sharded branch would never run. This shim changes that one
decision and nothing else: it sets the environment ``accelerate launch --config_file CONFIG.yaml``
would set (accelerate's own ``prepare_multi_gpu_env``, so the repository's FSDP2 config file is
what configures the run), and once accelerate has built its state for the CPU processes (gloo,
``MULTI_CPU``) it makes the assignment accelerate makes on GPUs: ``distributed_type = FSDP`` with
the FSDP plugin read from that environment. From there on every line is the CLI's and
accelerate's own: ``prepare`` shards with ``fully_shard`` per transformer block, parameters are
DTensors, gradient clipping, gathers, adapter saves and checkpoints all run sharded.
"""

import functools
import os
import sys


def fsdp_environment(config_file: str) -> dict[str, str]:
    """The FSDP variables ``accelerate launch --config_file CONFIG`` gives its processes."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", config_file, "x.py"]))
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def fsdp_on_cpu() -> None:
    """From now on, an accelerate state built for CPU processes with an FSDP plugin is FSDP."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # MULTI_CPU: the first state of the process; FSDP: a state rebuilt after
        # AcceleratorState._reset_state(), which keeps the PartialState this assignment changed
        cpu_processes = (DistributedType.MULTI_CPU, DistributedType.FSDP)
        if fsdp_plugin is not None and self.distributed_type in cpu_processes and self.device.type == "cpu":
            # what accelerate does for GPUs, in both of its shared states
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def main() -> int:
    config_file, argv = sys.argv[1], sys.argv[2:]
    os.environ.update(fsdp_environment(config_file))
    fsdp_on_cpu()
    from boft_triton.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
