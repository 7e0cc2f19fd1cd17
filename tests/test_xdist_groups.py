"""The suite's split between pytest-xdist workers (``xdist_groups``) names real modules, and every
module that starts several processes at once is in the multi-process unit."""

import re
from pathlib import Path

import pytest

pytest.importorskip("xdist")
import xdist_groups  # noqa: E402

TESTS = Path(__file__).parent
# How a test module starts several processes at once (tests/launching.py's launchers)
LAUNCHES_SEVERAL = re.compile(r'"--num_processes"|"--nproc_per_node"|launch_together\(')


def test_grouped_modules_exist():
    for name in xdist_groups.MULTIPROCESS_MODULES | xdist_groups.WHOLE_MODULES:
        assert (TESTS / name).is_file(), f"tests/xdist_groups.py names {name}, which is not a test module"


def test_every_multi_process_module_is_in_the_multi_process_unit():
    several = {p.name for p in TESTS.glob("test_*.py") if LAUNCHES_SEVERAL.search(p.read_text())}
    assert several - {Path(__file__).name} == xdist_groups.MULTIPROCESS_MODULES


def test_units():
    assert xdist_groups.unit("tests/test_deepspeed.py::test_x[zero3]") == xdist_groups.MULTIPROCESS
    assert xdist_groups.unit("tests/test_bench.py::test_y") == "test_bench.py"
    assert xdist_groups.unit("tests/test_kernels.py::test_z[a-b]") == "tests/test_kernels.py::test_z[a-b]"
