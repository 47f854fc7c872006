"""``torch.library`` custom ops (``glq::matmul``, ``glq::hadamard``, ``glq::linear``) with fake
implementations, so they trace under ``torch.compile`` and capture in CUDA graphs. Each op's
implementation asks :func:`select_backend` which backend runs it.

These take already-validated, 2-D inputs; the documented entry points with checks and shape
handling are :func:`glq.kernels.matmul`, :func:`glq.kernels.hadamard` and
:func:`glq.kernels.glq_linear`.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ._backend import _warn_once, select_backend
from .fwht.reference import hadamard_butterfly
from .qmatmul.reference import matmul_reference

# The CUDA kernel's n-tiles cover at most 64 batch rows per launch.
MAX_KERNEL_BATCH = 64
GEMV_ENV = "GLQ_KERNELS_GEMV"
FWHT_ENV = "GLQ_KERNELS_FWHT"
_gemv_failed: list[str] = []  # set once the small-batch kernel raised; later calls skip it


def _rate(bits: list[int]) -> int:
    return sum(bits) // 8


@torch.library.custom_op("glq::matmul", mutates_args=())
def matmul_op(
    x: Tensor, codes: list[Tensor], tables: Tensor, row_scale: Tensor, bits: list[int], gain: float
) -> Tensor:
    """y (B, out) = x (B, in) · W̃ᵀ. tables: (S, 512, 8) packed, in x's dtype for the kernels."""
    backend = select_backend(x.device)
    if backend == "reference":
        return matmul_reference(x, codes, tables, row_scale, bits, gain)
    if tables.dtype != x.dtype:
        tables = tables.to(x.dtype)
    x = x.contiguous()
    if backend == "cuda":
        fn = torch.ops.glq_cuda.matmul
        rate = _rate(bits)
        # Batches of 1-8 take the small-batch kernel (v4: 1.3-1.4x faster than the MMA kernel at
        # batch 1 on an H100, BENCHMARKS.md); GLQ_KERNELS_GEMV=0 forces the MMA kernel (v3) everywhere.
        variant = 1 if os.environ.get(GEMV_ENV, "") == "0" else 0

        def run(xb: Tensor) -> Tensor:
            if variant == 0 and xb.shape[0] <= 8 and not _gemv_failed:
                try:
                    return fn(xb, codes, tables, row_scale, rate, gain, 0, 0, 0)
                except RuntimeError as e:  # a launch/plan failure of the new kernel: fall back
                    _gemv_failed.append(str(e))
                    _warn_once("gemv", f"glq.kernels: small-batch CUDA kernel failed ({e}); using the MMA kernel")
            return fn(xb, codes, tables, row_scale, rate, gain, 0, 0, 1)

    else:
        from .qmatmul.triton import matmul_triton

        def run(xb: Tensor) -> Tensor:
            return matmul_triton(xb, codes, tables, row_scale, bits, gain)

    if x.shape[0] <= MAX_KERNEL_BATCH:
        return run(x)
    return torch.cat([run(xb) for xb in x.split(MAX_KERNEL_BATCH)], dim=0)


@matmul_op.register_fake
def _matmul_fake(x, codes, tables, row_scale, bits, gain):
    return x.new_empty(x.shape[0], codes[0].shape[0])


@torch.library.custom_op("glq::hadamard", mutates_args=())
def hadamard_op(x: Tensor, block_sizes: list[int], signs: Tensor | None, out_signs: Tensor | None) -> Tensor:
    """z (R, N) = out_signs ⊙ H_blockdiag (signs ⊙ x); x (R, N); signs float32 (N,) or None."""
    backend = select_backend(x.device)
    if backend == "cuda":
        logs = [int(math.log2(n)) for n in block_sizes]
        # The radix-16 kernel (v2: one barrier per four levels) is written to give v1's results bit
        # for bit but has not run on a GPU yet: opt in with GLQ_KERNELS_FWHT=2 until tests/kernels
        # -m cuda has passed there.
        variant = 2 if os.environ.get(FWHT_ENV, "") == "2" else 1
        return torch.ops.glq_cuda.hadamard(x.contiguous(), logs, signs, out_signs, variant)
    if backend == "triton":
        _warn_once("hadamard-triton", "glq.kernels: no Triton Hadamard kernel; using PyTorch ops")
    return hadamard_butterfly(x, block_sizes, signs, out_signs)


@hadamard_op.register_fake
def _hadamard_fake(x, block_sizes, signs, out_signs):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("glq::linear", mutates_args=())
def linear_op(
    x: Tensor,
    codes: list[Tensor],
    tables: Tensor,
    row_scale: Tensor,
    bits: list[int],
    gain: float,
    in_blocks: list[int],
    in_signs: Tensor | None,
    out_blocks: list[int],
    out_signs: Tensor | None,
) -> Tensor:
    """y = out_signs ⊙ H_out(W̃ · H_in(in_signs ⊙ x)); x (B, in) -> (B, out)."""
    u = hadamard_op(x, in_blocks, in_signs, None)
    v = matmul_op(u, codes, tables, row_scale, bits, gain)
    return hadamard_op(v, out_blocks, None, out_signs)


@linear_op.register_fake
def _linear_fake(x, codes, tables, row_scale, bits, gain, in_blocks, in_signs, out_blocks, out_signs):
    return x.new_empty(x.shape[0], codes[0].shape[0])
