# ruff: noqa: B023 -- every closure here is timed inside the loop iteration that defines it.
"""The tiled-codes experiment (variant | 32, kTiledCodes): the small-batch kernel v4 (variant 2), its row-tile
variant (4) and the batched kernel v5 (3) reading codes that glq.kernels.testing.tile_codes permuted, so a lane's
codes of a step are one 16-byte load and a warp's loads 512 contiguous bytes, against the same kernel on the usual
layout. Checks both give the same bits, then times them alternately, bf16 x, graph replays over rotated weight
sets (the benchmark's protocol). Usage on a GPU machine:

    PYTHONPATH=$(ls -d $PWD/packages/*/src | paste -sd:) python3 scripts/tiled_probe.py \\
        --shapes 4096x14336 14336x4096 4096x4096 --rates 2 4 8 --batches 1 8 16
"""

import argparse

import torch

from glq.kernels._build import load_extension
from glq.kernels.benchmark import make_sets, time_graph
from glq.kernels.layout import tile_codes

TILED = 32
NAMES = {2: "v4", 3: "v5", 4: "row-tile"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4096x14336", "14336x4096", "4096x4096"])
    ap.add_argument("--rates", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--kernels", type=int, nargs="+", default=[2, 3],
                    help="2 v4, 4 row-tile (batches <= 8), 3 v5 (> 8)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ok, why = load_extension()
    if not ok:
        raise SystemExit(f"CUDA C backend unavailable: {why}")
    print(f"device: {torch.cuda.get_device_name(0)}")
    print("| out x in | batch | rate | kernel | usual layout us | tiled us | same bits |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.split("x"))
        for rate in args.rates:
            n, layers, tables = make_sets(rate, out_f, in_f, max(args.batches))
            tiled = [tile_codes(list(codes)) for codes, _, _ in layers]
            for batch in args.batches:
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
                tab = tables.table(x.dtype, x.device)
                for kernel in args.kernels:
                    if (kernel == 3) != (batch > 8) or (kernel == 3 and rate > 4):
                        continue

                    def call(i, v):
                        codes = tiled[i] if v & TILED else layers[i][0]
                        return torch.ops.glq_cuda.matmul(x, codes, tab, layers[i][2], rate, tables.gain, 0, 0, v)

                    same = torch.equal(call(0, kernel), call(0, kernel | TILED))
                    times = {kernel: [], kernel | TILED: []}
                    for _ in range(args.rounds):
                        for v in times:
                            times[v].append(time_graph(lambda i: call(i, v), n, replays=20) * 1e6)
                    cells = [" / ".join(f"{t:.1f}" for t in ts) for ts in times.values()]
                    print(f"| {shape} | {batch} | {rate} | {NAMES[kernel]} | {cells[0]} | {cells[1]} | {same} |",
                          flush=True)
            layers = tiled = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
