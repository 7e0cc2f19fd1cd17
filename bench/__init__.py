"""Benchmarks of boft_triton, installed as ``boft_triton.bench`` (``boft-triton bench``).

- ``command``: the command line (``python -m boft_triton.bench.command``; ``add_arguments`` and
  ``run`` for ``boft-triton bench``).
- ``training_step``: one training step (forward + backward + AdamW), method against method, in
  one process on one model and batch; the results JSON schema is in its docstring.
- ``methods``: how each method (floor, PEFT LoRA/OFT/BOFT, boft_triton BOFT) is put on a model.
- ``workloads``: the models and batches (MiniLM on reviews, tiny Llama; Llama 1B/3B on a GPU).
- ``plots``: step-time and memory charts (PNG) from a results JSON.
- ``test_micro_ops.py``: pytest-benchmark microbenchmarks of the two ops
  (``python -m pytest bench/test_micro_ops.py --benchmark-only``).

Measured results live in ``results/`` (``<device>-<date>-<workload>.json`` / ``.md`` / ``.png``).
"""
