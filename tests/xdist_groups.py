"""How pytest-xdist shares the suite between its workers (the README's ``-n 2``).

Each test is its own unit of work, except:

- the modules that start several processes at once (2-rank DDP, FSDP2, DeepSpeed, two "machines")
  form one unit, so one worker runs them one after another while the other worker runs the
  single-process tests: two launches never share the two cores. xdist hands out the biggest
  units first, so this one (about a third of the suite's time) starts at once rather than last;
- modules whose module-scoped fixtures train or benchmark stay whole on one worker, so each fixture
  runs once.

Units are named from the node id's file, not from markers: the controller sees node ids only (and
xdist's own ``xdist_group`` marks do not reach them under pytest 9.2).
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

MULTIPROCESS = "multiprocess"
MULTIPROCESS_MODULES = frozenset({
    "test_deepspeed.py", "test_distributed.py", "test_fsdp2_resume.py", "test_multi_machine.py",
    "test_train_resume.py", "test_trainer_engines.py",
})
WHOLE_MODULES = frozenset({"test_bench.py", "test_readme_commands.py", "test_train_cli.py"})


def unit(nodeid: str) -> str:
    """The unit of work a test belongs to."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    if module in MULTIPROCESS_MODULES:
        return MULTIPROCESS
    if module in WHOLE_MODULES:
        return module
    return nodeid


class ModuleGroups(LoadScopeScheduling):
    """xdist's scope scheduling (whole units to a worker, biggest first) on ``unit``."""

    def _split_scope(self, nodeid: str) -> str:
        return unit(nodeid)
