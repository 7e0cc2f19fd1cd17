"""pytest configuration for the microbenchmarks in this folder (``bench/test_micro_ops.py``)."""

import os
import platform

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the accelerator and the versions in ``--benchmark-json`` output."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["boft_triton"] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "BOFT_TRITON_BACKEND": os.environ.get("BOFT_TRITON_BACKEND", "auto"),
    }
