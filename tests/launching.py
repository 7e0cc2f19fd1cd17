"""How the tests start multi-process runs, and what "resumed equals uninterrupted" means.

Every launch runs in its own session with its output in a file of its working folder: no pipe can
fill and stall a rank, and a hang, caught by the timeout, takes every process of every launch down
with it. Ports are free ones, never fixed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra) -> dict:
    """The environment of a launched run: offline, one thread per process, the source tree first,
    compiled kernels rather than the interpreter, and stacks on a native crash (faulthandler)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def launch_together(launches) -> list[tuple[int, str]]:
    """Start every ``(command, working folder, extra environment)`` at once and wait for all of
    them; returns each one's (exit code, output)."""
    procs, logs = [], []
    try:
        for cmd, cwd, env in launches:
            cwd = Path(cwd)
            logs.append(cwd / f"launch-{len(list(cwd.glob('launch-*.log')))}.log")
            with open(logs[-1], "w") as fh:
                procs.append(subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=run_env(**env), stdout=fh,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def launch(cmd, cwd, **env) -> tuple[int, str]:
    """One launch: (exit code, output)."""
    return launch_together([(cmd, cwd, env)])[0]


def launch_ok(cmd, cwd, **env) -> str:
    """One launch that must succeed; its output, or its tail in the assertion message."""
    code, log = launch(cmd, cwd, **env)
    assert code == 0, log[-12000:]
    return log


def metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def adapter(out) -> dict:
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def assert_resumed_equals_uninterrupted(ref, run, resumed_from: str, steps: int = 8) -> None:
    """A run killed and resumed from ``resumed_from`` has the uninterrupted run's losses and
    adapter, bit for bit (the losses are floats read back from JSON: exact equality)."""
    m_ref, m_run = metrics(ref), metrics(run)
    assert m_run["training"]["resumed_from"].endswith(resumed_from)
    assert len(m_ref["losses"]) == steps and m_run["losses"] == m_ref["losses"]
    a, b = adapter(ref), adapter(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_adapter_matches(out, reference, tolerance: float) -> None:
    """The adapter a run wrote under ``out`` equals ``reference``'s within a relative error
    ``tolerance`` (multi-process against one process: only the order of the sums differs), and
    training moved it (an untrained adapter would match any other)."""
    from tiny_models import rel_err

    got, want = adapter(out), adapter(reference)
    assert got.keys() == want.keys()
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in want.items() if k.endswith("boft_R"))
    for key in want:
        assert rel_err(got[key], want[key]) < tolerance, key
