"""What exact nearest search costs at 4 bpw: ``encode(x, nearest=True)`` against the default beam.

Usage: python packages/glq-lattice/benchmarks/exact4_probe.py [--n 2000] [--device cpu|cuda]

``nearest=True`` completes the beam's answer by a ball search (``Codec._ball_search``): every stage-1
codeword within ``sqrt(E) + s2·max|b|`` of x (E the beam's error) gets an exact stage-2 search. This
prints both encoders' time per row, how many rows the exact answer improves and both MSEs; it fails if
the exact answer is ever worse than the beam's.
"""

from __future__ import annotations

import argparse
import time

import torch

from glq.lattice import codec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dev = torch.device(args.device)
    c = codec(4)
    x = torch.randn(args.n, 8, generator=torch.Generator().manual_seed(args.seed)).to(dev)
    c.encode(x[:16], nearest=True)  # warm-up: device copies of the tables

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    t0 = clock()
    err_beam = ((x - c.decode(c.encode(x))) ** 2).sum(1)
    t1 = clock()
    err_exact = ((x - c.decode(c.encode(x, nearest=True))) ** 2).sum(1)
    t2 = clock()
    print(f"4 bpw, {args.n} unit Gaussian rows on {dev}")
    print(f"time per row: beam {(t1 - t0) / args.n * 1e6:.1f} us, nearest=True {(t2 - t1) / args.n * 1e6:.1f} us "
          f"({(t2 - t1) / (t1 - t0):.1f}x)")
    better = int((err_exact < err_beam).sum())
    print(f"rows the exact search improves: {better} of {args.n}; per-dimension MSE beam "
          f"{err_beam.mean() / 8:.6f}, exact {err_exact.mean() / 8:.6f}")
    if bool((err_exact > err_beam).any()):
        raise SystemExit("the exact search lost to the beam on some row")


if __name__ == "__main__":
    main()
