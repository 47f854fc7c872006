"""``torch.library`` custom ops (``glq::matmul``, ``glq::hadamard``, ``glq::linear``) with fake
implementations, so they trace under ``torch.compile`` and capture in CUDA graphs. Each op's
implementation asks :func:`select_backend` which backend runs it.

Batches above :data:`DENSE_BATCH_THRESHOLD` rows (prefill) take the dense path instead of the fused
kernels on the CUDA backend (``GLQ_KERNELS_DEQUANT=0`` turns it off, ``=1`` forces it on every
backend): W̃ is decoded once into a transient tensor in x's dtype and multiplied with cuBLAS
(``F.linear``), then freed.

These take already-validated, 2-D inputs; the documented entry points with checks and shape
handling are :func:`glq.kernels.matmul`, :func:`glq.kernels.hadamard` and
:func:`glq.kernels.glq_linear`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import _warn_once, select_backend
from .fwht.reference import hadamard_butterfly
from .layout import untile_codes
from .qmatmul.reference import dequantize_reference, matmul_reference

# The CUDA kernel's n-tiles cover at most 64 batch rows per launch.
MAX_KERNEL_BATCH = 64
# Batches of more rows than this decode W̃ once with the CUDA decode kernel and call cuBLAS. The
# fused MMA kernel decodes W̃ again for every 64 rows: at 2 bpw on 4096x14336 (H200) batch 256 took
# 778 us that way against 88 for the dense path, batch 2048 6.2 ms against 373 (bf16 49 / 293;
# BENCHMARKS.md). With torch ops doing the decode the dense path took 5.9 ms at batch 256, so the
# Triton backend (no decode kernel) keeps the chunked fused kernel unless GLQ_KERNELS_DEQUANT=1.
# GLQ_KERNELS_DEQUANT=0 keeps every batch on the fused kernels.
DENSE_BATCH_THRESHOLD = 64
GEMV_ENV = "GLQ_KERNELS_GEMV"
DEQUANT_ENV = "GLQ_KERNELS_DEQUANT"
# Batches 9..64 at rates 2..4 take the register-tiled batched kernel (v5, variant 3): at 2 bpw on
# 4096x14336 (H100, stop 18) 25.0 us at batch 16 against 52.1 for the MMA kernel, 50.8 against 187.9 at
# batch 64, errors equal to the MMA kernel's (BENCHMARKS.md). Two 64-row calls would now about tie the
# dense path at batch 128 (2 x 50.8 against 104.9 us at 2 bpw; 2 x 66.3 against 118.7 at 4 bpw), so
# DENSE_BATCH_THRESHOLD stays. GLQ_KERNELS_BATCHED=0 keeps the MMA kernel.
BATCHED_ENV = "GLQ_KERNELS_BATCHED"
BATCHED_RATES = (2, 3, 4)
# Which kernel takes batches of 1-8 (`small_batch_variant`): the fastest one of v4, its row-tile variant and the MMA
# kernel, timed on nine layer shapes at rates 2-8 and batches 1, 2 and 8, and at every split count on the small layers
# (H100, programmatic launches, graphs of back-to-back calls; scripts/route_probe.py, tables in notes/kernels.md).
# Layers of LARGE_LAYER_WEIGHTS or more (an 8B model's 4096x4096 and up) take v4 everywhere. On smaller ones v4 pays
# per-CTA costs (table fill, K slices cut short on the slow path) on too little work; at 5-8 bpw it took 2-2.5x the MMA
# kernel's time (2560x960 at 8 bpw 21.6 us against 10.1; 576x576 14.7 against 6.5), so the MMA kernel takes 5-8 bpw
# there. At 2-4 bpw the row-tile variant takes short inputs (at most ROW_TILE_MAX_IN, every SmolLM2 projection but the
# down one) and, on longer inputs, batches of 3-8 at 3 bpw (and at every rate from MID_LAYER_WEIGHTS): 576x576 at batch
# 1, unsplit, 3.5 / 4.3 / 4.5 us at 2 / 3 / 4 bpw against the MMA kernel's 4.7 / 4.3 / 4.7 and v4's 4.7 / 7.1 / 7.5.
# Longer inputs at batch 1-2 take v4 at 2 bpw (576x1536: 3.9 against 4.4) and the MMA kernel at 3-4 (4.8 / 5.2 against
# 5.0 / 5.5). Layers from MID_LAYER_WEIGHTS (1024x4096, an 8B model's k/v projections) differ: v4 at 3 bpw (6.7 against
# 7.8), the row-tile variant at 4 bpw (7.0 against 7.4), and v4 at 5-8 bpw from batch 3 (batch 8, 8 bpw: 14.3 against
# 20.4). Batches 2, 4 and 8 of the small layers (H100, stop 17; H200 agrees) moved one case: longer inputs below
# MID_LAYER_WEIGHTS at batches 3-8 take v4 at 2 bpw (576x1536, batch 4: 4.2 against the row-tile variant's 4.8) and the
# MMA kernel at 4 bpw (6.3 against 7.9; batch 8 8.2 against 8.4), the row-tile variant still at 3 bpw.
# At 5-8 bpw the row-tile variant (instantiated there since stop 24; H200, row-major codes, batches 1, 2, 4 and 8,
# scripts/route_probe.py) beats the MMA kernel and v4 on MID_LAYER_WEIGHTS layers at every batch (1024x4096 at 5 / 6
# / 7 / 8 bpw, batch 1: 6.6 / 6.8 / 7.4 / 7.8 us against the MMA kernel's 8.3 / 8.3 / 10.3 / 11.2; batch 8: 7.3 / 7.5
# / 8.1 / 8.5 against v4's 9.8 / 10.0 / 11.4 / 11.6), on short inputs at 5-6 bpw (1536x576 4.5 / 4.6 against 5.2 /
# 5.4, batch 8 5.0 / 5.1 against 7.2 / 7.3; 2560x960 6.1 / 6.2 against 5.8 / 6.1 at batch 1, the one loss, 6.8 / 6.9
# against 8.2 / 8.5 at batch 8) but not at 7-8 (576x576 6.4 / 6.6 against 5.7 / 5.9 at batch 1; its ring is 2 deep
# there), and on longer inputs at batches 1-2 (576x1536, batch 1: 4.8 / 4.8 / 5.3 / 5.4 against 4.9 / 5.1 / 7.4 / 7.2;
# batch 4 8.4 against 6.0 at 5 bpw).
# GLQ_KERNELS_ROWTILE=0 turns the row-tile choices into what these rules chose before it (v4 at 2-4 bpw), and
# GLQ_KERNELS_GEMV=0 sends every batch of 1-8 to the MMA kernel.
ROW_TILE_ENV = "GLQ_KERNELS_ROWTILE"
LARGE_LAYER_WEIGHTS = 1 << 23
MID_LAYER_WEIGHTS = 1 << 22
ROW_TILE_MAX_IN = 1024
# Added to a kernel variant: that kernel where it can be planned (shared memory, occupancy), else the
# extension's own choice for the batch, decided in C++ without raising (exceptions thrown by an
# extension crash the process on some machines; notes/kernels.md).
PREFER = 16
# Added to a kernel variant: the codes are in the tiled layout (glq.kernels.layout); every CUDA kernel reads it.
TILED = 32
ROW_TILE_VARIANT = 4 | PREFER  # what small_batch_variant returns for the row-tile variant
_gemv_failed: list[str] = []  # set once the small-batch kernel raised; later calls skip it
_batched_failed: list[str] = []  # likewise for the batched kernel


def _rate(bits: list[int]) -> int:
    return sum(bits) // 8


def small_batch_variant(batch: int, out_features: int, in_features: int, rate: int, row_tile_ok: bool = True) -> int:
    """The CUDA kernel variant for a batch of 1-8 rows (rules and measurements above the constants):
    0 (v4, the extension's own choice), 1 (the MMA kernel) or 4 | PREFER (the row-tile variant; never with
    row_tile_ok=False, GLQ_KERNELS_ROWTILE=0)."""
    v4, mma = 0, 1
    weights = out_features * in_features
    if weights >= LARGE_LAYER_WEIGHTS:
        return v4
    mid = weights >= MID_LAYER_WEIGHTS
    if rate >= 5:
        if not row_tile_ok:
            return v4 if mid and batch > 2 else mma
        if mid or (in_features <= ROW_TILE_MAX_IN and rate <= 6):
            return ROW_TILE_VARIANT
        if in_features <= ROW_TILE_MAX_IN:
            return mma
        return ROW_TILE_VARIANT if batch <= 2 else mma
    row_tile = ROW_TILE_VARIANT if row_tile_ok else v4
    if in_features <= ROW_TILE_MAX_IN:
        return row_tile
    if batch > 2:
        if mid or rate == 3:
            return row_tile
        return v4 if rate == 2 else mma
    if rate == 2:
        return v4
    if not mid:
        return mma
    return row_tile if rate == 4 else v4


def uses_dense_path(batch: int, backend: str = "cuda") -> bool:
    """Whether a matmul of ``batch`` rows on ``backend`` decodes W̃ densely and calls cuBLAS (the
    reference is dense anyway): more than DENSE_BATCH_THRESHOLD rows on the CUDA backend unless
    GLQ_KERNELS_DEQUANT=0, on any backend with GLQ_KERNELS_DEQUANT=1. The public API also uses it to
    hand the ops float32 tables for such batches, so the decode is exact before its one rounding to
    x's dtype."""
    if batch <= DENSE_BATCH_THRESHOLD:
        return False
    flag = os.environ.get(DEQUANT_ENV, "")
    return flag == "1" or (flag != "0" and backend == "cuda")


# The CUDA extension's ops, behind module-level names so CPU tests can stand in for them.
def _cuda_matmul(x: Tensor, codes, tables, row_scale, rate: int, gain: float, variant: int) -> Tensor:
    return torch.ops.glq_cuda.matmul(x, codes, tables, row_scale, rate, gain, 0, 0, variant)


def _cuda_dequantize(codes, tables, row_scale, rate: int, gain: float, dtype: torch.dtype, tiled: bool) -> Tensor:
    return torch.ops.glq_cuda.dequantize(codes, tables, row_scale, rate, gain, dtype, tiled)


def _row_major(codes: list[Tensor], tiled: bool, backend: str) -> list[Tensor]:
    """Row-major codes for the paths that only read that layout (the references, Triton): tiled codes are permuted
    back on every call. glq.hf tiles a layer's codes only for the CUDA backend, so this is for direct calls."""
    if not tiled:
        return codes
    if backend == "triton":
        _warn_once("tiled-triton", "glq.kernels: the Triton kernels read row-major codes; untiling on every call")
    return untile_codes(codes)


def _dequantize_impl(
    backend: str, codes: list[Tensor], tables: Tensor, row_scale: Tensor, bits: list[int], gain: float, dtype,
    tiled: bool = False,
) -> Tensor:
    """Dense W̃ (out, in) in ``dtype``: the float32 reference decode rounded once to ``dtype``."""
    if backend == "cuda" and os.environ.get(DEQUANT_ENV, "") != "0":
        # The kernel decodes from float32 tables; tables already rounded to fp16/bf16 (a direct op
        # call at a large batch) are widened exactly, and then carry that one extra rounding.
        if tables.dtype != torch.float32:
            tables = tables.to(torch.float32)
        return _cuda_dequantize(codes, tables.contiguous(), row_scale, _rate(bits), gain, dtype, tiled)
    # Torch ops elsewhere (the Triton backend has no dequantize kernel; GLQ_KERNELS_DEQUANT=0 on
    # CUDA): the same float32 numbers, in ~20 passes where the kernel takes one (100x slower).
    return dequantize_reference(_row_major(codes, tiled, "reference"), tables, row_scale, bits, gain).to(dtype)


@torch.library.custom_op("glq::dequantize", mutates_args=())
def dequantize_op(
    codes: list[Tensor], tables: Tensor, row_scale: Tensor, bits: list[int], gain: float, dtype: torch.dtype,
    tiled: bool = False,
) -> Tensor:
    """W̃ (out, in) in ``dtype`` = dequantize_reference(...) rounded once to ``dtype`` (tables
    (S, 512, 8) float32 for that guarantee). tiled: the codes are in glq.kernels.layout's tiled layout."""
    return _dequantize_impl(select_backend(codes[0].device), codes, tables, row_scale, bits, gain, dtype, tiled)


@dequantize_op.register_fake
def _dequantize_fake(codes, tables, row_scale, bits, gain, dtype, tiled=False):
    return codes[0].new_empty(codes[0].shape[0], codes[0].shape[1] * 8, dtype=dtype)


@torch.library.custom_op("glq::matmul", mutates_args=())
def matmul_op(
    x: Tensor, codes: list[Tensor], tables: Tensor, row_scale: Tensor, bits: list[int], gain: float,
    tiled: bool = False,
) -> Tensor:
    """y (B, out) = x (B, in) · W̃ᵀ. tables: (S, 512, 8) packed, in x's dtype for the fused kernels,
    float32 for the dense path (B > DENSE_BATCH_THRESHOLD; other dtypes work there too, with one
    more rounding). tiled: the codes are in glq.kernels.layout's tiled layout."""
    return _matmul_impl(x, codes, tables, row_scale, bits, gain, tiled=tiled)


# The ops' bodies as plain functions: linear_op calls them directly. A custom-op call costs ~15-20 us
# of host time in eager mode (dispatcher, dynamo-disable wrapper, autograd redispatch), and a GLQ
# linear nested three of them inside its own: ~60 us of its ~80 us host path (measured on this
# CPU with the CUDA kernels stubbed out), in eager decoding 224 times per token on an 8B model.
def _matmul_impl(
    x: Tensor, codes: list[Tensor], tables: Tensor, row_scale: Tensor, bits: list[int], gain: float,
    backend: str | None = None, tiled: bool = False,
) -> Tensor:
    backend = backend or select_backend(x.device)  # glq::linear passes the one it selected
    if backend == "reference":
        return matmul_reference(x, _row_major(codes, tiled, backend), tables, row_scale, bits, gain)
    if uses_dense_path(x.shape[0], backend):
        # prefill: decode once, cuBLAS for the product; the transient W̃ is freed on return
        w = _dequantize_impl(backend, codes, tables, row_scale, bits, gain, x.dtype, tiled)
        return F.linear(x, w)
    if tables.dtype != x.dtype:
        tables = tables.to(x.dtype)
    x = x.contiguous()
    if backend == "cuda":
        rate = _rate(bits)
        fn = _cuda_matmul
        layout = TILED if tiled else 0  # added to every variant below

        # Batches of 1-8: the kernel small_batch_variant picks; GLQ_KERNELS_GEMV=0 forces the MMA
        # kernel (v3) for them. The switches are read only where they apply (each read is ~1.5 us of
        # host time, and eager decoding makes hundreds of these calls per token).

        def run(xb: Tensor) -> Tensor:
            if xb.shape[0] <= 8:
                if not _gemv_failed and os.environ.get(GEMV_ENV, "") != "0":
                    variant = small_batch_variant(xb.shape[0], codes[0].shape[0], x.shape[1], rate)
                    if variant == ROW_TILE_VARIANT and os.environ.get(ROW_TILE_ENV, "") == "0":
                        variant = small_batch_variant(xb.shape[0], codes[0].shape[0], x.shape[1], rate, False)
                    try:
                        return fn(xb, codes, tables, row_scale, rate, gain, variant | layout)
                    except RuntimeError as e:  # a launch failure of the new kernel: fall back
                        _gemv_failed.append(str(e))
                        _warn_once("gemv", f"glq.kernels: small-batch CUDA kernel failed ({e}); using the MMA kernel")
            elif rate in BATCHED_RATES and not _batched_failed and os.environ.get(BATCHED_ENV, "") != "0":
                try:
                    return fn(xb, codes, tables, row_scale, rate, gain, 3 | PREFER | layout)
                except RuntimeError as e:
                    _batched_failed.append(str(e))
                    _warn_once("batched", f"glq.kernels: batched CUDA kernel failed ({e}); using the MMA kernel")
            return fn(xb, codes, tables, row_scale, rate, gain, 1 | layout)

    else:
        from .qmatmul.triton import matmul_triton

        codes = _row_major(codes, tiled, backend)

        def run(xb: Tensor) -> Tensor:
            return matmul_triton(xb, codes, tables, row_scale, bits, gain)

    if x.shape[0] <= MAX_KERNEL_BATCH:
        return run(x)
    return torch.cat([run(xb) for xb in x.split(MAX_KERNEL_BATCH)], dim=0)


@matmul_op.register_fake
def _matmul_fake(x, codes, tables, row_scale, bits, gain, tiled=False):
    return x.new_empty(x.shape[0], codes[0].shape[0])


@torch.library.custom_op("glq::hadamard", mutates_args=())
def hadamard_op(x: Tensor, block_sizes: list[int], signs: Tensor | None, out_signs: Tensor | None) -> Tensor:
    """z (R, N) = out_signs ⊙ H_blockdiag (signs ⊙ x); x (R, N); signs float32 (N,) or None."""
    return _hadamard_impl(x, block_sizes, signs, out_signs)


def _hadamard_impl(x: Tensor, block_sizes: list[int], signs: Tensor | None, out_signs: Tensor | None,
                   backend: str | None = None) -> Tensor:
    backend = backend or select_backend(x.device)
    if backend == "cuda":
        logs = [int(math.log2(n)) for n in block_sizes]
        return torch.ops.glq_cuda.hadamard(x.contiguous(), logs, signs, out_signs)
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
    tiled: bool = False,
) -> Tensor:
    """y = out_signs ⊙ H_out(W̃ · H_in(in_signs ⊙ x)); x (B, in) -> (B, out). Empty ``in_blocks``:
    x is already H_in(in_signs ⊙ x) (an input transformed once for several layers) and goes
    straight to the matmul. One custom-op call for the three steps (see _matmul_impl). tiled: the codes are in
    glq.kernels.layout's tiled layout."""
    return _linear_impl(x, codes, tables, row_scale, bits, gain, in_blocks, in_signs, out_blocks, out_signs, tiled)


def _linear_impl(x, codes, tables, row_scale, bits, gain, in_blocks, in_signs, out_blocks, out_signs,
                 tiled=False) -> Tensor:
    # one backend choice for the three steps (select_backend costs ~3.5 us of host time a call)
    backend = select_backend(x.device)
    u = _hadamard_impl(x, in_blocks, in_signs, None, backend) if in_blocks else x
    v = _matmul_impl(u, codes, tables, row_scale, bits, gain, backend, tiled)
    return _hadamard_impl(v, out_blocks, None, out_signs, backend)


def linear(x: Tensor, codes: list[Tensor], tables: Tensor, row_scale: Tensor, bits: list[int], gain: float,
           in_blocks: list[int], in_signs: Tensor | None, out_blocks: list[int], out_signs: Tensor | None,
           tiled: bool = False) -> Tensor:
    """``linear_op`` where it matters (torch.compile traces the op, with its fake implementation), its
    body called directly otherwise: in eager mode the custom-op machinery (dispatcher, autograd
    redispatch, dynamo-disable wrapper) was ~60% of a GLQ linear's host time, paid 7 times per block
    and token. The glq_cuda kernels it calls are plain dispatcher ops either way, so CUDA graphs
    capture the direct call the same."""
    if torch.compiler.is_compiling():
        return linear_op(x, codes, tables, row_scale, bits, gain, in_blocks, in_signs, out_blocks, out_signs, tiled)
    return _linear_impl(x, codes, tables, row_scale, bits, gain, in_blocks, in_signs, out_blocks, out_signs, tiled)


@linear_op.register_fake
def _linear_fake(x, codes, tables, row_scale, bits, gain, in_blocks, in_signs, out_blocks, out_signs, tiled=False):
    return x.new_empty(x.shape[0], codes[0].shape[0])
