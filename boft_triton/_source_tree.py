"""Make the top-level ``kernels/`` and ``bench/`` folders importable as ``boft_triton.kernels``
and ``boft_triton.bench`` from a checkout.

Installed wheels ship them under those names (setuptools package-dir mapping) and an editable
install maps them the same way; running straight from the source tree (``PYTHONPATH=.``, as on
the GPU machine) has no such mapping, so this registers the folders under those names. A
top-level module called ``kernels`` is never installed or imported: that name belongs to
Hugging Face's ``kernels`` package.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def register_source_subpackage(package_name: str, package_dir: Path, folder: str) -> None:
    """Import ``<package_name>.<folder>`` from the folder beside the package, unless that name is
    already importable. A folder with an ``__init__.py`` runs it; one without (``kernels/``, which
    must not be a regular top-level package) becomes a package whose modules are its files."""
    name = f"{package_name}.{folder}"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    source = package_dir.parent / folder
    if not source.is_dir():
        return
    init = source / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(source)])
    else:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(source)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)
