"""INT8 quantize / dequantize of key and value blocks: the plain-PyTorch reference.

Two layouts, after KIVI (https://arxiv.org/abs/2402.02750):

- keys **per channel**: one scale (and zero point) per (batch, head, channel) for every group of
  ``group_size`` consecutive tokens. Keys carry a few channels of consistently large magnitude;
  grouping along tokens keeps those outliers from inflating the step of the other channels.
- values **per token**: one scale (and zero point) per (batch, head, token) over the head
  dimension. Values have no channel outliers, and attention mixes them per token.

Two scale rules:

- ``"absmax"`` (symmetric): ``s = max|x| / 127``, codes in [-127, 127], ``x ~ q * s``.
- ``"minmax"`` (asymmetric): ``s = (max - min) / 255``, codes in [-128, 127],
  ``x ~ q * s + z`` with ``z = min + 128 * s``. Costs a second fp32 number per group, and
  pays off on channels whose values sit away from zero (post-RoPE key channels of low frequency).

Scales and zero points are fp32. Codes are computed with exactly the scale that is stored, so
``|x - dequantize(quantize(x))| <= s / 2`` holds element-wise up to fp32 rounding. fp32 rather than
bf16: a bf16 zero point of a channel sitting at 10 with a range of 0.5 is off by 0.02, ten steps
of the quantizer, which would break that bound; the extra bytes are 4 per group (see
``GLQQuantizedLayer.nbytes``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Scheme = Literal["absmax", "minmax"]
SCHEMES: tuple[str, ...] = ("absmax", "minmax")

# A group whose values are all equal has a null range: clamp the step so the division stays
# finite; the codes then come out 0 and the group dequantizes to its (exact) zero point.
_TINY = torch.finfo(torch.float32).tiny


class QTensor(NamedTuple):
    """An INT8-quantized block.

    ``codes`` (..., T, D) int8; ``scale`` and ``zero`` (fp32) broadcast against the codes after
    the layout's reshape (see ``quantize_per_channel`` / ``quantize_per_token``); ``zero`` is
    None for ``"absmax"``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _quantize_along(x: torch.Tensor, dim: int, scheme: str) -> QTensor:
    """Quantize ``x`` with one scale per slice reduced over ``dim`` (kept as size 1)."""
    xf = x.float()
    if scheme == "absmax":
        scale = (xf.abs().amax(dim=dim, keepdim=True) / 127.0).clamp_min(_TINY)
        codes = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
        return QTensor(codes, scale, None)
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / 255.0).clamp_min(_TINY)
    zero = lo + 128.0 * scale
    codes = torch.round((xf - zero) / scale).clamp_(-128, 127).to(torch.int8)
    return QTensor(codes, scale, zero)


def quantize_per_channel(x: torch.Tensor, group_size: int, scheme: Scheme = "minmax") -> QTensor:
    """Quantize keys per channel, in groups of ``group_size`` tokens.

    Args:
        x: (B, H, T, D) floating point, ``T`` a multiple of ``group_size``.
    Returns:
        codes (B, H, T, D) int8; scale and zero (B, H, T // group_size, D) fp32 (zero None for
        ``"absmax"``).
    """
    _check_scheme(scheme)
    if x.dim() != 4:
        raise ValueError(f"expected keys of shape (B, H, T, D), got {tuple(x.shape)}")
    b, h, t, d = x.shape
    if group_size < 1 or t % group_size:
        raise ValueError(f"T={t} tokens is not a multiple of group_size={group_size}")
    q = _quantize_along(x.reshape(b, h, t // group_size, group_size, d), dim=3, scheme=scheme)
    codes = q.codes.reshape(b, h, t, d)  # (B, H, T, D) int8
    scale = q.scale.squeeze(3)  # (B, H, T/G, D) fp32
    zero = None if q.zero is None else q.zero.squeeze(3)
    return QTensor(codes, scale, zero)


def quantize_per_token(x: torch.Tensor, scheme: Scheme = "absmax") -> QTensor:
    """Quantize values per token, over the head dimension.

    Args:
        x: (B, H, T, D) floating point.
    Returns:
        codes (B, H, T, D) int8; scale and zero (B, H, T, 1) fp32 (zero None for ``"absmax"``).
    """
    _check_scheme(scheme)
    if x.dim() != 4:
        raise ValueError(f"expected values of shape (B, H, T, D), got {tuple(x.shape)}")
    return _quantize_along(x, dim=3, scheme=scheme)


def _dequantize_into(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    # One fused elementwise op reading int8 + fp32 metadata and writing `dtype`: the arithmetic
    # runs in fp32 (the common dtype) and only the store rounds, so there is no fp32 temporary of
    # the whole block.
    if out is None:
        out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if zero is None:
        torch.mul(codes, scale, out=out)
    else:
        torch.addcmul(zero, codes, scale, out=out)
    return out


def dequantize_per_channel(q: QTensor, group_size: int, dtype: torch.dtype = torch.float32,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``quantize_per_channel``: (B, H, T, D) in ``dtype``.

    ``out``, if given, is a (B, H, T, D) tensor of ``dtype`` (it may be a slice of a longer
    buffer along T) that receives the result.
    """
    b, h, t, d = q.codes.shape
    n = t // group_size
    codes = q.codes.view(b, h, n, group_size, d)
    scale = q.scale.unsqueeze(3)  # (B, H, T/G, 1, D)
    zero = None if q.zero is None else q.zero.unsqueeze(3)
    target = None if out is None else out.view(b, h, n, group_size, d)
    return _dequantize_into(codes, scale, zero, target, dtype).view(b, h, t, d)


def dequantize_per_token(q: QTensor, dtype: torch.dtype = torch.float32,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``quantize_per_token``: (B, H, T, D) in ``dtype`` (``out`` as above)."""
    return _dequantize_into(q.codes, q.scale, q.zero, out, dtype)


def qtensor_cat(parts: list[QTensor], scale_dim: int = 2) -> QTensor:
    """Concatenate quantized blocks along the token axis (codes dim 2, metadata ``scale_dim``)."""
    codes = torch.cat([p.codes for p in parts], dim=2)
    scale = torch.cat([p.scale for p in parts], dim=scale_dim)
    zeros = [p.zero for p in parts]
    zero = None if zeros[0] is None else torch.cat(zeros, dim=scale_dim)
    return QTensor(codes, scale, zero)


def qtensor_map(q: QTensor, fn) -> QTensor:
    """Apply ``fn`` to every tensor of ``q`` (batch selection, device moves)."""
    return QTensor(fn(q.codes), fn(q.scale), None if q.zero is None else fn(q.zero))


def qtensor_nbytes(q: QTensor | None) -> int:
    """Bytes held by the codes and metadata of ``q`` (0 for None)."""
    if q is None:
        return 0
    total = q.codes.numel() * q.codes.element_size() + q.scale.numel() * q.scale.element_size()
    if q.zero is not None:
        total += q.zero.numel() * q.zero.element_size()
    return total
