"""The codebook tables of a GLQ model, held once per model.

A loaded model gets one :class:`GLQTables` submodule named ``glq_tables``; its buffers are the
folder's ``glq_tables.bpw{b}_stage{s}_{abs|parity|table|scale}`` tensors, so loading and
``save_pretrained`` use the folder's own keys. Every GLQ linear of a rate shares one
``glq.kernels.PackedTables`` built from them (a few KiB per rate, converted once per
device and dtype), never a copy per layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from glq.hf import _kernels
from glq.hf.config import TABLES_PREFIX, stage_bits

#: Module attribute (and safetensors key prefix) of the tables on a loaded model.
TABLES_ATTR = TABLES_PREFIX

# name -> (shape, dtype) of each table field as stored in a folder
_FIELDS_16 = {"abs": ((512, 8), torch.float32), "parity": ((512,), torch.uint8), "scale": ((1,), torch.float32)}
_FIELDS_8 = {"table": ((256, 8), torch.float32), "scale": ((1,), torch.float32)}


def table_fields(bits: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Field name -> (shape, dtype) of one stage's stored tables."""
    return _FIELDS_16 if bits == 16 else _FIELDS_8


def buffer_name(bpw: int, stage: int, field: str) -> str:
    return f"bpw{bpw}_stage{stage}_{field}"


class GLQTables(nn.Module):
    """Holds the stored stage tables of every rate a model uses, and packs them for the kernels.

    Args:
        rates: the bits-per-weight values used by the model's layers.
        device: where to create the (empty) buffers; "meta" while transformers builds the model.
    """

    def __init__(self, rates: Iterable[int], device: torch.device | str | None = None):
        super().__init__()
        self.rates = tuple(sorted(set(rates)))
        for bpw in self.rates:
            for s, bits in enumerate(stage_bits(bpw)):
                for field, (shape, dtype) in table_fields(bits).items():
                    self.register_buffer(buffer_name(bpw, s, field), torch.empty(shape, dtype=dtype, device=device))
        self._packed: dict[int, object] = {}

    @classmethod
    def from_stages(cls, stages_by_rate: dict[int, list[dict]]) -> GLQTables:
        """Build from per-rate lists of stage dicts (``bits``, ``abs``/``parity`` or ``table``, ``scale``)."""
        tables = cls(stages_by_rate)
        for bpw, stages in stages_by_rate.items():
            for s, st in enumerate(stages):
                for field in table_fields(int(st["bits"])):
                    value = torch.as_tensor(st[field]).reshape(getattr(tables, buffer_name(bpw, s, field)).shape)
                    getattr(tables, buffer_name(bpw, s, field)).copy_(value)
        return tables

    def stages(self, bpw: int) -> list[dict]:
        """The stored tables of one rate as stage dicts (CPU tensors), as ``pack_tables`` takes them."""
        out = []
        for s, bits in enumerate(stage_bits(bpw)):
            st: dict = {"bits": bits}
            for field in table_fields(bits):
                value = getattr(self, buffer_name(bpw, s, field)).detach().cpu()
                st[field] = float(value[0]) if field == "scale" else value
            out.append(st)
        return out

    def packed(self, bpw: int):
        """The ``glq.kernels.PackedTables`` of one rate, built once and shared by its layers."""
        if bpw not in self.rates:
            raise KeyError(f"the model holds no tables for bpw={bpw}; it has {list(self.rates)}")
        p = self._packed.get(bpw)
        if p is None:
            p = _kernels.pack_tables(self.stages(bpw))
            self._packed[bpw] = p
        return p

    def check(self) -> list[str]:
        """Problems with the loaded values (empty when they are usable): the decode contract needs
        non-negative finite ``abs``, ``parity`` in {0, 1}, finite tables and scales."""
        problems = []
        for bpw in self.rates:
            for s, bits in enumerate(stage_bits(bpw)):
                def get(field, bpw=bpw, s=s):
                    return getattr(self, buffer_name(bpw, s, field)).detach()

                where = f"{TABLES_PREFIX}.{buffer_name(bpw, s, '')}"
                if not bool(torch.isfinite(get("scale")).all()):
                    problems.append(f"{where}scale is not finite: {get('scale').tolist()}")
                if bits == 16:
                    a, par = get("abs"), get("parity")
                    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
                        problems.append(f"{where}abs must be finite and non-negative")
                    if bool((par > 1).any()):
                        bad = sorted(set(par[par > 1].tolist()))[:4]
                        problems.append(f"{where}parity must be 0 or 1, found {bad}")
                elif not bool(torch.isfinite(get("table")).all()):
                    problems.append(f"{where}table is not finite")
        return problems

    def extra_repr(self) -> str:
        return f"rates={list(self.rates)}"
