"""The one place glq.hf calls glq.kernels, so a kernel API change is a change here only.

``glq.kernels`` picks the backend (CUDA C, Triton, or the plain-PyTorch reference on the CPU)
inside its ``torch.library`` ops; nothing here chooses devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_tables(stages: Sequence[dict]):
    """Per-stage table dicts (bits, abs, parity, table, scale) -> ``glq.kernels.PackedTables``."""
    from glq.kernels import pack_tables as _pack

    return _pack(stages)


def linear(x: torch.Tensor, codes: Sequence[torch.Tensor], tables, row_scale: torch.Tensor,
           signs_in: torch.Tensor, signs_out: torch.Tensor,
           in_blocks: Sequence[int], out_blocks: Sequence[int], tiled: bool = False) -> torch.Tensor:
    """y = signs_out ⊙ H_out(row_scale ⊙ (H_in(signs_in ⊙ x) · W̃ᵀ)), (..., in) -> (..., out).
    tiled: the codes are in glq.kernels' tiled layout (see :func:`tile_codes`)."""
    from glq.kernels import glq_linear

    # check=False: GLQLinear's tensors were checked at load (glq.hf.checks), so the per-call
    # argument checks (~25 us of host time, which eager decoding pays 7 times per block) are skipped.
    return glq_linear(x, codes, tables, row_scale, signs_in, signs_out, in_blocks, out_blocks, check=False,
                      tiled=tiled)


def linear_rotated(xt: torch.Tensor, codes: Sequence[torch.Tensor], tables, row_scale: torch.Tensor,
                   signs_out: torch.Tensor, out_blocks: Sequence[int], tiled: bool = False) -> torch.Tensor:
    """``linear`` from an input already rotated, xt = H_in(signs_in ⊙ x): the same ops in the
    same order, so the result equals ``linear(x, ...)`` bit for bit."""
    from glq.kernels import glq_linear_rotated

    return glq_linear_rotated(xt, codes, tables, row_scale, signs_out, out_blocks, check=False, tiled=tiled)


def dequantize_rotated(codes: Sequence[torch.Tensor], tables, row_scale: torch.Tensor,
                       tiled: bool = False) -> torch.Tensor:
    """diag(row_scale) · W̃ as a dense (out, in) float32 tensor."""
    from glq.kernels import dequantize

    return dequantize(codes, tables, row_scale, tiled=tiled)


def can_tile(out_features: int, in_features: int) -> bool:
    """Whether a layer of this shape has glq.kernels' tiled code layout."""
    from glq.kernels import can_tile as _can_tile

    return _can_tile(out_features, in_features)


def tile_codes(codes: Sequence[torch.Tensor], tiled: bool) -> list[torch.Tensor]:
    """Row-major codes in the tiled layout (tiled=True) or tiled ones back to row-major (False)."""
    from glq.kernels import tile_codes as _tile
    from glq.kernels import untile_codes as _untile

    return (_tile if tiled else _untile)(list(codes))


def wants_tiled_codes(device: torch.device) -> bool:
    """Whether the kernels on ``device`` read tiled codes faster: the CUDA C backend does (12-14% on large
    layers); Triton and the CPU reference read row-major codes."""
    from glq.kernels import select_backend

    return device.type == "cuda" and select_backend(device) == "cuda"


def hadamard(x: torch.Tensor, blocks: Sequence[int], signs: torch.Tensor | None = None,
             out_signs: torch.Tensor | None = None) -> torch.Tensor:
    """out_signs ⊙ H_blockdiag(signs ⊙ x) along the last dim."""
    from glq.kernels import hadamard as _hadamard

    return _hadamard(x, blocks, signs, out_signs)
