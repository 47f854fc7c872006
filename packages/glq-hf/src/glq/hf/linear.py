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
        self.shared_input: SharedInput | None = None  # set by link_shared_inputs
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
        if self.shared_input is None or torch.compiler.is_compiling():
            y = _kernels.linear(x, self.codes, tables, self.row_scale, self._signs_in_f, self._signs_out_f,
                                self.spec.in_blocks, self.spec.out_blocks)
        else:
            xt = self.shared_input.rotated(x, self._signs_in_f, self.spec.in_blocks)
            y = _kernels.linear_rotated(xt, self.codes, tables, self.row_scale, self._signs_out_f,
                                        self.spec.out_blocks)
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


class SharedInput:
    """The input transform of sibling layers that read the same tensor with the same input signs
    (q/k/v and gate/up of a model quantized by glq.quant, which draws one set of input signs per
    group of layers sharing an input): the first layer to see an input computes
    H_in(signs_in ⊙ x), and its siblings reuse it while the input is the very same tensor, not
    modified since (its version counter). One Hadamard launch instead of three for q/k/v and one
    instead of two for gate/up; the results are bit-identical to unshared layers. Skipped under
    torch.compile, which traces each layer on its own."""

    def __init__(self, members: int):
        self.members = members
        self.clear()

    def rotated(self, x: torch.Tensor, signs_in: torch.Tensor, in_blocks) -> torch.Tensor:
        version = _version(x)
        if x is self._x and version == self._version:
            xt, self._uses = self._xt, self._uses + 1
        else:
            xt = _kernels.hadamard(x, in_blocks, signs_in)
            self._x, self._version, self._xt, self._uses = x, version, xt, 1
        if self._uses >= self.members:
            # Every sibling has had it: let go, so a long prefill's activations are not kept
            # alive until the next forward (2 GB for 2048 tokens of an 8B model otherwise).
            self.clear()
        return xt

    def clear(self) -> None:
        self._x: torch.Tensor | None = None
        self._xt: torch.Tensor | None = None
        self._version, self._uses = -1, 0


def _version(x: torch.Tensor) -> int:
    # Inference-mode tensors keep no version counter: there identity alone decides (transformers'
    # attention and MLP pass one untouched tensor to their projections).
    return -2 if x.is_inference() else x._version


def link_shared_inputs(model: nn.Module) -> int:
    """Give sibling GLQLinear layers (children of one module) with equal input signs and blocks
    one :class:`SharedInput`; returns the number of layers linked. Layers from folders whose
    signs differ per layer (earlier glq.quant, fine-tuned gains that differ) are left alone."""
    linked = 0
    for parent in model.modules():
        groups: list[list[GLQLinear]] = []
        for child in parent.children():
            if not isinstance(child, GLQLinear) or child.signs_in.device.type == "meta":
                continue
            child.shared_input = None
            for g in groups:
                head = g[0]
                if (head.spec.in_blocks == child.spec.in_blocks and head.signs_in.dtype == child.signs_in.dtype
                        and head.signs_in.device == child.signs_in.device
                        and torch.equal(head.signs_in, child.signs_in)):
                    g.append(child)
                    break
            else:
                groups.append([child])
        for g in groups:
            if len(g) > 1:
                shared = SharedInput(len(g))
                for layer in g:
                    layer.shared_input = shared
                linked += len(g)
    return linked
