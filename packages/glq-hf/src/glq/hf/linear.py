"""``GLQLinear``: a linear layer that computes straight from its stored GLQ codes.

    y = x · Wᵀ (+ bias),   W = diag(signs_out) · H_out · diag(row_scale) · W̃ · H_in · diag(signs_in)

computed in the Hadamard domain, never forming W:

    x' = H_in(signs_in ⊙ x);   y' = row_scale ⊙ (x' · W̃ᵀ);   y = signs_out ⊙ H_out(y')

by ``glq.kernels.glq_linear`` (CUDA C or Triton on a GPU, decode-then-matmul reference on the
CPU). ``dequantize()`` gives W for checks and export.
"""

from __future__ import annotations

import torch
from torch import nn

from glq.hf import _kernels
from glq.hf.config import LayerSpec, stage_bits


class GLQLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding codes, scales and signs at their stored dtypes.

    Buffers (the folder's ``{name}.*`` tensors, same names):
        ``codes_{s}``: (out, in/8) int16 for a 16-bit stage, uint8 for an 8-bit one;
        ``row_scale``: (out,) float32; ``signs_in`` (in,) / ``signs_out`` (out,): int8 ±1 (float16 if fine-tuned);
        ``bias``: (out,) in the model's dtype, when the layer has one.

    Args:
        spec: the layer's entry in the folder's ``quantization_config``.
        bias_dtype: dtype of the bias buffer (the model's dtype when loading).
        device: where to create the empty buffers ("meta" while transformers builds the model).
        tables: the shared ``PackedTables`` of ``spec.bpw``; attach later with :meth:`attach`.
    """

    def __init__(self, spec: LayerSpec, *, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, tables=None):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.bits = stage_bits(spec.bpw)
        out, groups = spec.out_features, spec.in_features // 8
        for s, b in enumerate(self.bits):
            dtype = torch.int16 if b == 16 else torch.uint8
            self.register_buffer(f"codes_{s}", torch.empty(out, groups, dtype=dtype, device=device))  # (out, in/8)
        self.register_buffer("row_scale", torch.empty(out, dtype=torch.float32, device=device))  # (out,)
        signs = getattr(torch, spec.signs_dtype)  # int8 ±1, or float16 with fine-tuned gains
        self.register_buffer("signs_in", torch.empty(spec.in_features, dtype=signs, device=device))  # (in,)
        self.register_buffer("signs_out", torch.empty(out, dtype=signs, device=device))  # (out,)
        if spec.bias:
            self.register_buffer("bias", torch.empty(out, dtype=bias_dtype, device=device))  # (out,)
        else:
            self.bias = None
        self.tables = None
        if tables is not None:
            self.attach(tables)

    @property
    def codes(self) -> list[torch.Tensor]:
        return [getattr(self, f"codes_{s}") for s in range(len(self.bits))]

    def attach(self, tables) -> GLQLinear:
        """Point the layer at its rate's shared ``PackedTables`` and derive its float32 signs.

        The float signs (non-persistent, 4 bytes a feature) spare the kernels an int8 cast per
        call: two extra launches per layer and token in eager decoding.
        """
        if tuple(tables.bits) != self.bits:
            raise ValueError(f"tables have stages {tuple(tables.bits)} but bpw={self.spec.bpw} needs {self.bits}")
        self.tables = tables
        self.register_buffer("_signs_in_f", self.signs_in.to(torch.float32), persistent=False)
        self.register_buffer("_signs_out_f", self.signs_out.to(torch.float32), persistent=False)
        return self

    def _require_tables(self):
        if self.tables is None:
            raise RuntimeError("GLQLinear has no codebook tables attached; call attach(tables) "
                               "(from_pretrained does this after loading)")
        return self.tables

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tables = self._require_tables()
        y = _kernels.linear(x, self.codes, tables, self.row_scale, self._signs_in_f, self._signs_out_f,
                            self.spec.in_blocks, self.spec.out_blocks)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The dense weight W (out, in) in float32: ``F.linear(x, layer.dequantize())`` matches
        ``layer(x)`` (minus the bias) up to float rounding."""
        tables = self._require_tables()
        w = _kernels.dequantize_rotated(self.codes, tables, self.row_scale)  # (out, in) diag(rs)·W̃
        s_in = self.signs_in.to(torch.float32)
        s_out = self.signs_out.to(torch.float32)
        # H is symmetric: transforming each row gives W̃·H_in; each column, H_out·(...).
        w = _kernels.hadamard(w, self.spec.in_blocks) * s_in  # (out, in)
        return _kernels.hadamard(w.t().contiguous(), self.spec.out_blocks, out_signs=s_out).t().contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bpw={self.spec.bpw}, "
                f"bias={self.bias is not None}")
