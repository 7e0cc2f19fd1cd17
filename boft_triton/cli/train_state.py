"""Checkpoints of a ``boft-triton train`` run: write atomically, find, verify, load.

Layout under ``--output-dir``::

    checkpoints/step-000040/
        trainable.safetensors   every trainable tensor (adapters, modules_to_save) by name
        optimizer.pt            optimizer state
        (FSDP: __<rank>_0.distcp and .metadata, the DCP save of both, instead of these two; see
        :mod:`~boft_triton.cli.sharded_state`)
        scheduler.pt            learning-rate scheduler state
        rng-<rank>.pt           python / numpy / torch (/ cuda) RNG states of each process
        deepspeed/              under DeepSpeed, instead of trainable.safetensors and optimizer.pt:
                                DeepSpeed's own checkpoint (trainable tensors, optimizer partitions)
        adapter/                the adapter in PEFT's format (adapter_config.json,
                                adapter_model.safetensors): loads in PEFT or boft_triton as it is,
                                under every engine (gathered under FSDP / ZeRO-3); resume reads
                                the files above, not this
        state.json              step, losses so far, and the run's fingerprint (what must match)
        manifest.json           size and sha256 of every other file, written last
    checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is built in ``checkpoints/.tmp-step-NNNNNN`` and renamed into place only once every
file (and the manifest) is on disk; ``latest`` is then replaced atomically and only then are older
checkpoints pruned, so a kill at any moment leaves the previous good checkpoint and a ``latest``
that points at a complete one. The data position needs no file: the sampler is seeded per epoch
(accelerate's seedable sampler), so ``step`` fixes the epoch and the batches to skip.

Only the main process writes, except ``rng-<rank>.pt`` (every process writes its own) and, under
FSDP or DeepSpeed, each process's own shards or partitions. A filesystem shared by every machine
(at the same path) is assumed: each process checks that it sees the temporary folder before
writing into it, and that it sees the checkpoint it is to resume from, and the processes agree
(:mod:`rank_agreement`), so a machine that cannot see them stops the whole run with that message
instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

from . import rank_agreement, sharded_state
from .errors import CLIError

FORMAT = 1
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.json"
TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
ADAPTER = "adapter"


class CheckpointError(CLIError):
    """A checkpoint that cannot be resumed from: missing, damaged or from another run setup."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


# ----------------------------------------------------------------------------- trainable state


def trainable_tensors(model) -> dict[str, Any]:
    """name -> detached CPU copy of every trainable parameter of the (unwrapped) model."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            if hasattr(t, "full_tensor"):  # a DTensor (sharded); every process must call
                t = t.full_tensor()
            out[name] = t.to("cpu", copy=True).contiguous()
    return out


def trainable_signature(model) -> dict[str, list[int]]:
    # a ZeRO-3 parameter's own shape is empty
    from ..deepspeed_support import full_shape

    return {n: list(full_shape(p)) for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- save


def save(accelerator, model, optimizer, scheduler, output_dir, step: int, losses: list[float],
         fingerprint: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; every process must call. Returns its final path."""
    import torch
    from safetensors.torch import save_file

    from . import engines

    root = checkpoint_root(output_dir)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    main = accelerator.is_main_process
    unwrapped = accelerator.unwrap_model(model)
    sharded = sharded_state.is_sharded(accelerator)
    deepspeed = engines.owns_optimizer(model)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed run
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _check_every_rank_sees(tmp, main)
    if deepspeed:  # every process writes its partitions
        engines.save_deepspeed_checkpoint(model, tmp)
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if sharded:  # every process writes its own shards; nothing is gathered
        sharded_state.save(unwrapped, optimizer, tmp)
    if hasattr(unwrapped, "save_pretrained"):  # PEFT files too (every process calls: FSDP / ZeRO-3 gather)
        unwrapped.save_pretrained(tmp / ADAPTER, is_main_process=main)
    accelerator.wait_for_everyone()
    if main:
        if not (sharded or deepspeed):
            save_file(trainable_tensors(unwrapped), str(tmp / TENSORS))
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER)
        state = {"format": FORMAT, "step": step, "losses": losses, "fingerprint": fingerprint,
                 "trainable": trainable_signature(unwrapped)}
        if sharded:
            state["layout"] = sharded_state.LAYOUT
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())  # DeepSpeed's files sit in a folder
        for p in files:
            _fsync_file(p)
        manifest = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        trash = None
        if final.exists():  # the same step written by an earlier (killed) run: swap it out
            trash = root / f".old-{step_name(step)}-{os.getpid()}"
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, final.name + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        _prune(root, keep, final)
    accelerator.wait_for_everyone()
    _debug_crash_after(step)
    return final


def _check_every_rank_sees(tmp: Path, main: bool) -> None:
    """Every process must see the folder the main process has just created, or none writes."""
    found = rank_agreement.reports({"sees": tmp.is_dir()})
    blind = [r for r in found if not r["sees"]]
    if not blind:
        return
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(
        f"{rank_agreement.where(blind[0])} does not see {tmp.resolve()}, which the main process has just "
        f"created ({len(blind)} of {len(found)} processes do not); {rank_agreement.SHARED_FILESYSTEM_HINT}")


def _debug_crash_after(step: int) -> None:
    """``BOFT_TRITON_DEBUG_KILL_AFTER_CHECKPOINT=k`` (for tests): the process SIGKILLs itself as
    soon as checkpoint k is complete, a crash at a known point with no cleanup, so that a resume
    test needs no race against a running process."""
    if os.environ.get("BOFT_TRITON_DEBUG_KILL_AFTER_CHECKPOINT") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _prune(root: Path, keep: int, newest: Path) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------- find and verify


def resolve_on_every_rank(spec: str, output_dir, fingerprint: dict[str, Any]) -> Path:
    """:func:`resolve`, :func:`verify` and :func:`check_matches` on every process, which then agree
    (a collective): a checkpoint one machine cannot see (or sees damaged, or another one) stops
    every process with that machine's message."""
    path, problem = None, None
    try:
        path = resolve(spec, output_dir)
        check_matches(path, verify(path), fingerprint)
    except CheckpointError as exc:
        problem = str(exc)
    found = rank_agreement.reports({"path": None if path is None else str(path.resolve()), "problem": problem})
    failed = [r for r in found if r["problem"]]
    if failed and len(failed) == len(found) and len({r["problem"] for r in failed}) == 1:
        raise CheckpointError(failed[0]["problem"])  # the same everywhere: no machine to blame
    if failed:
        seen = [r for r in found if not r["problem"]]
        ok = f"; {rank_agreement.where(seen[0])} resumes from {seen[0]['path']}" if seen else ""
        why = failed[0]["problem"].removeprefix("--resume: ")
        raise CheckpointError(
            f"--resume: {rank_agreement.where(failed[0])} cannot resume ({len(failed)} of {len(found)} processes "
            f"cannot){ok}: {why}; {rank_agreement.SHARED_FILESYSTEM_HINT}")
    if len({r["path"] for r in found}) > 1:
        listed = ", ".join(f"{rank_agreement.where(r)}: {r['path']}" for r in found)
        raise CheckpointError(f"--resume: the processes found different checkpoints ({listed}); "
                              f"{rank_agreement.SHARED_FILESYSTEM_HINT}")
    return path


def resolve(spec: str, output_dir) -> Path:
    """``latest`` (under ``output_dir``) or a path: a checkpoint, a ``checkpoints/`` folder, or a
    run's output folder."""
    if spec == LATEST:
        root = checkpoint_root(output_dir)
        return _follow_latest(root, f"--resume: no checkpoint under {root} (train with --save-every N first)")
    path = Path(spec)
    if (path / STATE).is_file() or (path / MANIFEST).is_file():
        return path
    for root in (path, checkpoint_root(path)):
        if (root / LATEST).is_file() or list_checkpoints(root):
            return _follow_latest(root, "")
    raise CheckpointError(f"--resume {spec}: not a checkpoint (no {STATE}) nor a folder holding checkpoints")


def _follow_latest(root: Path, missing: str) -> Path:
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = root / name
        if not name or not target.is_dir():
            raise CheckpointError(
                f"{pointer} names {name!r}, which is not a checkpoint folder; "
                f"{_others(root, None)}")
        return target
    found = list_checkpoints(root)
    if found:
        return found[-1]
    raise CheckpointError(missing or f"no checkpoint under {root}")


def _others(root: Path, exclude: Path | None) -> str:
    others = [p for p in list_checkpoints(root) if p != exclude]
    if not others:
        return "no other checkpoint is there"
    return "other checkpoints there: " + ", ".join(str(p) for p in others) + " (resume with --resume PATH)"


def verify(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; returns the checkpoint's state.json."""
    hint = _others(path.parent, path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged: cannot read {MANIFEST} "
                              f"({type(exc).__name__}); {hint}") from None
    for name, want in sorted(manifest.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing; {hint}")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, "
                                  f"expected {want['bytes']} (truncated?); {hint}")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its "
                                  f"checksum; {hint}")
    state = json.loads((path / STATE).read_text())
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}; this version "
                              f"reads format {FORMAT}")
    return state


def check_matches(path: Path, state: dict[str, Any], fingerprint: dict[str, Any], model=None) -> None:
    """The checkpoint must come from the same run setup (model, data, adapter, batch, schedule)."""
    theirs = state.get("fingerprint", {})
    diffs = [f"{k}: checkpoint {theirs.get(k)!r}, this run {fingerprint.get(k)!r}"
             for k in sorted(set(theirs) | set(fingerprint)) if theirs.get(k) != fingerprint.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different run setup; resume with the same options, "
            f"or start afresh in another --output-dir. Differences: " + "; ".join(diffs))
    if model is None:
        return
    ours = trainable_signature(model)
    if state.get("trainable") != ours:
        theirs_t = state.get("trainable") or {}
        missing = sorted(set(ours) - set(theirs_t))[:3]
        extra = sorted(set(theirs_t) - set(ours))[:3]
        shapes = [n for n in ours if n in theirs_t and theirs_t[n] != ours[n]][:3]
        raise CheckpointError(
            f"checkpoint {path} holds other trainable tensors than this model "
            f"(missing {missing}, unexpected {extra}, other shapes {shapes})")


# ----------------------------------------------------------------------------- load


def load(accelerator, model, optimizer, scheduler, path: Path, fingerprint: dict[str, Any]):
    """Verify and load checkpoint ``path`` into model, optimizer, scheduler and this process's
    RNG; every process must call. Returns ``(step, losses)``."""
    import torch
    from safetensors.torch import load_file

    from . import engines

    unwrapped = accelerator.unwrap_model(model)
    state = verify(path)
    check_matches(path, state, fingerprint, unwrapped)
    sharded = sharded_state.is_sharded(accelerator)
    layout = state.get("layout", "full")
    if layout != (sharded_state.LAYOUT if sharded else "full"):  # the fingerprint catches this first
        raise CheckpointError(f"checkpoint {path} holds {layout} state; this run is "
                              f"{'sharded (FSDP)' if sharded else 'not sharded'}: resume it on the engine that wrote it")
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    deepspeed = engines.owns_optimizer(model)
    if deepspeed != (path / engines.DEEPSPEED_DIR).is_dir():
        raise CheckpointError(f"checkpoint {path} was written {'without' if deepspeed else 'under'} DeepSpeed; "
                              "resume it under the engine that wrote it")
    try:
        if sharded:  # collective: every process reads its own shards
            sharded_state.load(unwrapped, optimizer, path)
            tensors, optim_state = {}, None
        elif deepspeed:  # DeepSpeed's own checkpoint, loaded below
            tensors, optim_state = {}, None
        else:
            tensors = load_file(str(path / TENSORS))
            optim_state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
        sched_state = torch.load(path / SCHEDULER, map_location="cpu", weights_only=True)
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that passed its checksum yet does not load: say which
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint {path} cannot be read: {first}") from None
    params = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    if deepspeed:  # trainable tensors and optimizer partitions: DeepSpeed's own checkpoint
        engines.load_deepspeed_checkpoint(model, path)
    try:
        if optim_state is not None:
            optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(sched_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: optimizer/scheduler state does not fit: {exc}") from None
    _set_rng_state(rng)
    return int(state["step"]), [float(x) for x in state["losses"]]
