"""The tiled code layout: a layer's codes permuted so the CUDA kernels read them in whole 16-byte units.

Row-major codes (out_features, in_features / 8) are what a GLQ folder stores and what the quantizer writes. The
CUDA kernels' lanes each decode 8 codes per step: rows g and g + 8 of a 16-row tile, 4 consecutive 8-input groups
of each. On row-major codes that is two 8-byte loads on 16 different cache lines per warp; in the tiled layout
the 16 rows x 16 groups of a (row tile, slice) are 512 contiguous bytes (256 for an 8-bit stage) and a lane's
8 codes are one aligned unit. H200, batch 1, bf16 (scripts/tiled_probe.py; BENCHMARKS.md): 4096x14336 at 2 / 4 /
8 bpw 13.5 -> 11.9, 20.9 -> 17.9, 43.4 -> 37.6 us, same bits.

Element (row, group), row = 16 tile + 8 h + g, group = 16 slice + 4 t + i, moves to
[tile][slice][g][t][h][i]: the same shape and dtype, a pure permutation. Layers need out_features % 16 == 0 and
in_features % 128 == 0 (`can_tile`); others keep row-major codes, which every kernel also reads.
"""

from __future__ import annotations

from torch import Tensor

TILE_ROWS = 16
TILE_GROUPS = 16  # 8-input groups per tile column: 128 inputs


def can_tile(out_features: int, in_features: int) -> bool:
    """Whether a layer's codes have a tiled layout: out_features % 16 == 0 and in_features % 128 == 0."""
    return out_features % TILE_ROWS == 0 and in_features % (8 * TILE_GROUPS) == 0


def _check(c: Tensor, fn: str) -> tuple[int, int]:
    if c.dim() != 2:
        raise ValueError(f"{fn}: codes must be 2-D (out_features, in_features / 8), got shape {tuple(c.shape)}")
    m, groups = c.shape
    if not can_tile(m, groups * 8):
        raise ValueError(
            f"{fn}: codes of shape {tuple(c.shape)} have no tiled layout: it needs out_features % {TILE_ROWS} == 0 "
            f"and in_features % {8 * TILE_GROUPS} == 0 (in_features = 8 x {groups} = {groups * 8})"
        )
    return m, groups


def tile_codes(codes: list[Tensor]) -> list[Tensor]:
    """Each stage's row-major codes (M, K / 8) in the tiled layout (new contiguous tensors, same shape and dtype)."""
    out = []
    for c in codes:
        m, groups = _check(c, "tile_codes")
        t = c.reshape(m // 16, 2, 8, groups // 16, 4, 4).permute(0, 3, 2, 4, 1, 5)
        out.append(t.contiguous().reshape(m, groups))
    return out


def untile_codes(codes: list[Tensor]) -> list[Tensor]:
    """The inverse of `tile_codes`: tiled codes back to row-major (M, K / 8)."""
    out = []
    for c in codes:
        m, groups = _check(c, "untile_codes")
        t = c.reshape(m // 16, groups // 16, 8, 4, 2, 4).permute(0, 4, 2, 1, 3, 5)
        out.append(t.contiguous().reshape(m, groups))
    return out
