"""MSE of the GLQ codecs on i.i.d. unit Gaussian 8-vectors, rates 2-8, and encode speed.

Usage: python packages/glq-lattice/benchmarks/bench_mse.py [--n 100000] [--n-high 20000]
       python packages/glq-lattice/benchmarks/bench_mse.py --device cuda --speed-only

Prints, per rate: the rate-distortion bound 2^(-2R), the Lloyd-Max scalar quantizer (computed
here by Lloyd's algorithm on the exact Gaussian density), the anchors from the issue (glq 0.2.10
and QuIP# E8P, where known), and glq-lattice's per-dimension MSE with its standard error and its
gain over the rate below (with the standard error of that gain: the rates share their vectors,
so it comes from the paired per-vector errors). Then a table of the time to encode ``--n-speed``
vectors (one million) at each of ``--speed-rates`` on ``--device`` (cpu or cuda).

Needs only torch and glq.lattice (``PYTHONPATH=packages/glq-lattice/src`` is enough on a GPU box).
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


def paired_db_se(prev: torch.Tensor, cur: torch.Tensor) -> float:
    """Standard error (dB) of 10 log10(mean(prev) / mean(cur)) for per-vector errors measured on
    the same vectors (delta method; their covariance is large, most of it from large-norm rows)."""
    n = prev.numel()
    a, b = prev.double() / prev.double().mean(), cur.double() / cur.double().mean()
    var = (a - b).var() / n  # variance of log mean(prev) - log mean(cur), to first order
    return float(10.0 / math.log(10.0) * var.sqrt())


def time_encode(bpw: int, x: torch.Tensor, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` encodes of ``x`` (on x's device), after a warm-up."""
    c = codec(bpw)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    c.encode(x[:10_000])
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        c.encode(x)
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def speed_table(args, g: torch.Generator) -> None:
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads"
    xs = torch.randn(args.n_speed, 8, generator=g).to(dev)
    print(f"encode time, {args.n_speed} unit-Gaussian vectors, {name} (best of {args.repeats})")
    hdr = f"{'bpw':>3} | {'beam':>4} | {'seconds':>8} | {'M vec/s':>8} | {'ns/vec':>7} | {'mse':>9}"
    print(hdr)
    print("-" * len(hdr))
    for bpw in args.speed_rates:
        dt = time_encode(bpw, xs, args.repeats)
        c = codec(bpw)
        head = xs[:100_000]
        err = ((head - c.decode(c.encode(head))) ** 2).mean().item()
        print(
            f"{bpw:>3} | {c.beam:>4} | {dt:8.3f} | {args.n_speed / dt / 1e6:8.2f} | "
            f"{1e9 * dt / args.n_speed:7.0f} | {err:9.3e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="test vectors, rates 2-4")
    ap.add_argument(
        "--n-high", type=int, default=20_000, help="test vectors, rates 5-8 (their beam search costs 0.3-1 ms a vector)"
    )
    ap.add_argument("--n-speed", type=int, default=1_000_000, help="vectors for the speed test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--rates", type=int, nargs="+", default=list(range(2, 9)), help="rates of the MSE table")
    ap.add_argument("--device", default="cpu", help="device of the speed table: cpu or cuda")
    ap.add_argument(
        "--speed-rates",
        type=int,
        nargs="+",
        default=None,
        help="rates of the speed table (default: 2, or 2 3 4 on cuda)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed encodes per rate (the best is shown)")
    ap.add_argument("--speed-only", action="store_true", help="skip the MSE table")
    args = ap.parse_args()
    if args.speed_rates is None:
        args.speed_rates = [2] if args.device == "cpu" else [2, 3, 4]
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{args.threads} threads, {platform.processor() or platform.machine()}"
    )
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.n, 8, generator=g)
    if not args.speed_only:
        mse_table(args, x)
    speed_table(args, g)


def mse_table(args, x: torch.Tensor) -> None:
    hdr = (
        f"{'bpw':>3} | {'bound':>9} | {'scalar LM':>9} | {'0.2.10':>7} | {'tuned':>7} | "
        f"{'E8P':>7} | {'glq-lattice':>11} | {'+-se':>8} | {'dB gain':>7} | {'+-se':>5} | {'beam':>4} | {'us/vec':>6}"
    )
    print(
        f"MSE per dimension, unit Gaussian 8-vectors ({args.n} at 2-4 bpw, {args.n_high} at "
        f"5-8 bpw; the first rows are shared), seed {args.seed}"
    )
    print(hdr)
    print("-" * len(hdr))
    prev = None  # per-vector squared errors of the rate below
    for bpw in args.rates:
        c = codec(bpw)
        xb = x if bpw <= 4 else x[: args.n_high]
        t = time.perf_counter()
        codes = c.encode(xb)
        dt = time.perf_counter() - t
        err = ((xb - c.decode(codes)) ** 2).mean(1)  # (n,) per vector, per dimension
        m = err.mean().item()
        se = err.double().std().item() / math.sqrt(err.numel())
        gain, gse = "", ""
        if prev is not None and bpw - 1 in args.rates:
            p = prev[: err.numel()]
            gain = f"{10 * math.log10(p.mean().item() / m):7.2f}"
            gse = f"{paired_db_se(p, err):5.2f}"
        a = ANCHORS.get(bpw, (None, None, None))
        fa = [f"{v:7.4f}" if v is not None else f"{'-':>7}" for v in a]
        print(
            f"{bpw:>3} | {2 ** (-2 * bpw):9.3e} | {lloyd_max_gaussian(bpw):9.3e} | "
            f"{fa[0]} | {fa[1]} | {fa[2]} | {m:11.3e} | {se:8.1e} | {gain:>7} | {gse:>5} | {c.beam:>4} | "
            f"{1e6 * dt / xb.shape[0]:6.1f}"
        )
        prev = err


if __name__ == "__main__":
    main()
