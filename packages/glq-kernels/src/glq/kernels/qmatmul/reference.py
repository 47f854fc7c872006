"""Plain-PyTorch reference for the fused GLQ matmul: decode codes to a dense weight, then F.linear.

This is the oracle for the CUDA C and Triton backends and the CPU path. It materialises the
dense (out, in) float32 weight, so it is for checking and for small layers, not for speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _parity7(lo: torch.Tensor) -> torch.Tensor:
    """Parity (0/1) of the popcount of a 7-bit value (int32)."""
    p = lo ^ (lo >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return p & 1


def decode_stage(codes: torch.Tensor, table: torch.Tensor, bits: int) -> torch.Tensor:
    """Decode one stage with a packed table.

    Args:
        codes: (out, in/8) int16 (16-bit stage) or uint8 (8-bit stage).
        table: (512, 8) packed values (scale and parity folded in; see ``_tables``).
        bits: 16 or 8.

    Returns:
        (out, in/8, 8) float32 decoded vectors, in table units.
    """
    t = table.to(device=codes.device, dtype=torch.float32)
    if bits == 8:
        return t[codes.to(torch.int64)]  # (out, in/8, 8)
    c = codes.to(torch.int32) & 0xFFFF  # int16 bit pattern read as unsigned
    v = t[(c >> 7).to(torch.int64)]  # (out, in/8, 8)
    lo = c & 127
    s = lo | (_parity7(lo) << 7)  # sign bits of coordinates 0..7
    shifts = torch.arange(8, device=codes.device, dtype=torch.int32)
    neg = ((s.unsqueeze(-1) >> shifts) & 1).bool()  # (out, in/8, 8)
    return torch.where(neg, -v, v)


def dequantize_reference(
    codes: Sequence[torch.Tensor],
    tables: torch.Tensor,
    row_scale: torch.Tensor,
    bits: Sequence[int],
    gain: float,
) -> torch.Tensor:
    """Dense weight W̃ (out, in) float32 from stage codes.

    Args:
        codes: per stage (out, in/8) int16 / uint8.
        tables: (S, 512, 8) packed tables, any float dtype.
        row_scale: (out,) float32.
        bits: stage bit-widths.
        gain: the packing gain.
    """
    out, groups = codes[0].shape
    w = torch.zeros(out, groups, 8, dtype=torch.float32, device=codes[0].device)
    for s, (c, b) in enumerate(zip(codes, bits, strict=True)):
        w += decode_stage(c, tables[s], b)
    w = w.reshape(out, groups * 8)  # (out, in)
    return w * (row_scale.to(torch.float32) * gain).unsqueeze(1)


def matmul_reference(
    x: torch.Tensor,
    codes: Sequence[torch.Tensor],
    tables: torch.Tensor,
    row_scale: torch.Tensor,
    bits: Sequence[int],
    gain: float,
) -> torch.Tensor:
    """y = x · W̃ᵀ in float32, returned in x's dtype. x: (B, in) -> (B, out)."""
    w = dequantize_reference(codes, tables, row_scale, bits, gain)
    return F.linear(x.to(torch.float32), w).to(x.dtype)
