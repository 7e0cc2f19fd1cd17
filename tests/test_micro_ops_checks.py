"""The microbenchmarks' correctness checks, run as part of the test suite.

``bench/test_micro_ops.py`` checks each op against the dense fp64 reference before timing it;
``--benchmark-disable`` runs every case once and times nothing. It runs in its own pytest so
that the benchmark file keeps its own conftest and options (on CPU the CUDA cases skip).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_micro_ops_results_match_the_dense_reference():
    pytest.importorskip("pytest_benchmark")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(ROOT / "bench" / "test_micro_ops.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
