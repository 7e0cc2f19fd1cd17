"""What a new user following README.md tripped on (issue 18, part 1), each pinned by a test."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_in_repo_root(code: str, extra_path: Path | None = None) -> str:
    """Run ``python -c code`` from the repository root, where a new user runs things (sys.path[0]
    is then the root itself)."""
    env = dict(os.environ)
    paths = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_kernels_folder_does_not_shadow_hugging_faces_kernels_package(tmp_path):
    """Run from the repo root, ``import kernels`` must find Hugging Face's ``kernels`` package (a
    stand-in here), not our ``kernels/`` folder, while ``boft_triton.kernels`` still imports."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("HUB_KERNELS = True\n")
    out = _python_in_repo_root(
        "import kernels, importlib; import boft_triton; "
        "kb = importlib.import_module('boft_triton.kernels.butterfly'); "
        "print(getattr(kernels, 'HUB_KERNELS', False), kb.__name__)", site)
    assert out.split() == ["True", "boft_triton.kernels.butterfly"]


def test_transformers_sees_hub_kernels_only_where_they_are_installed():
    """Run from the repo root, transformers' probe for Hugging Face's ``kernels`` answers what is
    installed, not whether a folder called ``kernels`` is on sys.path."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    out = _python_in_repo_root("from transformers.utils.import_utils import is_kernels_available as a; print(a())")
    assert out.strip() == str(installed)


def test_readme_names_what_exists():
    """README's ``with boft_triton.patched_peft():`` and the extras it names for PEFT."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import boft_triton

    assert callable(boft_triton.patched_peft) and "patched_peft" in boft_triton.__all__
    with boft_triton.patched_peft():
        assert boft_triton.integrations.peft_patch.is_patched()
    assert not boft_triton.integrations.peft_patch.is_patched()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("peft", "quant"):
        assert any(req.startswith("peft") for req in extras[extra]), extra
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[peft]"' in readme and "isinstance(model, peft.PeftModel)` is False" in readme


def test_a_boft_model_is_not_a_peft_model_as_readme_says():
    peft = pytest.importorskip("peft")
    from torch import nn

    from boft_triton import BOFTConfig, adapt

    model = adapt(nn.Sequential(nn.Linear(8, 8)), BOFTConfig(target_modules=["0"], boft_block_size=4))
    assert not isinstance(model, peft.PeftModel) and model.base_model is model
