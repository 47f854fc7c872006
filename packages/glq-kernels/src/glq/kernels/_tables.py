"""Kernel-side packing of GLQ stage tables.

The storage contract (shared with ``glq.lattice``, which this package does not import):

* 16-bit stage: code ``c`` (int16 bit pattern, read as unsigned). ``pattern = c >> 7`` indexes
  ``abs`` (512, 8) >= 0; bit ``j`` of ``c & 127`` set makes coordinate ``j`` (0..6) negative;
  coordinate 7 is negative iff ``parity(c & 127) XOR parity[pattern]``.
* 8-bit stage: code (uint8) indexes a free table ``table`` (256, 8).
* Each stage has a scalar ``scale``; a row's weights are ``row_scale[r] * sum_s scale_s *
  decode_s(code_s)``.

Packing folds three things into one (S, 512, 8) float32 table so a kernel does one lookup and at
most four XORs per code:

1. the stage scale (multiplied in),
2. ``parity[pattern]`` (stored as the sign of coordinate 7, so the kernel only XORs in
   ``parity(c & 127)``),
3. a global ``gain``: every table is divided by the largest magnitude over all stages, so the
   fp16/bf16 copies the kernels read stay far from overflow and subnormals whatever the stage
   scales are; the kernels multiply ``gain`` back in with the row scale.

8-bit stages fill rows 0..255 of their slot; rows 256..511 are zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Stage bit-widths, in storage order, of each supported rate (bits per weight).
RATE_STAGES: dict[int, tuple[int, ...]] = {
    2: (16,),
    3: (16, 8),
    4: (16, 16),
    5: (16, 16, 8),
    6: (16, 16, 16),
    7: (16, 16, 16, 8),
    8: (16, 16, 16, 16),
}

PACK_VERSION = 1


def _field(stage: Any, name: str, default: Any = None) -> Any:
    if isinstance(stage, Mapping):
        return stage.get(name, default)
    return getattr(stage, name, default)


@dataclass(frozen=True, eq=False)
class PackedTables:
    """Stage tables packed for the kernels (see the module docstring for the layout).

    Attributes:
        bits: stage bit-widths in storage order, e.g. ``(16, 8)`` for 3 bpw.
        values: (S, 512, 8) float32, scale and parity folded in, divided by ``gain``.
        gain: positive float the kernels multiply into the row scale.
        version: packing layout version.
    """

    bits: tuple[int, ...]
    values: torch.Tensor
    gain: float
    version: int = PACK_VERSION
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(self.bits) not in RATE_STAGES.values():
            raise ValueError(
                f"stage bits {tuple(self.bits)} form no supported rate; expected one of {sorted(RATE_STAGES.values())}"
            )
        if self.values.shape != (len(self.bits), 512, 8) or self.values.dtype != torch.float32:
            raise ValueError(
                f"expected values (S={len(self.bits)}, 512, 8) float32 rather than "
                f"{tuple(self.values.shape)} {self.values.dtype}"
            )
        if not (self.gain > 0):
            raise ValueError(f"gain must be positive, got {self.gain}")

    @property
    def rate(self) -> int:
        """Bits per weight."""
        return sum(self.bits) // 8

    def table(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """The (S, 512, 8) table in ``dtype`` on ``device``, converted once and cached."""
        key = (dtype, torch.device(device))
        t = self._cache.get(key)
        if t is None:
            t = self.values.to(device=device, dtype=dtype).contiguous()
            self._cache[key] = t
        return t

    def to(self, device: torch.device | str) -> PackedTables:
        return PackedTables(self.bits, self.values.to(device), self.gain, self.version)


def pack_tables(stages: Sequence[Any], scales: Sequence[float] | None = None) -> PackedTables:
    """Pack per-stage codebook tables for :func:`glq.kernels.matmul`.

    Args:
        stages: one entry per stage, in storage order; an object or a mapping with ``bits``
            (16 or 8), and ``abs`` (512, 8) + ``parity`` (512,) for 16-bit stages or ``table``
            (256, 8) for 8-bit stages; optionally ``scale`` (float, default 1).
        scales: per-stage scales overriding any ``scale`` the stages carry.

    Returns:
        :class:`PackedTables`.
    """
    if scales is not None and len(scales) != len(stages):
        raise ValueError(f"got {len(scales)} scales for {len(stages)} stages")
    bits = tuple(int(_field(s, "bits")) for s in stages)
    if bits not in RATE_STAGES.values():
        raise ValueError(f"stage bits {bits} form no supported rate; expected one of {sorted(RATE_STAGES.values())}")
    values = torch.zeros(len(stages), 512, 8, dtype=torch.float64)  # (S, 512, 8)
    for i, (b, stage) in enumerate(zip(bits, stages, strict=True)):
        scale = float(scales[i] if scales is not None else _field(stage, "scale", 1.0))
        if b == 16:
            a = torch.as_tensor(_field(stage, "abs")).detach().to("cpu", torch.float64)
            par = torch.as_tensor(_field(stage, "parity")).detach().to("cpu", torch.int64)
            if a.shape != (512, 8) or par.shape != (512,):
                raise ValueError(
                    f"stage {i}: expected abs (512, 8) and parity (512,) rather than "
                    f"{tuple(a.shape)} and {tuple(par.shape)}"
                )
            if bool((a < 0).any()):
                raise ValueError(f"stage {i}: abs patterns must be non-negative")
            v = a * scale
            v[:, 7] = torch.where(par.bool(), -v[:, 7], v[:, 7])
            values[i] = v
        else:
            t = torch.as_tensor(_field(stage, "table")).detach().to("cpu", torch.float64)
            if t.shape != (256, 8):
                raise ValueError(f"stage {i}: expected table (256, 8) rather than {tuple(t.shape)}")
            values[i, :256] = t * scale
    peak = float(values.abs().max())
    gain = peak if peak > 0 and torch.isfinite(values).all() else 1.0
    if not torch.isfinite(values).all():
        raise ValueError("stage tables or scales contain inf or nan")
    return PackedTables(bits, (values / gain).to(torch.float32), gain)
