"""Documented entry points: validate, reshape, then call the custom ops in :mod:`glq.kernels.ops`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import ops
from ._tables import RATE_STAGES, PackedTables
from .layout import can_tile, untile_codes
from .qmatmul.reference import dequantize_reference

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MAX_HADAMARD_BLOCK = 1 << 15


def _check_codes(codes: Sequence[Tensor], tables: PackedTables, in_features: int, tiled: bool = False) -> None:
    if not isinstance(tables, PackedTables):
        raise TypeError(f"expected tables from pack_tables() rather than {type(tables).__name__}")
    if len(codes) != len(tables.bits):
        raise ValueError(f"got {len(codes)} code tensors for a rate-{tables.rate} layout with stages {tables.bits}")
    out, groups = codes[0].shape if codes[0].dim() == 2 else (None, None)
    for s, (c, b) in enumerate(zip(codes, tables.bits, strict=True)):
        want = torch.int16 if b == 16 else torch.uint8
        if c.dtype != want:
            raise TypeError(f"codes[{s}] ({b}-bit stage): expected {want} rather than {c.dtype}")
        if c.dim() != 2 or c.shape != (out, groups):
            raise ValueError(f"codes[{s}]: expected shape ({out}, {groups}) like codes[0] rather than {tuple(c.shape)}")
    if groups * 8 != in_features:
        raise ValueError(
            f"x has in_features={in_features} but codes hold {groups} groups of 8 (in_features={groups * 8})"
        )
    if tiled and not can_tile(out, in_features):
        raise ValueError(
            f"tiled=True, but a layer of shape ({out}, {in_features}) has no tiled layout: it needs out_features "
            "% 16 == 0 and in_features % 128 == 0 (glq.kernels.layout.can_tile)"
        )


def _check_devices(x: Tensor, *others: Tensor | None) -> None:
    for t in others:
        if t is not None and t.device != x.device:
            raise ValueError(f"expected every tensor on {x.device} rather than {t.device}")


def _table_dtype(x: Tensor) -> torch.dtype:
    """The fused kernels read tables in x's dtype; the CPU reference and the dense path of large
    batches (exact float32 decode, rounded once to x's dtype) take them in float32."""
    if x.device.type != "cuda":
        return torch.float32
    rows = math.prod(x.shape[:-1])
    # Decode-sized batches never take the dense path: skip the backend lookup on that hot path.
    if rows <= ops.DENSE_BATCH_THRESHOLD or not ops.uses_dense_path(rows, ops.select_backend(x.device)):
        return x.dtype
    return torch.float32


def _kernel_args(x: Tensor, codes: Sequence[Tensor], tables: PackedTables, row_scale: Tensor, tiled: bool = False):
    if x.device.type == "cuda" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"expected x float16 or bfloat16 on CUDA rather than {x.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point x rather than {x.dtype}")
    _check_codes(codes, tables, x.shape[-1], tiled)
    out = codes[0].shape[0]
    if row_scale.shape != (out,):
        raise ValueError(f"expected row_scale of shape ({out},) rather than {tuple(row_scale.shape)}")
    _check_devices(x, *codes, row_scale)
    codes = [c.contiguous() for c in codes]
    row_scale = row_scale.to(torch.float32).contiguous()
    table = tables.table(_table_dtype(x), x.device)
    return codes, table, row_scale


def matmul(
    x: Tensor, codes: Sequence[Tensor], tables: PackedTables, row_scale: Tensor, *, tiled: bool = False
) -> Tensor:
    """Fused GLQ matmul: y = x · W̃ᵀ, decoding W̃ from its codes on the fly (never materialised for
    batches of up to 64 rows on CUDA). Equivalent to
    ``F.linear(x, dequantize(codes, tables, row_scale))`` with fp32 accumulation. On the CUDA
    backend batches of more than ``ops.DENSE_BATCH_THRESHOLD`` rows (prefill) decode W̃ once into a
    transient tensor in x's dtype (the float32 decode rounded once) and call cuBLAS instead, which
    needs out x in elements of extra memory during the call (``GLQ_KERNELS_DEQUANT=0`` turns that
    off, ``=1`` forces it on the Triton backend too).

    Args:
        x: (..., in) float16 or bfloat16 (any float dtype on the CPU).
        codes: one tensor per stage, (out, in/8): int16 for 16-bit stages, uint8 for 8-bit ones.
        tables: from :func:`pack_tables`.
        row_scale: (out,) float32.
        tiled: the codes are in the tiled layout (:func:`glq.kernels.layout.tile_codes`), which the
            CUDA kernels read 12-14% faster on large layers; the same result bit for bit.

    Returns:
        (..., out) in x's dtype.

    Raises:
        TypeError / ValueError: wrong dtypes, shapes, or devices (messages give the values).
    """
    codes, table, row_scale = _kernel_args(x, codes, tables, row_scale, tiled)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = ops.matmul_op(x2, codes, table, row_scale, list(tables.bits), float(tables.gain), tiled)
    return y.reshape(*lead, codes[0].shape[0])


def dequantize(codes: Sequence[Tensor], tables: PackedTables, row_scale: Tensor, *, tiled: bool = False) -> Tensor:
    """Dense W̃ (out, in) float32 from stage codes (the reference decode; for checks and export).

    Args:
        codes: per stage (out, in/8), int16 / uint8.
        tables: from :func:`pack_tables`.
        row_scale: (out,) float32.
        tiled: the codes are in the tiled layout (:func:`glq.kernels.layout.tile_codes`).
    """
    _check_codes(codes, tables, codes[0].shape[1] * 8, tiled)
    codes = untile_codes(list(codes)) if tiled else list(codes)
    return dequantize_reference(codes, tables.values.to(codes[0].device), row_scale, tables.bits, tables.gain)


def default_blocks(n: int) -> tuple[int, ...]:
    """Block-diagonal split of ``n`` into powers of two, largest first (576 -> (512, 64),
    14336 -> (8192, 4096, 2048)): the binary expansion of n."""
    if n < 1:
        raise ValueError(f"expected a positive size rather than {n}")
    return tuple(1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1)


def _check_blocks(n: int, block_sizes: Sequence[int] | None) -> list[int]:
    blocks = list(default_blocks(n) if block_sizes is None else block_sizes)
    for b in blocks:
        if b < 1 or b & (b - 1):
            raise ValueError(f"Hadamard block sizes must be powers of two, got {b} in {blocks}")
        if b > MAX_HADAMARD_BLOCK:
            raise ValueError(f"Hadamard block {b} exceeds the largest supported {MAX_HADAMARD_BLOCK}")
    if sum(blocks) != n:
        raise ValueError(f"Hadamard blocks {blocks} sum to {sum(blocks)}, not the last dim {n}")
    if len(blocks) > 16:
        raise ValueError(f"at most 16 Hadamard blocks, got {len(blocks)}")
    return blocks


def _as_f32(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


def _check_signs(s: Tensor | None, n: int, x: Tensor) -> Tensor | None:
    if s is None:
        return None
    if s.shape != (n,):
        raise ValueError(f"expected signs of shape ({n},) rather than {tuple(s.shape)}")
    _check_devices(x, s)
    return s.to(torch.float32).contiguous()


def hadamard(
    x: Tensor,
    block_sizes: Sequence[int] | None = None,
    signs: Tensor | None = None,
    out_signs: Tensor | None = None,
) -> Tensor:
    """Orthonormal block-diagonal fast Walsh-Hadamard transform along the last dim:
    z = out_signs ⊙ H (signs ⊙ x), H = blockdiag(H_b / sqrt(b)) with Sylvester blocks H_b.
    Equivalent to ``F.linear(signs * x, H) * out_signs``; H is symmetric and orthogonal, so
    ``hadamard(hadamard(x, b, s), b, out_signs=s) == x`` up to rounding.

    Args:
        x: (..., N) float16, bfloat16 or float32.
        block_sizes: powers of two (each <= 32768) summing to N; default: N's binary expansion
            (576 -> (512, 64)).
        signs: optional (N,) ±1 applied before the transform (pass float32 to avoid a cast).
        out_signs: optional (N,) ±1 applied after.

    Returns:
        (..., N) in x's dtype (computed in float32).
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"expected x float16, bfloat16 or float32 rather than {x.dtype}")
    n = x.shape[-1]
    blocks = _check_blocks(n, block_sizes)
    signs = _check_signs(signs, n, x)
    out_signs = _check_signs(out_signs, n, x)
    x2 = x.reshape(-1, n)
    return ops.hadamard_op(x2, blocks, signs, out_signs).reshape(x.shape)


def glq_linear(
    x: Tensor,
    codes: Sequence[Tensor],
    tables: PackedTables,
    row_scale: Tensor,
    in_signs: Tensor | None = None,
    out_signs: Tensor | None = None,
    in_blocks: Sequence[int] | None = None,
    out_blocks: Sequence[int] | None = None,
    *,
    check: bool = True,
    tiled: bool = False,
) -> Tensor:
    """The GLQ linear layer: y = out_signs ⊙ H_out(W̃ · H_in(in_signs ⊙ x)).

    Args:
        x: (..., in) float16 or bfloat16 (any float dtype on the CPU).
        codes, tables, row_scale: as for :func:`matmul`.
        in_signs: optional (in,) ±1; out_signs: optional (out,) ±1.
        in_blocks / out_blocks: Hadamard blocks (default: binary expansion of the size).
        check: validate every argument (default). ``False`` is for callers that validated the
            layer's tensors once (glq.hf checks them at load): it skips the checks that cost ~25 us
            of host time per call; inconsistent arguments then fail inside the kernels, or worse.
        tiled: the codes are in the tiled layout (as for :func:`matmul`).

    Returns:
        (..., out) in x's dtype.
    """
    return _linear(x, codes, tables, row_scale, in_signs, out_signs, in_blocks, out_blocks, check, False, tiled)


def glq_linear_rotated(
    xt: Tensor,
    codes: Sequence[Tensor],
    tables: PackedTables,
    row_scale: Tensor,
    out_signs: Tensor | None = None,
    out_blocks: Sequence[int] | None = None,
    *,
    check: bool = True,
    tiled: bool = False,
) -> Tensor:
    """:func:`glq_linear` from an input already transformed, ``xt = hadamard(x, in_blocks,
    in_signs)`` (one transform serving several layers that read the same x):
    y = out_signs ⊙ H_out(W̃ · xt). The same ops in the same order as :func:`glq_linear`, so the
    result is bit-identical to ``glq_linear(x, ...)``; one custom-op call.

    Args:
        xt: (..., in) float16 or bfloat16 (any float dtype on the CPU), already transformed.
        codes, tables, row_scale: as for :func:`matmul`; out_signs, out_blocks, check, tiled: as for
            :func:`glq_linear`.

    Returns:
        (..., out) in xt's dtype.
    """
    return _linear(xt, codes, tables, row_scale, None, out_signs, None, out_blocks, check, True, tiled)


def _linear(x, codes, tables, row_scale, in_signs, out_signs, in_blocks, out_blocks, check: bool, rotated: bool,
            tiled: bool):
    """glq_linear and glq_linear_rotated: one ``glq::linear`` call (empty in_blocks: x rotated)."""
    n_in, n_out = x.shape[-1], codes[0].shape[0]
    if check:
        codes, table, row_scale = _kernel_args(x, codes, tables, row_scale, tiled)
        ib = [] if rotated else _check_blocks(n_in, in_blocks)
        ob = _check_blocks(n_out, out_blocks)
        in_signs = _check_signs(in_signs, n_in, x)
        out_signs = _check_signs(out_signs, n_out, x)
    else:
        codes, table = list(codes), tables.table(_table_dtype(x), x.device)
        ib = [] if rotated else list(default_blocks(n_in) if in_blocks is None else in_blocks)
        ob = list(default_blocks(n_out) if out_blocks is None else out_blocks)
        # float32 is what the kernels read; a model cast with .half() casts these buffers too
        row_scale, in_signs, out_signs = (_as_f32(t) for t in (row_scale, in_signs, out_signs))
    lead = x.shape[:-1]
    y = ops.linear(x.reshape(-1, n_in), codes, table, row_scale, list(tables.bits), float(tables.gain), ib,
                   in_signs, ob, out_signs, tiled)
    return y.reshape(*lead, n_out)


def glq_linear_reference(
    x: Tensor,
    codes: Sequence[Tensor],
    tables: PackedTables,
    row_scale: Tensor,
    in_signs: Tensor | None = None,
    out_signs: Tensor | None = None,
    in_blocks: Sequence[int] | None = None,
    out_blocks: Sequence[int] | None = None,
    *,
    tiled: bool = False,
) -> Tensor:
    """Float32 oracle of :func:`glq_linear` (dense Sylvester matrices, dense W̃)."""
    from .fwht.reference import hadamard_reference

    n_in, n_out = x.shape[-1], codes[0].shape[0]
    u = hadamard_reference(x.to(torch.float32), _check_blocks(n_in, in_blocks), in_signs)
    w = dequantize(codes, tables, row_scale, tiled=tiled)
    v = torch.nn.functional.linear(u, w)
    return hadamard_reference(v, _check_blocks(n_out, out_blocks), None, out_signs)


__all__ = [
    "RATE_STAGES",
    "default_blocks",
    "dequantize",
    "glq_linear",
    "glq_linear_reference",
    "glq_linear_rotated",
    "hadamard",
    "matmul",
]
