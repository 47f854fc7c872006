"""Randomized Hadamard Transform of a weight and its Hessian.

With S_in, S_out random ±1 diagonals and H_in, H_out orthonormal block-diagonal
Walsh-Hadamard matrices (symmetric, so their own inverses):

    W̃ = H_out S_out W S_in H_in          H̃ = H_in S_in H S_in H_in

so that x·Wᵀ = S_out H_out (W̃ · H_in S_in x): the loss tr(ΔW H ΔWᵀ) is unchanged and
W̃'s entries are close to Gaussian with no outliers, which is what the lattice code wants.
"""

from __future__ import annotations

import functools
import zlib

import torch

from glq.hf.config import power_of_two_blocks


def layer_seed(base_seed: int, name: str) -> int:
    """A layer's own sign seed: independent signs per layer, reproducible from the run's seed."""
    return (zlib.crc32(name.encode()) ^ (base_seed * 0x9E3779B1)) & 0x7FFFFFFF


def random_signs(n: int, seed: int) -> torch.Tensor:
    """(n,) int8 of ±1 drawn from a CPU generator, so every device gets the same signs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def fwht_rows(x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """Block-diagonal orthonormal Walsh-Hadamard transform of each row, in x's dtype.

    A dense matmul per block (exact in float64 for Hessians): quantization transforms each
    matrix a handful of times and block fine-tuning once per step, which costs less than it
    matters; inference uses the fast kernels in glq.kernels.
    """
    outs, start = [], 0
    for n in blocks:
        outs.append((x[..., start : start + n] @ _hadamard(n, x.dtype, x.device)) * n**-0.5)
        start += n
    return torch.cat(outs, dim=-1)


@functools.lru_cache(maxsize=8)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Kept on the device: fine-tuning transforms every step, and a fresh host-to-device copy
    # of an 8192-point matrix (256 MiB in float32) per layer and step would dominate it.
    from glq.kernels.fwht.reference import hadamard_matrix

    return hadamard_matrix(n, dtype, device)


def transform_weight(w: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor,
                     in_blocks: tuple[int, ...], out_blocks: tuple[int, ...]) -> torch.Tensor:
    """W̃ = H_out S_out W S_in H_in for w (out, in), computed in float32."""
    w = w.to(torch.float32) * s_in.to(torch.float32)
    w = fwht_rows(w, in_blocks)  # rows: (H_in S_in w_r)
    w = w * s_out.to(torch.float32)[:, None]
    return fwht_rows(w.T.contiguous(), out_blocks).T.contiguous()


def untransform_weight(wt: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor,
                       in_blocks: tuple[int, ...], out_blocks: tuple[int, ...]) -> torch.Tensor:
    """W = S_out H_out W̃ H_in S_in: the inverse of ``transform_weight``."""
    w = fwht_rows(wt.to(torch.float32), in_blocks) * s_in.to(torch.float32)
    w = fwht_rows(w.T.contiguous(), out_blocks).T * s_out.to(torch.float32)[:, None]
    return w.contiguous()


def transform_hessian(h: torch.Tensor, s_in: torch.Tensor, in_blocks: tuple[int, ...]) -> torch.Tensor:
    """H̃ = H_in S_in H S_in H_in for a symmetric h (in, in), in h's dtype (float64 kept)."""
    s = s_in.to(h.dtype)
    h = fwht_rows(h * s, in_blocks)  # H S Hᵀ... rows first
    h = fwht_rows(h.T.contiguous() * s, in_blocks).T
    return (h + h.T) / 2  # re-symmetrise away rounding


def blocks_for(n: int) -> tuple[int, ...]:
    return power_of_two_blocks(n)
