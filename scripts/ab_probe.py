"""Routed GLQ matmul times for a before/after comparison: one line per (shape, batch) with the time of the
public ``glq.kernels.matmul`` (the router's choice, bf16 x) at each rate, timed as the benchmark does (graph
replays of back-to-back calls over weight sets rotated through more than L2). `scripts/ab_trees.py` runs
it for several source trees in one call, alternating, and tables the result; by hand:

    mkdir -p exp/old && git archive HEAD packages/glq-kernels/src | tar -x -C exp/old
    P0="$(ls -d $PWD/packages/*/src | paste -sd:)"
    for round in 1 2; do
      PYTHONPATH=$PWD/exp/old/packages/glq-kernels/src:$P0 python3 scripts/ab_probe.py old 4096x14336,4096x4096 2,3,4 1
      PYTHONPATH=$P0 python3 scripts/ab_probe.py new 4096x14336,4096x4096 2,3,4 1
    done

Arguments: a tag printed first on every line, OUTxIN shapes, rates and batches (comma-separated);
`--linear` times the full GLQ linear instead (``glq.kernels.glq_linear``: input transform, matmul, output
transform, random signs, default blocks); `--tiled` holds the codes in the tiled layout where the shape has it
(as glq.hf does on the CUDA C backend)."""

import argparse

import torch

from glq.kernels import glq_linear, matmul
from glq.kernels._build import load_extension
from glq.kernels.benchmark import layout_bit, make_sets, time_graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tag")
    ap.add_argument("shapes", help="OUTxIN,OUTxIN,...")
    ap.add_argument("rates", help="2,3,4,...")
    ap.add_argument("batches", help="1,8,...")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--linear", action="store_true", help="time glq_linear (both transforms) instead of matmul")
    ap.add_argument("--tiled", action="store_true", help="codes in the tiled layout where the shape has it")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rates = [int(r) for r in args.rates.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    ok, why = load_extension()
    if not ok:
        raise SystemExit(f"CUDA C backend unavailable: {why}")
    for out_f, in_f in shapes:
        for batch in batches:
            cells = []
            for rate in rates:
                n, layers, tables = make_sets(rate, out_f, in_f, batch, tiled=args.tiled)
                tiled = args.tiled and bool(layout_bit(out_f, in_f))
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
                if args.linear:
                    s_in = torch.randint(0, 2, (in_f,), device="cuda").float() * 2 - 1
                    s_out = torch.randint(0, 2, (out_f,), device="cuda").float() * 2 - 1

                    def call(i, x=x, layers=layers, tables=tables, s_in=s_in, s_out=s_out, tiled=tiled):
                        return glq_linear(x, layers[i][0], tables, layers[i][2], s_in, s_out, tiled=tiled)
                else:

                    def call(i, x=x, layers=layers, tables=tables, tiled=tiled):
                        return matmul(x, layers[i][0], tables, layers[i][2], tiled=tiled)

                t = time_graph(call, n, replays=args.replays)
                cells.append(f"r{rate}={t * 1e6:.1f}")
            print(f"{args.tag} {out_f}x{in_f} b{batch} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
