"""MSE of the GLQ codecs on i.i.d. unit Gaussian 8-vectors, rates 2-8, and encode speed.

Usage: python packages/glq-lattice/benchmarks/bench_mse.py [--n 100000] [--n-high 20000]

Prints, per rate: the rate-distortion bound 2^(-2R), the Lloyd-Max scalar quantizer (computed
here by Lloyd's algorithm on the exact Gaussian density), the anchors from the issue (glq 0.2.10
and QuIP# E8P, where known), and glq-lattice's per-dimension MSE with its gain over the rate
below. Then the time to encode one million vectors at 2 bpw.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from glq.lattice import codec

# Anchors from the issue (per-dimension MSE, unit Gaussian, best scale); None = not published.
ANCHORS = {  # rate: (glq 0.2.10 as shipped, glq 0.2.10 tuned, QuIP# E8P family)
    2: (0.0910, 0.0909, 0.0922),
    3: (0.0360, 0.0298, 0.0298),
    4: (0.0100, 0.0084, 0.0099),
}


def lloyd_max_gaussian(bits: int, iters: int = 300) -> float:
    """MSE of the optimal scalar quantizer with 2^bits levels for N(0, 1), by Lloyd's algorithm.

    Cells and centroids use the exact Gaussian integrals; the start is the high-resolution optimum
    (level density proportional to p^(1/3), i.e. quantiles of N(0, 3)).
    """
    k = 2**bits
    d = torch.float64
    u = (torch.arange(k, dtype=d) + 0.5) / k
    y = math.sqrt(3.0) * math.sqrt(2.0) * torch.erfinv(2 * u - 1)  # (k,) levels

    def cdf(t):
        return 0.5 * (1 + torch.erf(t / math.sqrt(2.0)))

    def pdf(t):
        return torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    inf = torch.tensor([float("inf")], dtype=d)
    for _ in range(iters):
        b = torch.cat([-inf, (y[1:] + y[:-1]) / 2, inf])  # (k+1,) cell edges
        mass = cdf(b[1:]) - cdf(b[:-1])
        y = (pdf(b[:-1]) - pdf(b[1:])) / mass  # centroid of N(0,1) on [b_i, b_i+1]
    b = torch.cat([-inf, (y[1:] + y[:-1]) / 2, inf])
    lo, hi = b[:-1], b[1:]
    mass = cdf(hi) - cdf(lo)
    # E[x^2; cell] = mass + lo pdf(lo) - hi pdf(hi) (terms at +-inf vanish)
    lpl = torch.where(torch.isinf(lo), torch.zeros_like(lo), lo * pdf(lo))
    hph = torch.where(torch.isinf(hi), torch.zeros_like(hi), hi * pdf(hi))
    ex2 = mass + lpl - hph
    ex1 = pdf(lo) - pdf(hi)
    return float((ex2 - 2 * y * ex1 + y * y * mass).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="test vectors, rates 2-4")
    ap.add_argument(
        "--n-high", type=int, default=20_000, help="test vectors, rates 5-8 (their beam search costs 0.3-1 ms a vector)"
    )
    ap.add_argument("--n-speed", type=int, default=1_000_000, help="vectors for the speed test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}"
    )
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.n, 8, generator=g)

    hdr = (
        f"{'bpw':>3} | {'bound':>9} | {'scalar LM':>9} | {'0.2.10':>7} | {'tuned':>7} | "
        f"{'E8P':>7} | {'glq-lattice':>11} | {'dB gain':>7} | {'beam':>4} | {'us/vec':>6}"
    )
    print(
        f"MSE per dimension, unit Gaussian 8-vectors ({args.n} at 2-4 bpw, {args.n_high} at "
        f"5-8 bpw; the first rows are shared), seed {args.seed}"
    )
    print(hdr)
    print("-" * len(hdr))
    prev = None
    for bpw in range(2, 9):
        c = codec(bpw)
        xb = x if bpw <= 4 else x[: args.n_high]
        t = time.perf_counter()
        codes = c.encode(xb)
        dt = time.perf_counter() - t
        m = ((xb - c.decode(codes)) ** 2).mean().item()
        gain = "" if prev is None else f"{10 * math.log10(prev / m):7.2f}"
        a = ANCHORS.get(bpw, (None, None, None))
        fa = [f"{v:7.4f}" if v is not None else f"{'-':>7}" for v in a]
        print(
            f"{bpw:>3} | {2 ** (-2 * bpw):9.3e} | {lloyd_max_gaussian(bpw):9.3e} | "
            f"{fa[0]} | {fa[1]} | {fa[2]} | {m:11.3e} | {gain:>7} | {c.beam:>4} | "
            f"{1e6 * dt / xb.shape[0]:6.1f}"
        )
        prev = m

    c = codec(2)
    xs = torch.randn(args.n_speed, 8, generator=g)
    c.encode(xs[:10_000])
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        c.encode(xs)
        best = min(best, time.perf_counter() - t)
    print(f"encode {args.n_speed} vectors at 2 bpw: {best:.2f} s (best of 3)")


if __name__ == "__main__":
    main()
