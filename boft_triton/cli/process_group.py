"""Leaving a multi-process run (gloo on CPU, or any backend) without racing its worker threads.

What raced (torch 2.13, gloo): every collective launched during a backward pass (DDP's gradient
all-reduce, FSDP2's reduce-scatter) keeps the backward's Python context, and FSDP2/DTensor
collectives keep Python-owned tensors. A gloo worker thread drops its reference to a finished
collective a moment after the caller has been told it finished, and dropping the last reference
takes the GIL. So:

- if that rank's main thread had already begun interpreter shutdown (rank 1 has nothing left to
  write, so it gets there first), taking the GIL ends the worker thread with a forced unwind:
  ``terminate called without an active exception``, SIGABRT;
- if the main thread was joining the worker threads while holding the GIL (the process group
  freed from a C++ owner such as DDP's reducer), the two wait for each other for ever.

``end_process_group`` closes both doors. It waits in a barrier (every rank has finished its
collectives and its writes), lets go of every module that holds the group (the caller frees its
DDP-wrapped model before calling, ``accelerator`` drops its own references), and destroys the
group from Python: that destructor releases the GIL and joins the worker threads, so each one
drops its last collective while the interpreter is fully alive, and none is left running.

Cases it cannot join, where torch 2.13 keeps the gloo backend alive in C++ after
``destroy_process_group`` so its threads outlive it (``gloo_threads_left`` says so): once
FSDP2/DTensor functional collectives have used the group; under DeepSpeed (its own groups); and
DDP, depending on C++ object lifetimes alone: no Python object refers to the group any more (a
gc scan finds no ProcessGroup, Work, DDP module or Parameter), yet a bare torch DDP of one Linear
(no accelerate, no deepspeed) leaves 3 gloo threads, and whether a DDP run through accelerate
does flips with the order its objects were created in (having deepspeed importable, which
accelerate then imports, is one such change). ``exit_without_finalizing`` is for all of these: it
flushes and ends the process with its exit code but without the interpreter shutdown those
threads race. Every caller checks the count rather than assuming one engine joins.
"""

from __future__ import annotations

import gc
import os
import sys

# what a collective raises on the survivors when a peer process died or cannot be reached: gloo's
# TCP transport ("Connection reset by peer", "Connection closed by peer", "Broken pipe"), a
# process-group timeout, NCCL's abort after its watchdog found a dead peer. torch raises plain
# RuntimeErrors for most of these, so the message is what tells them from a bug.
_LOST_PEER = ("connection reset by peer", "connection closed by peer", "broken pipe", "timed out",
              "timeout", "communicator was aborted", "connection refused")


def end_process_group(accelerator=None) -> int:
    """Barrier, drop references, destroy the default process group on this rank.

    Call it on every rank, after the last collective and after the caller has deleted its
    references to DDP/FSDP-wrapped models and optimizers. Returns the number of gloo worker
    threads still running afterwards (0 when the backend was joined; see the module docstring).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    dist.barrier()
    if accelerator is not None:
        accelerator.free_memory()  # the prepared (DDP-wrapped) models and optimizers it keeps
    gc.collect()  # modules in reference cycles release the group now, while it is still registered
    dist.destroy_process_group()
    return gloo_threads_left()


def gloo_threads_left() -> int:
    """How many of this process's threads are gloo's (0 where the platform does not say)."""
    names = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
    except OSError:
        return 0
    return sum(name.startswith(("pt_gloo", "gloo")) for name in names)


def exit_without_finalizing(code: int = 0) -> None:
    """Flush and end the process now, skipping interpreter shutdown (see the module docstring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lost_peer(exc: BaseException) -> str | None:
    """The first line of ``exc`` when it says that another process of the run is gone (died,
    killed, unreachable, timed out) during a collective; None for anything else (a bug keeps its
    traceback). Only meaningful while a process group with other processes exists."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if not isinstance(exc, (RuntimeError, getattr(dist, "DistError", RuntimeError))):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first if any(marker in first.lower() for marker in _LOST_PEER) else None


def leave_after_error(code: int) -> None:
    """End this process now with ``code`` when it is part of a process group, else return.

    For an error the CLI reports as one line (every process raises it alike, or a peer is gone):
    a barrier could meet another rank's collective, so the group cannot be left as on success,
    and interpreter shutdown would race gloo's worker threads (see the module docstring): the
    process then ended with SIGABRT instead of the error's exit status.
    """
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        exit_without_finalizing(code)
