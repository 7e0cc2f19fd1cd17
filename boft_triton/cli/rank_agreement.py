"""Every process reports what it found, so that all of them take the same decision.

A check that only some processes fail is the dangerous kind: the ones that fail raise and exit,
the others walk on into the next collective and wait there for peers that are gone. Checkpoints
are the usual case on several machines: they assume a filesystem every machine sees at the same
path, and a machine that cannot see the checkpoint (another disk, a missing mount) must stop the
whole run with that message, not leave the rest hanging. :func:`reports` all-gathers each
process's finding (with its rank and host); the caller raises on every process alike.
"""

from __future__ import annotations

import socket
from typing import Any

SHARED_FILESYSTEM_HINT = ("checkpoints must be on a filesystem every machine sees at the same path: put --output-dir "
                          "on shared storage")


def reports(finding: dict[str, Any]) -> list[dict[str, Any]]:
    """``finding`` plus ``rank`` and ``host`` from every process, in rank order (a collective;
    just this process's outside a process group)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    mine = {**finding, "rank": dist.get_rank() if distributed else 0, "host": socket.gethostname()}
    if not distributed or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def where(report: dict[str, Any]) -> str:
    return f"rank {report['rank']} (host {report['host']})"
