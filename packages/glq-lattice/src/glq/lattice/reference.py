"""Plain-PyTorch reference decode, using nothing but the tables from ``Codec.tables()``.

This is the oracle a GPU kernel is checked against; it mirrors the decode contract exactly:

* 16-bit stage, code ``c`` (int16 bit pattern, read as unsigned 0..65535)::

      pattern = c >> 7                      # 0..511
      s       = c & 127                     # bit j set: coordinate j (0..6) is negative
      neg7    = popcount(s) & 1 ^ parity[pattern]
      w       = abs[pattern] * (-1)**[neg bits]   # (8,)
      value   = scale * w

* 8-bit stage, code ``c`` (uint8): ``value = scale * table[c]``.

* A codec's 8-vector is the sum of its stages' values, added in stage order in float32:
  ``((scale_0 * w_0) + scale_1 * w_1) + ...``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StageTable:
    """The lookup tables of one stage, float32 on the CPU.

    Attributes:
        bits: 16 (orbit stage: ``abs`` and ``parity`` set, ``table`` None) or 8 (``table`` set,
            ``abs`` and ``parity`` None).
        abs: (512, 8) float32 non-negative abs patterns (16-bit stages).
        parity: (512,) int32 0/1, the parity of the number of negative coordinates (16-bit).
        table: (256, 8) float32 codewords (8-bit stages).
        scale: the stage scale (a float32-representable Python float).

    Table values are float16-representable, so a kernel may hold them in half precision and
    decode the same numbers: 16 KiB (float32) or 8 KiB (float16) per 16-bit stage, 8 or 4 KiB
    per 8-bit stage.
    """

    bits: int
    abs: torch.Tensor | None
    parity: torch.Tensor | None
    table: torch.Tensor | None
    scale: float


def decode_stage(t: StageTable, codes: torch.Tensor) -> torch.Tensor:
    """Decode one stage: (n,) int16 (16-bit) or uint8 (8-bit) codes -> (n, 8) float32."""
    if t.bits == 8:
        assert t.table is not None
        return t.scale * t.table.to(codes.device)[codes.long()]
    assert t.abs is not None and t.parity is not None
    c = codes.to(torch.int32) & 0xFFFF  # int16 bit pattern -> 0..65535
    pattern = c >> 7
    s = c & 127
    j = torch.arange(7, device=codes.device, dtype=torch.int32)
    neg = (s[:, None] >> j) & 1  # (n, 7) sign bits of coordinates 0..6
    neg7 = (neg.sum(1) & 1) ^ t.parity.to(codes.device)[pattern]  # (n,)
    neg = torch.cat([neg, neg7[:, None]], 1)  # (n, 8)
    w = t.abs.to(codes.device)[pattern] * (1 - 2 * neg).to(torch.float32)
    return t.scale * w


def decode(tables: list[StageTable], codes: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Decode a whole code: the stage values summed in stage order. (n, 8) float32."""
    out = decode_stage(tables[0], codes[0])
    for t, c in zip(tables[1:], codes[1:], strict=True):
        out = out + decode_stage(t, c)
    return out
