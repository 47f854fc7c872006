# ruff: noqa: B023 -- every closure here is timed inside the loop iteration that defines it.
"""Which small-batch kernel is fastest per layer shape, rate and batch: times the MMA kernel (v3),
v4 and its row-tile variant forced, the public matmul (ops.py's routing) and bf16 cuBLAS,
fp16, graph replays of back-to-back calls as in the benchmark; then v4's split counts on the mid-size
layers. Usage on a GPU machine: scripts/gpu_run.sh python3 scripts/route_probe.py [--small] [--batches 1 2 8]
[--shapes 4096x14336 576x576] [--rates 2 4] [--no-splits] [--copies] [--batched] [--batched-splits]
(--small: only the layers below ops.LARGE_LAYER_WEIGHTS, which are all v4's above it)."""

import argparse

import torch

from glq.kernels import dequantize, matmul, ops
from glq.kernels.benchmark import SHAPES, bench_bf16, make_sets, split_rows, time_graph
from glq.kernels.testing import exact_matmul, lowp_reference_error, rel_error

VARIANTS = {"v3": 1, "v4": 2, "row-tile": 4}


def main() -> None:
    from glq.kernels._build import load_extension

    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--small-splits", action="store_true",
                    help="only the split counts of the MMA kernel and the row-tile variant on small layers")
    ap.add_argument("--shapes", nargs="+", default=None, help="OUTxIN layer shapes (default: the benchmark's)")
    ap.add_argument("--rates", type=int, nargs="+", default=list(range(2, 9)))
    ap.add_argument("--no-splits", action="store_true", help="skip v4's split table at the end")
    ap.add_argument("--copies", action="store_true",
                    help="only v4 with 4 against 8 table copies at rates 4-8 (--shapes, --batches, --rates)")
    ap.add_argument("--batched", action="store_true",
                    help="only batches 9-64: the MMA kernel, v5 (4 and 8 table copies at rate 4), routed, fp16 cuBLAS")
    ap.add_argument("--batched-splits", action="store_true",
                    help="only v5's forced K splits (--shapes, --batches over 8, --rates)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    shapes = [s for s in shapes if not args.small or s[0] * s[1] < ops.LARGE_LAYER_WEIGHTS]
    ok, why = load_extension()
    if not ok:
        raise SystemExit(f"CUDA C backend unavailable: {why}")
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    if args.copies:
        copies_rows(shapes, args.batches, [r for r in args.rates if r >= 4])
        return
    if args.batched_splits:
        for batch in [b for b in args.batches if b > 8]:
            print()
            split_rows(3, shapes, [r for r in args.rates if r <= 4], (0, 1, 2, 3, 4, 6, 8), batch=batch)
        return
    if args.batched:
        batched_rows(shapes, [b for b in args.batches if b > 8], [r for r in args.rates if r <= 4])
        return
    if args.small_splits:
        small = [(576, 576), (192, 576), (1536, 576), (576, 1536), (2560, 960)]
        for variant, rates in ((1, (2, 3, 4, 6, 8)), (4, (2, 3, 4))):
            print()
            split_rows(variant, small, rates, (0, 1, 2, 3))
        return
    print("| out x in | batch | rate | v3 us | v4 us | row-tile us | matmul (routed) us | fp16 cuBLAS us | "
          "worst err/ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        for batch in args.batches:
            base = bench_bf16(out_f, in_f, batch, torch.float16, replays=20) * 1e6
            for rate in args.rates:
                n, layers, tables, x, tab, exact, ref_err = timing_case(rate, out_f, in_f, batch)
                cells, worst = [], 0.0
                for name, v in VARIANTS.items():
                    if name != "v3" and batch > 8:
                        cells.append("-")
                        continue

                    def call(i, v=v):
                        return torch.ops.glq_cuda.matmul(x, layers[i][0], tab, layers[i][2], rate, tables.gain, 0, 0, v)

                    worst = max(worst, rel_error(call(0), exact) / ref_err)
                    cells.append(f"{time_graph(call, n, replays=20) * 1e6:.1f}")
                worst = max(worst, rel_error(matmul(x, layers[0][0], tables, layers[0][2]), exact) / ref_err)
                routed = time_graph(lambda i: matmul(x, layers[i][0], tables, layers[i][2]), n, replays=20) * 1e6
                print(f"| {out_f}x{in_f} | {batch} | {rate} | " + " | ".join(cells)
                      + f" | {routed:.1f} | {base:.1f} | {worst:.2f} |", flush=True)
                layers = None
    if args.no_splits:
        return
    print()
    split_rows(2, [(4096, 4096), (1024, 4096), (2560, 960), (4096, 14336)], (2, 3, 4, 6, 8), (0, 1, 2, 4))


def timing_case(rate: int, out_f: int, in_f: int, batch: int):
    """Rotated weight sets, fp16 x, its table, the exact product and plain PyTorch's own fp16 error."""
    n, layers, tables = make_sets(rate, out_f, in_f, batch)
    x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
    w = dequantize(layers[0][0], tables, layers[0][2])
    exact = exact_matmul(x, w)
    return n, layers, tables, x, tables.table(x.dtype, x.device), exact, lowp_reference_error(x, w, exact)


def copies_rows(shapes, batches, rates) -> None:
    """v4 forced with 4 and with 8 table copies (rates 4-5: every stage; 6-7: the first two 16-bit
    stages; 8: the first), against the plan's own choice."""
    print("| out x in | batch | rate | 4 copies us | 8 copies us | plan's copies |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        for batch in batches:
            for rate in rates:
                n, layers, tables = make_sets(rate, out_f, in_f, batch)
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                tab = tables.table(x.dtype, x.device)
                cells = []
                for rep in (4, 8):

                    def call(i, rep=rep):
                        codes, _, row_scale = layers[i]
                        return torch.ops.glq_cuda.matmul(x, codes, tab, row_scale, rate, tables.gain, rep, 0, 2)

                    cells.append(f"{time_graph(call, n, replays=20) * 1e6:.1f}")
                plan = torch.ops.glq_cuda.matmul_plan(batch, out_f, in_f, rate, 0, 0, 0, 0, 2)
                print(f"| {out_f}x{in_f} | {batch} | {rate} | " + " | ".join(cells) + f" | {plan[4]} |", flush=True)
                layers = None


def batched_rows(shapes, batches, rates) -> None:
    """Batches 9-64 at rates 2-4: the MMA kernel (v3) and v5 forced (rep 4: the rate's own table copies, 4 at
    rate 4; rep 8: 8 at rate 4), the public matmul and fp16 cuBLAS, with v5's error against the reference's own."""
    print("| out x in | batch | rate | v3 us | v5 us | v5 8 copies us | matmul (routed) us | fp16 cuBLAS us | "
          "v5 err/ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        for batch in batches:
            base = bench_bf16(out_f, in_f, batch, torch.float16, replays=20) * 1e6
            for rate in rates:
                n, layers, tables, x, tab, exact, ref_err = timing_case(rate, out_f, in_f, batch)
                cells = []
                for variant, rep in ((1, 0), (3, 4), (3, 8)):
                    if rep == 8 and rate != 4:
                        cells.append("-")
                        continue

                    def call(i, variant=variant, rep=rep):
                        codes, _, row_scale = layers[i]
                        return torch.ops.glq_cuda.matmul(x, codes, tab, row_scale, rate, tables.gain, rep, 0, variant)

                    if variant == 3 and rep == 4:
                        worst = rel_error(call(0), exact) / ref_err
                    cells.append(f"{time_graph(call, n, replays=20) * 1e6:.1f}")
                routed = time_graph(lambda i: matmul(x, layers[i][0], tables, layers[i][2]), n, replays=20) * 1e6
                print(f"| {out_f}x{in_f} | {batch} | {rate} | " + " | ".join(cells)
                      + f" | {routed:.1f} | {base:.1f} | {worst:.2f} |", flush=True)
                layers = None


if __name__ == "__main__":
    main()
