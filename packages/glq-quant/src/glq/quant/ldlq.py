"""Block LDLQ: quantize a weight 8 columns at a time with Hessian-aware error feedback.

For one row w and Hessian H the loss is (q - w) H (q - w)ᵀ. Processing the columns
in order, the optimal correction after fixing a block B of 8 columns moves every later
column by the block's error times U_BB⁻¹ U_B,rest, where H⁻¹ = Uᵀ U (upper Cholesky).
This is GPTQ's update with 8-wide vector blocks instead of single columns (QuIP#'s
"BlockLDLQ"); updates are applied lazily, 128 columns at a time, so most of the work
is in a few large matmuls.

``refine`` then does coordinate descent over blocks: each block is re-encoded against
its optimal target given every other block, and kept only for the rows where the exact
loss drops, so a refinement pass never makes a layer worse.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # (n, 8) target -> (n, 8) reconstruction

_LAZY = 128  # columns per lazy-update batch: a multiple of 8


def damp_hessian(h: torch.Tensor, damp: float = 0.01, name: str = "") -> torch.Tensor:
    """H + λ·mean(diag H)·I, raising λ until the Cholesky factorization succeeds.

    A dead input channel (zero row and column) gets its diagonal set to 1 first, as
    GPTQ does: its weights then quantize plainly with no feedback through them.
    """
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    if dead.any():
        diag[dead] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp
    for _ in range(8):
        candidate = h + lam * mean * eye
        _, info = torch.linalg.cholesky_ex(candidate)
        if int(info) == 0:
            if lam != damp:
                warnings.warn(f"{name or 'layer'}: Hessian not positive definite; damping raised to {lam:g}",
                              stacklevel=2)
            return candidate
        lam *= 10
    raise RuntimeError(f"{name or 'layer'}: Hessian stays singular even with damping {lam / 10:g}")


def ldlq(w: torch.Tensor, h: torch.Tensor, quantize: Quantizer) -> torch.Tensor:
    """Quantize ``w`` (out, in) against Hessian ``h`` (in, in), 8 columns at a time.

    ``h`` must be positive definite (see ``damp_hessian``). Returns the reconstruction
    (out, in) in w's dtype; ``quantize`` maps (n, 8) targets to their codes' values.
    """
    out_features, in_features = w.shape
    if in_features % 8:
        raise ValueError(f"in_features={in_features} is not a multiple of 8")
    work = w.to(torch.float32).clone()
    q = torch.empty_like(work)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h.to(torch.float64)))
    u = torch.linalg.cholesky(hinv, upper=True).to(torch.float32)  # H⁻¹ = Uᵀ U
    for start in range(0, in_features, _LAZY):
        end = min(start + _LAZY, in_features)
        err = torch.empty(out_features, end - start, dtype=torch.float32, device=w.device)
        for b in range(start, end, 8):
            blk = slice(b, b + 8)
            q[:, blk] = quantize(work[:, blk])
            # Solve with the 8x8 triangular block instead of inverting it.
            e = torch.linalg.solve_triangular(u[blk, blk], (work[:, blk] - q[:, blk]), upper=True, left=False)
            err[:, b - start : b - start + 8] = e
            if b + 8 < end:
                work[:, b + 8 : end] -= e @ u[blk, b + 8 : end]
        if end < in_features:
            work[:, end:] -= err @ u[start:end, end:]
    return q.to(w.dtype)


def proxy_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((q - w) H (q - w)ᵀ): the layer's output error energy over the calibration set."""
    d = (q - w).to(torch.float64)
    return float(((d @ h.to(torch.float64)) * d).sum())


def refine(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, quantize: Quantizer, iters: int) -> torch.Tensor:
    """``iters`` coordinate-descent passes over the 8-column blocks of ``q``.

    For block B with the others fixed, the loss is minimised at
    t_B = w_B - (q - w)_¬B H_¬B,B H_BB⁻¹; the block is re-encoded at t_B and the new
    codes are kept only for rows whose loss (q_B - t_B) H_BB (q_B - t_B)ᵀ decreases.
    """
    if iters <= 0:
        return q
    w32, q = w.to(torch.float32), q.to(torch.float32).clone()
    h32 = h.to(torch.float32)
    err = q - w32  # (out, in), kept current as blocks change
    for _ in range(iters):
        for b in range(0, w.shape[1], 8):
            blk = slice(b, b + 8)
            hbb = h32[blk, blk]
            # Cross term from every other block: err H[:, B] minus the block's own share.
            cross = err @ h32[:, blk] - err[:, blk] @ hbb
            t = w32[:, blk] - torch.linalg.solve(hbb, cross.T).T
            cand = quantize(t)
            d_new, d_old = cand - t, q[:, blk] - t
            better = ((d_new @ hbb) * d_new).sum(1) < ((d_old @ hbb) * d_old).sum(1)
            if better.any():
                q[better, blk] = cand[better]
                err[better, blk] = cand[better] - w32[better, blk]
    return q.to(w.dtype)
