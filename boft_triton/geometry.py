"""Block geometry and butterfly permutations of one adapted layer (DESIGN.md section 1).

Everything here is index arithmetic: no dense permutation matrix is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class ButterflyGeometry:
    """Shape of the butterfly rotation acting on an input width ``n``.

    ``block_size`` (b) times ``block_num`` (D) is ``n``; ``n_factors`` (N) butterfly factors, each a
    block-diagonal of D blocks of b x b, conjugated by the permutation of its level.
    """

    n: int
    block_size: int
    block_num: int
    n_factors: int


def _valid_choices(n: int, n_factors: int) -> tuple[list[int], list[int]]:
    """Block sizes and block numbers that satisfy PEFT's rules for width ``n`` and N factors."""
    k = n_factors - 1
    sizes, nums = [], []
    for b in range(1, n + 1):
        if n % b:
            continue
        d = n // b
        if k > 0 and (b % 2 or d % 2 or d % 2**k or n < b * 2**k):
            continue
        sizes.append(b)
        nums.append(d)
    return sizes, sorted(nums)


def resolve_geometry(
    n: int, block_size: int, block_num: int, n_factors: int, layer_name: str = "layer"
) -> ButterflyGeometry:
    """Apply PEFT's checks for one layer of input width ``n``; errors list the choices that fit."""
    if n_factors < 1:
        raise ValueError(
            f"boft_n_butterfly_factor must be a positive integer, got {n_factors}; use 1 for OFT."
        )
    if (block_size == 0) == (block_num == 0):
        raise ValueError(
            "Set exactly one of boft_block_size and boft_block_num to a non-zero value "
            f"(got boft_block_size={block_size}, boft_block_num={block_num})."
        )
    if block_size < 0 or block_num < 0:
        raise ValueError(f"boft_block_size and boft_block_num must be >= 0 (got {block_size}, {block_num}).")
    k = n_factors - 1
    sizes, nums = _valid_choices(n, n_factors)

    def fail(reason: str) -> ValueError:
        hint = (
            f"valid boft_block_size values for this layer: {sizes}; valid boft_block_num values: {nums}"
            if sizes
            else f"no block size fits with boft_n_butterfly_factor={n_factors}; lower the number of factors"
        )
        return ValueError(
            f"{layer_name} (input width {n}): {reason} with boft_n_butterfly_factor={n_factors}; {hint}. "
            "Change the config or exclude this module (exclude_modules)."
        )

    if block_num:
        if n % block_num:
            raise fail(f"boft_block_num={block_num} does not divide {n}")
        if k > 0 and (block_num % 2**k or k > block_num.bit_length() - 1):
            raise fail(f"boft_block_num={block_num} is not a multiple of 2**{k}")
        block_size = n // block_num
    else:
        if n % block_size:
            raise fail(f"boft_block_size={block_size} does not divide {n}")
        if k > 0 and (n < block_size * 2**k or n % (block_size * 2**k)):
            raise fail(f"boft_block_size={block_size} times 2**{k} does not divide {n}")
        block_num = n // block_size
    if k > 0 and (block_num % 2 or block_size % 2):
        raise fail(f"block size {block_size} and block number {block_num} must both be even")
    return ButterflyGeometry(n=n, block_size=block_size, block_num=block_num, n_factors=n_factors)


@lru_cache(maxsize=256)
def _butterfly_perm_cpu(n: int, block_size: int, level: int) -> torch.Tensor:
    idx = torch.arange(n)
    if level == 0:
        return idx
    group = block_size * 2**level
    half = block_size // 2
    chunks_per_group = group // half
    # [groups, chunks, half]: even-indexed chunks first, then the odd-indexed ones.
    order = torch.cat([torch.arange(0, chunks_per_group, 2), torch.arange(1, chunks_per_group, 2)])
    return idx.view(n // group, chunks_per_group, half)[:, order].reshape(n)


def butterfly_perm(n: int, block_size: int, level: int) -> torch.Tensor:
    """``perm_level`` of DESIGN.md on the CPU: ``P[r, perm[r]] = 1``. Level 0 is the identity."""
    return _butterfly_perm_cpu(n, block_size, level)
