"""Plain-PyTorch reference for the block-diagonal fast Walsh-Hadamard transform.

Equivalent to ``F.linear(signs * x, H)`` where H is block-diagonal with orthonormal Sylvester
blocks ``hadamard_matrix(n) / sqrt(n)``. The Sylvester matrix is symmetric, so H is its own
inverse: applying the transform twice (with signs applied before the first and after the
second) gives back the input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Unnormalised Sylvester-Walsh-Hadamard matrix (n, n) of ±1, n a power of two.

    Built by the recursion H_2n = [[H, H], [H, -H]] (generated here, cached per n).
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return _sylvester(n).to(dtype=dtype, device=device)


def hadamard_reference(
    x: torch.Tensor,
    block_sizes: Sequence[int],
    signs: torch.Tensor | None = None,
    out_signs: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = out_signs ⊙ H_blockdiag (signs ⊙ x) along the last dim, in float32, returned in x.dtype.

    Args:
        x: (..., N) float tensor.
        block_sizes: powers of two summing to N.
        signs: optional (N,) ±1 (any float dtype), applied before the transform.
        out_signs: optional (N,) ±1, applied after the transform.
    """
    xf = x.to(torch.float32)
    if signs is not None:
        xf = xf * signs.to(device=x.device, dtype=torch.float32)
    outs = []
    start = 0
    for n in block_sizes:
        h = hadamard_matrix(n, torch.float32, x.device) / math.sqrt(n)
        outs.append(F.linear(xf[..., start : start + n], h))
        start += n
    z = torch.cat(outs, dim=-1)
    if out_signs is not None:
        z = z * out_signs.to(device=x.device, dtype=torch.float32)
    return z.to(x.dtype)


def hadamard_butterfly(
    x: torch.Tensor,
    block_sizes: Sequence[int],
    signs: torch.Tensor | None = None,
    out_signs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same transform as :func:`hadamard_reference` (plus optional ``out_signs`` applied after),
    by log2(n) butterfly levels of PyTorch ops: O(N log N) memory-light, for large blocks on any
    device. Computed in float32, returned in x.dtype."""
    xf = x.to(torch.float32)
    if signs is not None:
        xf = xf * signs.to(device=x.device, dtype=torch.float32)
    lead = xf.shape[:-1]
    outs = []
    start = 0
    for n in block_sizes:
        v = xf[..., start : start + n].reshape(-1, n)
        h = 1
        while h < n:
            v = v.reshape(-1, n // (2 * h), 2, h)
            a, b = v[:, :, 0], v[:, :, 1]
            v = torch.stack([a + b, a - b], dim=2)
            h *= 2
        outs.append(v.reshape(*lead, n) / math.sqrt(n))
        start += n
    z = torch.cat(outs, dim=-1)
    if out_signs is not None:
        z = z * out_signs.to(device=x.device, dtype=torch.float32)
    return z.to(x.dtype)
