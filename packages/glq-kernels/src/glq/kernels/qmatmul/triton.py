"""Triton backend of the fused GLQ matmul: decode a (BLOCK_M, 8*BLOCK_G) tile of W̃ from codes in
registers, then ``tl.dot`` with the activation tile (fp32 accumulation). One program per
(row block, batch block) walks the whole K range, so the result is deterministic.

Slower than the CUDA C kernel at batch 1 (no split-K, gathers through L1), but portable; it is
the fallback when the CUDA build is unavailable and runs on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _decode16(c_ptr, tab_ptr, rows, gs, M, G, e):
    cmask = (rows[:, None] < M) & (gs[None, :] < G)
    # int16 codes are sign-extended on load: mask back to the unsigned 16-bit pattern
    c = tl.load(c_ptr + rows[:, None] * G + gs[None, :], mask=cmask, other=0).to(tl.int32) & 0xFFFF
    pat = c >> 7
    lo = c & 127
    par = lo ^ (lo >> 4)
    par = par ^ (par >> 2)
    par = par ^ (par >> 1)
    sbits = lo | ((par & 1) << 7)
    v = tl.load(tab_ptr + pat[:, :, None] * 8 + e[None, None, :]).to(tl.float32)
    neg = (sbits[:, :, None] >> e[None, None, :]) & 1
    return tl.where(neg != 0, -v, v)


@triton.jit
def _decode8(c_ptr, tab_ptr, rows, gs, M, G, e):
    cmask = (rows[:, None] < M) & (gs[None, :] < G)
    c = tl.load(c_ptr + rows[:, None] * G + gs[None, :], mask=cmask, other=0).to(tl.int32) & 0xFF
    return tl.load(tab_ptr + c[:, :, None] * 8 + e[None, None, :]).to(tl.float32)


@triton.jit
def glq_matmul_kernel(
    # pointers
    x_ptr,  # (B, K) fp16/bf16
    y_ptr,  # (B, M)
    tab_ptr,  # (S, 512, 8) packed tables, x's dtype
    rs_ptr,  # (M,) float32
    c0_ptr,
    c1_ptr,
    c2_ptr,
    c3_ptr,  # stage codes (M, G); unused ones alias c0
    # sizes
    B,
    M,
    G,
    # strides
    stride_xb,
    stride_yb,
    gain,
    # meta-parameters
    N16: tl.constexpr,
    HAS8: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    e = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        w = _decode16(c0_ptr, tab_ptr, rows, gs, M, G, e)  # (BLOCK_M, BLOCK_G, 8)
        if N16 > 1:
            w += _decode16(c1_ptr, tab_ptr + 4096, rows, gs, M, G, e)
        if N16 > 2:
            w += _decode16(c2_ptr, tab_ptr + 2 * 4096, rows, gs, M, G, e)
        if N16 > 3:
            w += _decode16(c3_ptr, tab_ptr + 3 * 4096, rows, gs, M, G, e)
        if HAS8:
            if N16 == 1:
                w += _decode8(c1_ptr, tab_ptr + 4096, rows, gs, M, G, e)
            elif N16 == 2:
                w += _decode8(c2_ptr, tab_ptr + 2 * 4096, rows, gs, M, G, e)
            else:
                w += _decode8(c3_ptr, tab_ptr + 3 * 4096, rows, gs, M, G, e)
        w2 = tl.reshape(w, (BLOCK_M, BLOCK_G * 8))
        ks = g0 * 8 + tl.arange(0, BLOCK_G * 8)
        xt = tl.load(
            x_ptr + bs[:, None] * stride_xb + ks[None, :],
            mask=(bs[:, None] < B) & (ks[None, :] < G * 8),
            other=0.0,
        )
        if DOT_FP32:
            # the interpreter computes bf16 dots wrongly: upcast there
            acc += tl.dot(xt.to(tl.float32), tl.trans(w2))
        else:
            acc += tl.dot(xt, tl.trans(w2.to(xt.dtype)))
    rs = tl.load(rs_ptr + rows, mask=rows < M, other=0.0)
    out = acc * (rs * gain)[None, :]
    tl.store(
        y_ptr + bs[:, None] * stride_yb + rows[None, :],
        out.to(y_ptr.dtype.element_ty),
        mask=(bs[:, None] < B) & (rows[None, :] < M),
    )


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def matmul_triton(
    x: torch.Tensor,
    codes: Sequence[torch.Tensor],
    tables: torch.Tensor,
    row_scale: torch.Tensor,
    bits: Sequence[int],
    gain: float,
) -> torch.Tensor:
    """y (B, M) = x (B, K) · W̃ᵀ; tables (S, 512, 8) in x's dtype, codes contiguous (M, K/8)."""
    B = x.shape[0]
    M, G = codes[0].shape
    y = torch.empty(B, M, dtype=x.dtype, device=x.device)  # (B, M)
    n16 = sum(1 for b in bits if b == 16)
    has8 = bits[-1] == 8
    ptrs = list(codes) + [codes[0]] * (4 - len(codes))
    interp = _interpret()
    block_b = 16 if B <= 16 else 32
    block_m = 16 if interp else 64
    block_g = 2 if interp else 8
    grid = (triton.cdiv(M, block_m), triton.cdiv(B, block_b))
    glq_matmul_kernel[grid](
        x,
        y,
        tables,
        row_scale,
        *ptrs,
        B,
        M,
        G,
        x.stride(0),
        y.stride(0),
        float(gain),
        N16=n16,
        HAS8=has8,
        BLOCK_B=block_b,
        BLOCK_M=block_m,
        BLOCK_G=block_g,
        DOT_FP32=interp,
    )
    return y
