"""Self-checks ``boft-triton train`` runs once after training and reports in ``metrics.json``.

- :func:`block_orthogonality`: ``max |Q^T Q - I|`` over every Cayley block ``Q`` of every adapted
  layer. ``M`` is a product of permuted block-diagonal matrices of these blocks, so it is
  orthogonal to the same order; no ``n x n`` matrix is built.
- :func:`replica_digests`: under DDP, a sha256 of each process's trainable tensors, gathered, so
  the run proves that every replica ended with the same adapter.
- :func:`all_reduced_parameters`: the parameters DDP's reducer registered (must be the trainable
  ones only: frozen base weights have ``requires_grad=False`` and are never all-reduced).
"""

from __future__ import annotations

import hashlib
from typing import Any


def block_orthogonality(model) -> dict[str, Any]:
    import torch

    from .. import deepspeed_support as zero
    from .. import ops
    from ..layer import BOFTLayer

    worst, worst_layer, layers, blocks = 0.0, None, 0, 0
    every_R = [R for m in model.modules() if isinstance(m, BOFTLayer) for R in m.boft_R.values()]
    # ZeRO-3: the R tensors (only they) are gathered; every process calls this
    with torch.no_grad(), zero.gather_context(every_R):
        for name, layer in model.named_modules():
            if not isinstance(layer, BOFTLayer):
                continue
            for R in layer.boft_R.values():
                if hasattr(R, "full_tensor"):
                    R = R.full_tensor()
                Q = ops.cayley(R.detach())  # [N, D, b, b], fp32: what training applies
                eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype)
                err = float((Q.transpose(-1, -2) @ Q - eye).abs().amax())
                layers += 1
                blocks += Q.shape[0] * Q.shape[1]
                if not err <= worst:  # NaN wins
                    worst, worst_layer = err, name
    return {"max_abs_QtQ_minus_I_per_block": worst, "worst_layer": worst_layer,
            "adapted_layers": layers, "blocks": blocks, "dtype": "float32",
            "note": "M is a product of permuted block-diagonals of these blocks, so "
                    "max|M^T M - I| is of the same order"}


def trainable_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            t = p.detach()
            if hasattr(t, "to_local"):
                t = t.to_local()
            h.update(name.encode())
            h.update(t.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def replica_digests(accelerator, model) -> dict[str, Any]:
    from accelerate.utils import gather_object

    digests = gather_object([trainable_digest(model)])
    return {"sha256_per_process": digests, "identical": len(set(digests)) == 1}


def all_reduced_parameters(model) -> dict[str, int] | None:
    """Tensors and elements DDP all-reduces, or None when ``model`` is not DDP-wrapped."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return None
    try:
        params, _ = model._build_params_for_reducer()  # what the reducer was built over
    except Exception:  # pragma: no cover - private API moved
        params = [p for p in model.parameters() if p.requires_grad]
    return {"tensors": len(params), "elements": sum(p.numel() for p in params)}
