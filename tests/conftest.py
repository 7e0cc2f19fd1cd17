import os
import sys

# No hub access in tests: tiny models come from configs, the real one from a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Run from a source tree with PYTHONPATH=. (as on the GPU machine), subprocesses that tests start
# in another folder must still find boft_triton: make the entries absolute.
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        os.path.abspath(entry) if entry else entry for entry in os.environ["PYTHONPATH"].split(os.pathsep)
    )

import pytest  # noqa: E402
import torch  # noqa: E402

# The README runs the suite on pytest-xdist workers, one per core: one thread each, so that two
# workers do not fight over the cores (and two-process launches beside them get theirs).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER is not None:
    torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter. The variable must be set before
# any @triton.jit decorator runs, i.e. before boft_triton.kernels.* is first imported. It only
# takes effect where a test asks for the triton backend (BOFT_TRITON_BACKEND=triton or a direct
# kernel call): on CPU tensors `auto` keeps using the torch path.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_tune_cache(tmp_path_factory):
    """Kernel launches read tiles from ``$BOFT_TRITON_TUNE_CACHE`` or the user's cache: point them
    (and every subprocess) at an empty file of this session's own, never a developer's cache."""
    from boft_triton import tuning

    previous = os.environ.get(tuning.CACHE_ENV)
    os.environ[tuning.CACHE_ENV] = str(tmp_path_factory.mktemp("tune-cache") / "tune.json")
    tuning.clear_memo()
    yield
    if previous is None:
        os.environ.pop(tuning.CACHE_ENV, None)
    else:
        os.environ[tuning.CACHE_ENV] = previous
    tuning.clear_memo()


@pytest.fixture(scope="session", autouse=True)
def _sm90_compile_in_background(request, _private_tune_cache):
    """Start the sm_90/sm_80 compile test's subprocess (a minute of single-threaded compiles) as the
    session begins, where that test is selected, so it runs beside the interpreted tests; the
    test collects its output, and whatever is left running at the end is stopped."""
    import importlib.util

    wanted = [item for item in request.session.items if item.name == "test_kernels_compile_for_sm90"]
    proc = None
    # Under pytest-xdist every worker collects every test but runs only some, and both cores are
    # busy anyway: there the test compiles in its own time, on whichever worker draws it.
    if XDIST_WORKER is None and wanted and importlib.util.find_spec("triton.backends.nvidia") is not None:
        module = wanted[0].module
        proc = module.SM90_COMPILE["proc"] = module.start_sm90_compile()
    yield
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _peft_left_unpatched():
    """Fails a test that leaves ``boft_triton.patch_peft()`` in effect (then restores PEFT), so
    that every other test sees PEFT as installed."""
    yield
    patch = sys.modules.get("boft_triton.integrations.peft_patch")
    if patch is not None and patch.is_patched():
        patch.unpatch_peft()
        pytest.fail("the test left boft_triton.patch_peft() in effect: call unpatch_peft() or use patched_peft()")


@pytest.fixture
def peft_with_butterfly(monkeypatch):
    """PEFT runs N > 1 only with its CUDA extension; on CPU stand its block-diagonal helper in
    with ``torch.block_diag`` so that PEFT's own N > 1 code path is what we compare against."""
    import peft.tuners.boft.layer as peft_boft_layer

    class BlockDiag:
        @staticmethod
        def apply(blocks):  # (N, D, b, b) -> (N, D*b, D*b), what fbd_cuda computes
            return torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])

    monkeypatch.setattr(peft_boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(peft_boft_layer, "FastBlockDiag", BlockDiag)
    return peft_boft_layer


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    """A fresh tuning cache file of the test's own (``$BOFT_TRITON_TUNE_CACHE``), memo cleared."""
    from boft_triton import tuning

    path = tmp_path / "tune.json"
    monkeypatch.setenv(tuning.CACHE_ENV, str(path))
    tuning.clear_memo()
    yield path
    tuning.clear_memo()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist's default distribution (``-n N``): multi-process modules on one worker,
    first (``xdist_groups``); another ``--dist`` is left as asked."""
    if config.getoption("dist") != "load":
        return None
    from xdist_groups import ModuleGroups

    return ModuleGroups(config, log)
