"""Benchmarks of boft_triton, installed as ``boft_triton.bench`` (``boft-triton bench``).

``training_step``: one training step (forward + backward + AdamW), method against method, in one
process on one model and batch. ``methods``: how each method (floor, PEFT LoRA/OFT/BOFT,
boft_triton BOFT) is put on a model. Measured results live in ``results/``.
"""
