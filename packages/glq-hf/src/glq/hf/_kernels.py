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
           in_blocks: Sequence[int], out_blocks: Sequence[int]) -> torch.Tensor:
    """y = signs_out ⊙ H_out(row_scale ⊙ (H_in(signs_in ⊙ x) · W̃ᵀ)), (..., in) -> (..., out)."""
    from glq.kernels import glq_linear

    # check=False: GLQLinear's tensors were checked at load (glq.hf.checks), so the per-call
    # argument checks (~25 us of host time, which eager decoding pays 7 times per block) are skipped.
    return glq_linear(x, codes, tables, row_scale, signs_in, signs_out, in_blocks, out_blocks, check=False)


def linear_rotated(xt: torch.Tensor, codes: Sequence[torch.Tensor], tables, row_scale: torch.Tensor,
                   signs_out: torch.Tensor, out_blocks: Sequence[int]) -> torch.Tensor:
    """``linear`` from an input already rotated, xt = H_in(signs_in ⊙ x): the same ops in the
    same order, so the result equals ``linear(x, ...)`` bit for bit."""
    from glq.kernels import glq_linear_rotated

    return glq_linear_rotated(xt, codes, tables, row_scale, signs_out, out_blocks, check=False)


def dequantize_rotated(codes: Sequence[torch.Tensor], tables, row_scale: torch.Tensor) -> torch.Tensor:
    """diag(row_scale) · W̃ as a dense (out, in) float32 tensor."""
    from glq.kernels import dequantize

    return dequantize(codes, tables, row_scale)


def hadamard(x: torch.Tensor, blocks: Sequence[int], signs: torch.Tensor | None = None,
             out_signs: torch.Tensor | None = None) -> torch.Tensor:
    """out_signs ⊙ H_blockdiag(signs ⊙ x) along the last dim."""
    from glq.kernels import hadamard as _hadamard

    return _hadamard(x, blocks, signs, out_signs)
