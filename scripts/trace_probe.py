"""Where one v4 (small-batch kernel) launch spends its time: a per-CTA timeline from a traced build
(GLQ_KERNELS_TRACE=1 compiles globaltimer / clock64 stamps into glq_gemv_kernel; the normal build has
none), over graph replays of back-to-back calls cycling through rotated weight sets, as the benchmark
times them. Per launch, relative to the end of the previous launch's last CTA (us): when its CTAs
entered, finished the table fill and returned from the programmatic-launch wait, how long the first
item's slice loop took (and how far apart its 16 warps finished it), the epilogue (reduction, split-K
finish, store), and the period between launch ends. Usage on a GPU machine:
scripts/gpu_run.sh python3 scripts/trace_probe.py [--shapes 4096x14336 ...] [--rates 2 4] [--batch 1] [--tiled]
(--tiled: codes in glq.kernels.layout's tiled layout where the shape has it, as glq.hf holds them)."""

import argparse
import itertools
import os
import statistics

import torch

# A CTA's slot, laid out as glq_kernels.cu's TracePoint / kTraceWarpBase / kTraceWords: two id words, a
# (globaltimer, clock64) pair per point, then the 16 warps' loop ends.
POINTS = ("entry", "filled", "waited", "done0", "end0", "done1", "end1")
WARP_BASE = 2 + 2 * len(POINTS)
WORDS = WARP_BASE + 16


def ns_of(rows, point: str):
    k = POINTS.index(point)
    return rows[:, 2 + 2 * k]


def clk_of(rows, point: str):
    k = POINTS.index(point)
    return rows[:, 3 + 2 * k]


def trace_case(out_f: int, in_f: int, rate: int, batch: int, variant: int, replays: int, tiled: bool = False) -> None:
    from glq.kernels.benchmark import layout_bit, make_sets, time_graph

    n, layers, tables = make_sets(rate, out_f, in_f, batch, tiled=tiled)
    if tiled:
        variant |= layout_bit(out_f, in_f)
    x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
    tab = tables.table(x.dtype, x.device)

    def call(i):
        codes, _, row_scale = layers[i]
        return torch.ops.glq_cuda.matmul(x, codes, tab, row_scale, rate, tables.gain, 0, 0, variant)

    plan = torch.ops.glq_cuda.matmul_plan(batch, out_f, in_f, rate, 0, 0, 0, 0, variant)
    t_graph = time_graph(call, n, replays=20) * 1e6  # traced build, tracing off: stamps cost little
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            call(i)
    grid = plan[3]
    slots = n * grid * replays
    buf = torch.zeros(slots * WORDS, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.ops.glq_cuda.trace_set(buf, slots)
    for _ in range(replays):
        g.replay()
    torch.cuda.synchronize()
    torch.ops.glq_cuda.trace_set(buf, 0)
    rows = buf.view(slots, WORDS).cpu()
    launches = [rows[i * grid : (i + 1) * grid] for i in range(slots // grid)]
    stats: dict[str, list[float]] = {}

    def add(key, v):
        stats.setdefault(key, []).append(float(v) / 1e3)

    prev_end = None
    for li, r in enumerate(launches):
        items = int(r[0, 1] >> 32)
        two = items > grid  # some CTAs take a second item
        end = max(int(ns_of(r, "end0").max()), int(ns_of(r, "end1").max()) if two else 0)
        if prev_end is not None and li % n != 0:  # skip each replay's first launch (graph launch gap)
            entry, filled, waited = ns_of(r, "entry"), ns_of(r, "filled"), ns_of(r, "waited")
            done0, end0 = ns_of(r, "done0"), ns_of(r, "end0")
            add("entry first", entry.min() - prev_end)
            add("entry last", entry.max() - prev_end)
            add("filled last", filled.max() - prev_end)
            add("fill (median CTA)", (filled - entry).median())
            add("waited first", waited.min() - prev_end)
            add("waited last", waited.max() - prev_end)
            add("loop0 median", (done0 - waited).median())
            add("loop0 max", (done0 - waited).max())
            add("epilogue0 median", (end0 - done0).median())
            add("epilogue0 max", (end0 - done0).max())
            add("end0 first", end0.min() - prev_end)
            add("end0 last", end0.max() - prev_end)
            if two:
                second = r[ns_of(r, "end1") > 0]
                add("item1 loop median", (ns_of(second, "done1") - ns_of(second, "end0")).median())
            add("period", end - prev_end)
            # warps of the first item: loop ends relative to the CTA's wait, in ns via the CTA's clock rate
            clk_rate = (clk_of(r, "end0") - clk_of(r, "entry")).double() / (end0 - entry).double()  # cycles/ns
            warp_end = (r[:, WARP_BASE : WARP_BASE + 16].double() - clk_of(r, "waited")[:, None].double())
            warp_end = warp_end / clk_rate[:, None]
            add("warp loop spread (median CTA)", (warp_end.max(1).values - warp_end.min(1).values).median())
            add("warp loop first (median CTA)", warp_end.min(1).values.median())
        prev_end = end
    res = [int(v) for v in ns_of(rows, "entry")[: 4 * grid].tolist()]
    diffs = sorted({abs(a - b) for a, b in itertools.pairwise(res) if a != b})
    print(f"\n### {out_f}x{in_f}, {rate} bpw, batch {batch}, variant {variant}: grid {grid}, row blocks {plan[1]}, "
          f"ksplit {plan[2]}, cluster {plan[7]}, sets {n}; graph {t_graph:.1f} us per call; "
          f"globaltimer steps seen: {diffs[:3]} ns")
    print("| point (us after the previous launch's last CTA) | median | min | max |")
    print("|---|---|---|---|")
    for k, v in stats.items():
        print(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |")


def main() -> None:
    os.environ["GLQ_KERNELS_TRACE"] = "1"
    from glq.kernels._build import load_extension

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4096x14336", "14336x4096", "4096x4096", "576x1536"])
    ap.add_argument("--rates", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--tiled", action="store_true", help="tiled codes where the shape has the layout")
    args = ap.parse_args()
    ok, why = load_extension()
    if not ok or not hasattr(torch.ops.glq_cuda, "trace_set"):
        raise SystemExit(f"traced CUDA C build unavailable: {why or 'no trace_set op'}")
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    for s in args.shapes:
        out_f, in_f = (int(v) for v in s.split("x"))
        for rate in args.rates:
            trace_case(out_f, in_f, rate, args.batch, 2, args.replays, args.tiled)


if __name__ == "__main__":
    main()
