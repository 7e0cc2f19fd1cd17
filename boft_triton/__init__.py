"""boft_triton: BOFT / OFT orthogonal finetuning with PEFT's semantics and checkpoints, on Triton kernels.

    from boft_triton import BOFTConfig, adapt
    model = adapt(model, BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]))

or keep PEFT and let boft_triton compute its BOFT layers: ``boft_triton.patch_peft()``.
"""

from pathlib import Path

from ._source_tree import register_source_subpackage

for _folder in ("kernels", "bench"):
    register_source_subpackage(__name__, Path(__file__).resolve().parent, _folder)

from .config import BOFTConfig  # noqa: E402
from .layer import BOFTLayer, Conv2d, Linear  # noqa: E402
from .model import BOFTModel, adapt  # noqa: E402
from .modules_to_save import ModulesToSaveWrapper  # noqa: E402
from .ops import butterfly, cayley  # noqa: E402
from .hotswap import hotswap_adapter  # noqa: E402
from .integrations.peft_patch import patch_peft, patched_peft, unpatch_peft  # noqa: E402

__all__ = [
    "BOFTConfig",
    "BOFTModel",
    "adapt",
    "BOFTLayer",
    "Linear",
    "Conv2d",
    "ModulesToSaveWrapper",
    "butterfly",
    "cayley",
    "hotswap_adapter",
    "patch_peft",
    "patched_peft",
    "unpatch_peft",
]
__version__ = "0.1.0"
