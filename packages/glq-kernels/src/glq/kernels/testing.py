"""Helpers shared by the tests and the benchmark: random stage tables and codes (this package
does not depend on glq.lattice, so its tests draw their own tables), and error measures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._tables import RATE_STAGES, PackedTables, pack_tables


def random_stages(rate: int, seed: int = 0) -> list[dict]:
    """Random per-stage tables for ``rate`` in the storage contract (abs/parity or table, scale).

    Residual stages get geometrically smaller scales, as real residual codebooks do."""
    g = torch.Generator().manual_seed(seed)
    stages = []
    for i, b in enumerate(RATE_STAGES[rate]):
        scale = 0.25**i
        if b == 16:
            stages.append(
                {
                    "bits": 16,
                    "abs": torch.rand(512, 8, generator=g) * 2.0,
                    "parity": torch.randint(0, 2, (512,), generator=g),
                    "scale": scale,
                }
            )
        else:
            stages.append({"bits": 8, "table": torch.randn(256, 8, generator=g), "scale": scale})
    return stages


def random_codes(
    rate: int, out_features: int, in_features: int, seed: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Uniformly random codes per stage: (out, in/8) int16 / uint8."""
    g = torch.Generator().manual_seed(seed + 1)
    codes = []
    for b in RATE_STAGES[rate]:
        if b == 16:
            c = torch.randint(-32768, 32768, (out_features, in_features // 8), generator=g)
            codes.append(c.to(torch.int16).to(device))
        else:
            c = torch.randint(0, 256, (out_features, in_features // 8), generator=g)
            codes.append(c.to(torch.uint8).to(device))
    return codes


def random_layer(
    rate: int, out_features: int, in_features: int, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[list[torch.Tensor], PackedTables, torch.Tensor]:
    """(codes, tables, row_scale) of a random layer on ``device``."""
    tables = pack_tables(random_stages(rate, seed))
    codes = random_codes(rate, out_features, in_features, seed, device)
    g = torch.Generator().manual_seed(seed + 2)
    row_scale = (0.5 + torch.rand(out_features, generator=g)).to(device)  # (out,) float32
    return codes, tables, row_scale


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y - ref‖ / ‖ref‖ in float64; inf if y has a non-finite entry."""
    y64, r64 = y.to(torch.float64), ref.to(torch.float64)
    if not torch.isfinite(y64).all():
        return float("inf")
    return float((y64 - r64).norm() / r64.norm().clamp_min(1e-300))


def exact_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ in float64 (x already in the dtype the kernel sees)."""
    return F.linear(x.to(torch.float64), w.to(torch.float64))


def lowp_reference_error(x: torch.Tensor, w: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative error plain PyTorch makes in x's dtype: w rounded to that dtype, fp32
    accumulation, output rounded. Kernel tolerances are a small multiple of this."""
    y = F.linear(x.to(torch.float32), w.to(x.dtype).to(torch.float32)).to(x.dtype)
    return rel_error(y, exact)


def unit_roundoff(dtype: torch.dtype) -> float:
    """2^-(mantissa bits + 1): 2^-11 for float16, 2^-8 for bfloat16, 2^-24 for float32."""
    return {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(dtype, 2.0**-24)


def kernel_tolerance(x: torch.Tensor, w: torch.Tensor, exact: torch.Tensor, n_stages: int) -> float:
    """Allowed relative error of a fused kernel: 4x plain PyTorch's own error in x's dtype, plus
    one unit roundoff per extra stage (the kernels round each stage's table to the dtype and add
    stages in it; with few inputs per output that is not averaged away: measured on a CPU model
    of the kernel numerics, 8x8 layers reach 5x the plain error)."""
    return 4.0 * lowp_reference_error(x, w, exact) + (n_stages - 1) * unit_roundoff(x.dtype)


def kernel_numerics_model(x: torch.Tensor, codes, tables: PackedTables, row_scale: torch.Tensor) -> torch.Tensor:
    """What the CUDA kernel computes, in plain PyTorch: tables in x's dtype, stages added in x's
    dtype, products summed in float32, output rounded. Differs from the kernel only by float32
    summation order."""
    from .qmatmul.reference import decode_stage

    dt = x.dtype
    tab = tables.table(dt, x.device)
    acc = None
    for s, (c, b) in enumerate(zip(codes, tables.bits, strict=True)):
        v = decode_stage(c, tab[s], b).to(dt)
        acc = v if acc is None else (acc.float() + v.float()).to(dt)
    w = acc.reshape(acc.shape[0], -1).float()
    y = F.linear(x.float(), w) * (row_scale.float() * tables.gain)[None]
    return y.to(dt)

