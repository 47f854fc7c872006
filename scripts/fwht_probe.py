"""FWHT and full GLQ linear times against the split of large blocks over CTAs: fp16, graph replays,
one column per GLQ_KERNELS_FWHT_CTA_LOG2 value (read at every launch, so at graph capture; '' is the
built-in default), plus fwht_kernel (forced by misaligned signs) under the default. Usage on a GPU
machine, from the repository root:

    PYTHONPATH=$(ls -d $PWD/packages/*/src | paste -sd:) python3 scripts/fwht_probe.py --settings '' 8 10 12

A tree without the split ignores the variable: its columns then show run-to-run noise."""

import argparse
import os

import torch

from glq.kernels import glq_linear
from glq.kernels._build import load_extension
from glq.kernels.api import default_blocks
from glq.kernels.benchmark import make_sets, time_graph

ENV = "GLQ_KERNELS_FWHT_CTA_LOG2"


def misaligned(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 4, dtype=t.dtype, device=t.device)
    out = flat[1:t.numel() + 1]
    out.copy_(t)
    return out


def timed(settings: list[str], call, n: int) -> list[float]:
    times = []
    for setting in settings:
        os.environ[ENV] = setting
        times.append(time_graph(call, n))
    os.environ.pop(ENV, None)
    return times


def fwht_row(settings: list[str], n: int, batch: int) -> str:
    logs = [b.bit_length() - 1 for b in default_blocks(n)]
    s = torch.randint(0, 2, (n,), device="cuda").float() * 2 - 1
    su = misaligned(s)
    xs = [torch.randn(batch, n, device="cuda").half() for _ in range(8)]
    times = timed(settings, lambda i: torch.ops.glq_cuda.hadamard(xs[i], logs, s, None), len(xs))
    slow = time_graph(lambda i: torch.ops.glq_cuda.hadamard(xs[i], logs, su, None), len(xs))
    cells = " | ".join(f"{t * 1e6:.1f}" for t in [*times, slow])
    return f"| {n} {tuple(1 << v for v in logs)} | {batch} | {cells} |"


def linear_row(settings: list[str], out_f: int, in_f: int, batch: int, rate: int) -> str:
    n, layers, tables = make_sets(rate, out_f, in_f, batch)
    x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
    s_in = torch.randint(0, 2, (in_f,), device="cuda").float() * 2 - 1
    s_out = torch.randint(0, 2, (out_f,), device="cuda").float() * 2 - 1
    times = timed(settings, lambda i: glq_linear(x, layers[i][0], tables, layers[i][2], s_in, s_out), n)
    return f"| linear {out_f}x{in_f} {rate} bpw | {batch} | " + " | ".join(f"{t * 1e6:.1f}" for t in times) + " |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=[""], help=f"{ENV} values ('' = default)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 8192, 14336, 16384, 28672, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--linear", nargs="*", default=["4096x14336", "14336x4096"], help="OUTxIN, 2 bpw")
    args = ap.parse_args()
    ok, why = load_extension()
    assert ok, why
    names = [s or "default" for s in args.settings]
    print(f"| N (blocks) | batch | {' | '.join(names)} | fwht_kernel us |\n|---|---|" + "---|" * (len(names) + 1))
    for n in args.sizes:
        for batch in args.batches:
            print(fwht_row(args.settings, n, batch), flush=True)
    for shape in args.linear:
        out_f, in_f = (int(v) for v in shape.split("x"))
        for batch in (1, 16):
            print(linear_row(args.settings, out_f, in_f, batch, 2), flush=True)


if __name__ == "__main__":
    main()
