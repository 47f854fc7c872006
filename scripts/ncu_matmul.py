"""A few GLQ matmul launches for Nsight Compute to profile (default: 4096x14336, batch 1, rates 2 and 4).

    ncu --section SpeedOfLight --section WarpStateStats -k regex:glq python3 scripts/ncu_matmul.py
    ... python3 scripts/ncu_matmul.py --shape 576x576 --batch 1 --rates 4 6
    ... python3 scripts/ncu_matmul.py --rates 4 --variant 2 --rep 4   (v4 forced with 4 table copies)
    ... python3 scripts/ncu_matmul.py --rates 2 --tiled   (codes in the tiled layout, as glq.hf holds them)

--variant/--rep call the raw op (variant 0 = the extension's auto choice; rep 0 = the plan's copies);
without --variant the public matmul routes as in a model.
"""

import argparse

import torch

from glq.kernels import matmul
from glq.kernels._build import load_extension
from glq.kernels.benchmark import layout_bit, make_sets

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="4096x14336", help="OUTxIN")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--rates", type=int, nargs="+", default=[2, 4])
ap.add_argument("--variant", type=int, default=None)
ap.add_argument("--rep", type=int, default=0)
ap.add_argument("--calls", type=int, default=3)
ap.add_argument("--tiled", action="store_true", help="codes in the tiled layout where the shape has it")
args = ap.parse_args()
out_f, in_f = (int(v) for v in args.shape.split("x"))
ok, why = load_extension()
if not ok:
    raise SystemExit(f"CUDA C backend unavailable: {why}")
for rate in args.rates:
    _, layers, tables = make_sets(rate, out_f, in_f, args.batch, tiled=args.tiled)
    tiled = layout_bit(out_f, in_f) if args.tiled else 0
    x = torch.randn(args.batch, in_f, device="cuda", dtype=torch.bfloat16)
    tab = tables.table(x.dtype, x.device)
    for i in range(args.calls):
        codes, _, row_scale = layers[i % len(layers)]
        if args.variant is None:
            matmul(x, codes, tables, row_scale, tiled=bool(tiled))
        else:
            variant = args.variant | tiled
            torch.ops.glq_cuda.matmul(x, codes, tab, row_scale, rate, tables.gain, args.rep, 0, variant)
    torch.cuda.synchronize()
