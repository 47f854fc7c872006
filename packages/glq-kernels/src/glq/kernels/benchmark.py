# ruff: noqa: B023 -- every lambda here is timed inside the loop iteration that defines it.
"""Build, check and time every GLQ kernel variant in one run; print and write a Markdown table.

    python -m glq.kernels.benchmark [--out results.md] [--quick]

Timing: each measurement captures a CUDA graph of calls cycling through enough weight copies
that the working set exceeds twice the L2 (no call finds its weights cached), replays it after
warm-up, and reports the median per-call time over many replays. bf16 cuBLAS ``F.linear`` on the
same shapes runs in the same process as the baseline. Achieved bandwidth counts the bytes a call
must move (codes, activations in and out, row scales) over its time. The first table judges the
speed goals (SPEED_GOALS, LINEAR_GOAL) by each goal's worst measured case. Layers whose shape has a
tiled code layout are timed on it (make_sets), as glq.hf holds them on the CUDA C backend.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from glq.kernels import dequantize, glq_linear, matmul
from glq.kernels.layout import can_tile, tile_codes
from glq.kernels.testing import exact_matmul, lowp_reference_error, random_layer, rel_error

SHAPES = [  # (out, in)
    (4096, 14336),
    (14336, 4096),
    (4096, 4096),
    (1024, 4096),
    (2560, 960),
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
]

# Issue 5's speed goals, each (what, shapes, batch, rates, least speed-up over bf16 cuBLAS on every case).
# The full-linear goal is judged on glq_linear (both transforms), the others on the matmul.
LARGE_SHAPES = SHAPES[:3]
SPEED_GOALS = [
    ("2 bpw, batch 1", LARGE_SHAPES, 1, (2,), 4.0),
    ("3 bpw, batch 1", LARGE_SHAPES, 1, (3,), 3.0),
    ("4 bpw, batch 1", LARGE_SHAPES, 1, (4,), 2.5),
    ("every rate, every shape, batch 1", SHAPES, 1, tuple(range(2, 9)), 1.0),
    ("2 bpw, batch 16", LARGE_SHAPES, 16, (2,), 2.0),
    ("4 bpw, batch 64", LARGE_SHAPES, 64, (4,), 1.0),
]
LINEAR_GOAL = ("full GLQ linear, 2 bpw, batch 1", [(4096, 14336)], 1, (2,), 3.0)


def goal_rows(matmul_speedups: dict, linear_speedups: dict) -> list[str]:
    """A Markdown table of the speed goals against measured speed-ups ({(out, in, batch, rate): bf16 time /
    GLQ time}): per goal its worst measured case, how many cases meet the target, and the verdict. A goal
    with unmeasured cases (a --quick run leaves out rates 5-7) can be missed but never met."""
    rows = ["| goal | target | worst case | its speed-up | cases at target | verdict |", "|---|---|---|---|---|---|"]
    for goal, speedups in [*((g, matmul_speedups) for g in SPEED_GOALS), (LINEAR_GOAL, linear_speedups)]:
        what, shapes, batch, rates, target = goal
        cases = [(o, i, batch, r) for o, i in shapes for r in rates]
        measured = {c: speedups[c] for c in cases if c in speedups}
        if not measured:
            rows.append(f"| {what} | {target:g}x | - | - | 0 of {len(cases)} | not measured |")
            continue
        worst = min(measured, key=measured.get)
        at_target = sum(v >= target for v in measured.values())
        if at_target < len(measured):
            verdict = "missed"
        elif len(measured) < len(cases):
            verdict = f"open ({len(cases) - len(measured)} cases not measured)"
        else:
            verdict = "met"
        o, i, _, r = worst
        rows.append(f"| {what} | {target:g}x | {o}x{i}, {r} bpw | {measured[worst]:.2f}x | "
                    f"{at_target} of {len(cases)} | {verdict} |")
    return rows


def _l2_bytes() -> int:
    return torch.cuda.get_device_properties(0).L2_cache_size


def time_graph(make_call, n_sets: int, replays: int = 30, inner: int = 1) -> float:
    """Median seconds per call of a graph of ``n_sets * inner`` calls (call i uses set i)."""
    torch.cuda.synchronize()
    for i in range(n_sets):  # warm-up (allocations, first-use builds) outside the capture
        make_call(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            for i in range(n_sets):
                make_call(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / (n_sets * inner))
    return statistics.median(times)


def copy_bandwidth() -> float:
    n = 1 << 28  # 1 GiB of float32
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    t = time_graph(lambda i: b.copy_(a), 1, replays=10, inner=5)
    return 2 * a.numel() * 4 / t


def n_sets_for(bytes_per_set: int) -> int:
    return int(min(64, max(2, math.ceil(3 * _l2_bytes() / max(bytes_per_set, 1)))))


def bench_bf16(out_f: int, in_f: int, batch: int, dtype: torch.dtype = torch.bfloat16, replays: int = 30) -> float:
    """Seconds per cuBLAS ``F.linear`` of that shape in ``dtype`` (bf16 by default: the baseline)."""
    nbytes = out_f * in_f * 2
    n = n_sets_for(nbytes)
    ws = [torch.randn(out_f, in_f, device="cuda", dtype=dtype) for _ in range(n)]
    x = torch.randn(batch, in_f, device="cuda", dtype=dtype)
    return time_graph(lambda i: F.linear(x, ws[i]), n, replays=replays)


def glq_bytes(rate: int, out_f: int, in_f: int, batch: int) -> int:
    return out_f * in_f * rate // 8 + batch * (in_f + out_f) * 2 + out_f * 4


def make_sets(rate, out_f, in_f, batch, tiled: bool = False):
    """Enough random layers of one shape that L2 cannot hold them (see n_sets_for), sharing one set of tables.
    tiled: their codes in the tiled layout where the shape has one (glq.kernels.layout; what glq.hf holds on
    the CUDA C backend, so what the benchmark times; the probes in scripts/ keep row-major codes)."""
    n = n_sets_for(out_f * in_f * rate // 8)
    layers = [random_layer(rate, out_f, in_f, seed=s, device="cuda") for s in range(n)]
    if tiled and can_tile(out_f, in_f):
        layers = [(tile_codes(codes), t, r) for codes, t, r in layers]
    tables = layers[0][1]  # shared tables: kernels read them from shared memory anyway
    return n, layers, tables


def layout_bit(out_f: int, in_f: int) -> int:
    """The variant bit (ops.TILED) for the benchmark's layers of this shape: make_sets(..., tiled=True) tiles
    every shape that has the layout."""
    from glq.kernels.ops import TILED

    return TILED if can_tile(out_f, in_f) else 0


def dense_matmul(x, layer, tables):
    """The large-batch path forced: dense decode (float32 tables) then cuBLAS."""
    codes, _, row_scale = layer
    tab = tables.table(torch.float32, x.device)
    tiled = bool(layout_bit(codes[0].shape[0], x.shape[1]))
    w = torch.ops.glq_cuda.dequantize(codes, tab, row_scale, tables.rate, tables.gain, x.dtype, tiled)
    return F.linear(x, w)


def fused_matmul(x, layer, tables):
    """The fused MMA kernel (v3) forced at any batch, in chunks of 64 rows (the pre-dense path)."""
    codes, _, row_scale = layer
    tab = tables.table(x.dtype, x.device)
    v = 1 | layout_bit(codes[0].shape[0], x.shape[1])
    parts = [
        torch.ops.glq_cuda.matmul(xb, codes, tab, row_scale, tables.rate, tables.gain, 0, 0, v) for xb in x.split(64)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def prefill_rows(smoke: bool) -> list[str]:
    """Large batches (prefill) on 4096x14336: the public matmul (dense path above
    ops.DENSE_BATCH_THRESHOLD), the dense path and the chunked fused kernel forced, the dense decode
    alone, and bf16 cuBLAS. The batch where "dense" overtakes "fused" is the threshold to set."""
    from glq.kernels import ops

    out = [
        f"prefill, 4096x14336, bf16 (ops.DENSE_BATCH_THRESHOLD = {ops.DENSE_BATCH_THRESHOLD})",
        "| batch | rate | glq us | dense us | dequantize only us | fused (64-row chunks) us | bf16 us "
        "| speed-up | err/ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out_f, in_f = SHAPES[0]
    for batch in (64, 256, 2048) if smoke else (16, 64, 128, 256, 512, 2048):
        tb = bench_bf16(out_f, in_f, batch)
        for rate in (2, 4):
            n, layers, tables = make_sets(rate, out_f, in_f, batch, tiled=True)
            tiled = bool(layout_bit(out_f, in_f))
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
            c0, _, r0 = layers[0]
            w = dequantize(c0, tables, r0, tiled=tiled)
            exact = exact_matmul(x, w)
            err = rel_error(matmul(x, c0, tables, r0, tiled=tiled), exact) / lowp_reference_error(x, w, exact)
            w = exact = None
            tab32 = tables.table(torch.float32, x.device)
            t = time_graph(lambda i: matmul(x, layers[i][0], tables, layers[i][2], tiled=tiled), n)
            td = time_graph(lambda i: dense_matmul(x, layers[i], tables), n)
            tq = time_graph(
                lambda i: torch.ops.glq_cuda.dequantize(
                    layers[i][0], tab32, layers[i][2], rate, tables.gain, torch.bfloat16, tiled
                ),
                n,
            )
            tf = time_graph(lambda i: fused_matmul(x, layers[i], tables), n, replays=10)
            out.append(
                f"| {batch} | {rate} | {t * 1e6:.1f} | {td * 1e6:.1f} | {tq * 1e6:.1f} | {tf * 1e6:.1f} | "
                f"{tb * 1e6:.1f} | {tb / t:.2f}x | {err:.2f} |"
            )
            print(out[-1], flush=True)
            layers = None
            torch.cuda.empty_cache()
    return out


def split_rows(variant: int, shapes, rates, splits, replays: int = 20, batch: int = 1) -> list[str]:
    """Markdown rows: time (fp16, `batch` rows) of matmul kernel ``variant`` (1 MMA, 2 v4, 3 batched, 4
    row-tile) at each forced K split (0: its planner's choice), with the split and grid it planned (and
    whether the splits add up through a thread-block cluster)."""
    rows = [f"| out x in | rate | variant {variant}, batch {batch}: ksplit asked -> planned (grid) | us |",
            "|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for out_f, in_f in shapes:
        for rate in rates:
            n, layers, tables = make_sets(rate, out_f, in_f, batch, tiled=True)
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            tab = tables.table(x.dtype, x.device)
            v = variant | layout_bit(out_f, in_f)
            for ks in splits:
                try:
                    t = time_graph(
                        lambda i, ks=ks: torch.ops.glq_cuda.matmul(
                            x, layers[i][0], tab, layers[i][2], rate, tables.gain, 0, ks, v
                        ),
                        n,
                        replays=replays,
                    )
                    plan = torch.ops.glq_cuda.matmul_plan(batch, out_f, in_f, rate, 0, 0, ks, 0, variant)
                except RuntimeError as e:
                    rows.append(f"| {out_f}x{in_f} | {rate} | {ks} | failed: {e} |")
                else:
                    how = f"{plan[3]}, cluster" if plan[7] else f"{plan[3]}"
                    rows.append(f"| {out_f}x{in_f} | {rate} | {ks or 'auto'} -> {plan[2]} ({how}) | {t * 1e6:.1f} |")
                print(rows[-1], flush=True)
            layers = None  # free the weight copies before the next shape
    return rows


def run(quick: bool, smoke: bool = False, linear_only: bool = False) -> list[str]:
    dev = torch.cuda.get_device_name(0)
    import triton

    from glq.kernels._build import load_extension

    t0 = time.time()
    ok, why = load_extension()
    build_s = time.time() - t0
    if not ok:
        raise SystemExit(f"CUDA C backend unavailable: {why}")
    lines = [
        f"device: {dev}; torch {torch.__version__}; triton {triton.__version__}; "
        f"CUDA {torch.version.cuda}; extension build/load {build_s:.1f} s",
    ]
    bw = copy_bandwidth()
    lines.append(f"copy bandwidth (read+write): {bw / 1e12:.2f} TB/s; L2 {_l2_bytes() >> 20} MiB")
    print("\n".join(lines), flush=True)

    rows = [
        "| out x in | batch | rate | glq us | bf16 us | speed-up | glq TB/s | % of copy | err/ref "
        "| MMA kernel (v3) us | v3 err/ref | dense us | batched (v5) us | v5 err/ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    configs = []
    rates = [2, 3, 4, 8] if quick else list(range(2, 9))
    shapes = [*SHAPES[:3], (576, 1536)] if smoke else SHAPES
    for out_f, in_f in shapes:
        for rate in [2, 3, 4] if smoke else rates:
            configs.append((out_f, in_f, 1, rate))
    for out_f, in_f in SHAPES[:1] if smoke else SHAPES[:3]:
        for rate in (2, 4):
            configs.append((out_f, in_f, 4, rate))
            configs.append((out_f, in_f, 16, rate))
            configs.append((out_f, in_f, 64, rate))
    bf16_cache = {}
    speedups, linear_speedups = {}, {}  # (out, in, batch, rate) -> bf16 time / GLQ time, for goal_rows
    if linear_only:
        configs = []
    for out_f, in_f, batch, rate in configs:
        key = (out_f, in_f, batch)
        if key not in bf16_cache:
            bf16_cache[key] = bench_bf16(out_f, in_f, batch)
        tb = bf16_cache[key]
        n, layers, tables = make_sets(rate, out_f, in_f, batch, tiled=True)
        lb = layout_bit(out_f, in_f)
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
        c0, _, r0 = layers[0]
        w = dequantize(c0, tables, r0, tiled=bool(lb))
        exact = exact_matmul(x, w)
        err = rel_error(matmul(x, c0, tables, r0, tiled=bool(lb)), exact) / lowp_reference_error(x, w, exact)
        t = time_graph(lambda i: matmul(x, layers[i][0], tables, layers[i][2], tiled=bool(lb)), n)
        # old vs new side by side: the MMA kernel (v3) forced, for batches the new kernel takes
        v3 = "| - | - |"
        if batch <= 8:
            tab = tables.table(x.dtype, x.device)

            def mma(i):
                return torch.ops.glq_cuda.matmul(x, layers[i][0], tab, layers[i][2], rate, tables.gain, 0, 0, 1 | lb)

            e3 = rel_error(mma(0), exact) / lowp_reference_error(x, w, exact)
            v3 = f"| {time_graph(mma, n) * 1e6:.1f} | {e3:.2f} |"
        # the large-batch path (decode once + cuBLAS) forced at batches the fused kernel takes:
        # where it wins, ops.DENSE_BATCH_THRESHOLD should come down
        if batch >= 16:
            v3 += f" {time_graph(lambda i: dense_matmul(x, layers[i], tables), n) * 1e6:.1f} |"
        else:
            v3 += " - |"
        # the register-tiled batched kernel (v5; the default for 9..64 rows at rates 2..4) forced
        if batch > 8 and rate in (2, 3, 4):
            tab = tables.table(x.dtype, x.device)

            def batched(i):
                return torch.ops.glq_cuda.matmul(x, layers[i][0], tab, layers[i][2], rate, tables.gain, 0, 0, 3 | lb)

            try:
                e5 = rel_error(batched(0), exact) / lowp_reference_error(x, w, exact)
                v3 += f" {time_graph(batched, n) * 1e6:.1f} | {e5:.2f} |"
            except RuntimeError as e:
                print(f"batched kernel failed: {e}", flush=True)
                v3 += " failed | - |"
        else:
            v3 += " - | - |"
        w = exact = None
        speedups[(out_f, in_f, batch, rate)] = tb / t
        nb = glq_bytes(rate, out_f, in_f, batch)
        rows.append(
            f"| {out_f}x{in_f} | {batch} | {rate} | {t * 1e6:.1f} | {tb * 1e6:.1f} | "
            f"{tb / t:.2f}x | {nb / t / 1e12:.2f} | {100 * nb / t / bw:.0f}% | {err:.2f} {v3}"
        )
        print(rows[-1], flush=True)
        layers = None  # free the weight copies before the next shape
        torch.cuda.empty_cache()

    pre = [] if linear_only else prefill_rows(smoke)

    # the full GLQ linear (both FHTs), fp16, with programmatic dependent launches (the default on
    # compute capability >= 9) and without (GLQ_KERNELS_PDL=0, read at each launch: at graph capture)
    lin = [
        "| out x in | batch | rate | glq_linear us | without PDL us | matmul only us | bf16 us | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lin_cases = [(*SHAPES[0], 1, 2), (*SHAPES[0], 16, 2), (*SHAPES[0], 1, 4)]
    for out_f, in_f in [*SHAPES[1:3], (576, 1536), (1536, 576)]:
        lin_cases += [(out_f, in_f, 1, 2), (out_f, in_f, 1, 4)]
    for out_f, in_f, batch, rate in lin_cases:
        n, layers, tables = make_sets(rate, out_f, in_f, batch, tiled=True)
        tiled = bool(layout_bit(out_f, in_f))
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
        s_in = torch.randint(0, 2, (in_f,), device="cuda").float() * 2 - 1
        s_out = torch.randint(0, 2, (out_f,), device="cuda").float() * 2 - 1

        def full(i):
            return glq_linear(x, layers[i][0], tables, layers[i][2], s_in, s_out, tiled=tiled)

        tl_ = time_graph(full, n)
        os.environ["GLQ_KERNELS_PDL"] = "0"
        try:
            tu = time_graph(full, n)
        finally:
            del os.environ["GLQ_KERNELS_PDL"]
        tm = time_graph(lambda i: matmul(x, layers[i][0], tables, layers[i][2], tiled=tiled), n)
        tb = bf16_cache.get((out_f, in_f, batch)) or bench_bf16(out_f, in_f, batch)
        linear_speedups[(out_f, in_f, batch, rate)] = tb / tl_
        lin.append(
            f"| {out_f}x{in_f} | {batch} | {rate} | {tl_ * 1e6:.1f} | {tu * 1e6:.1f} | {tm * 1e6:.1f} | "
            f"{tb * 1e6:.1f} | {tb / tl_:.2f}x |"
        )
        print(lin[-1], flush=True)
        layers = None  # free the weight copies before the next shape

    # the FWHT kernel (glq_cuda.hadamard) per size, fp16, with signs
    fw = ["| N (blocks) | batch | us |", "|---|---|---|"]
    from glq.kernels.api import default_blocks

    for n_f in (4096, 14336, 1536, 576, 28672):  # 28672: 70B's intermediate size (16384 + 8192 + 4096)
        blocks = default_blocks(n_f)
        logs = [b.bit_length() - 1 for b in blocks]
        s_in = torch.randint(0, 2, (n_f,), device="cuda").float() * 2 - 1
        for batch in (1, 16):
            xs = [torch.randn(batch, n_f, device="cuda", dtype=torch.float16) for _ in range(8)]
            try:
                t = time_graph(lambda i: torch.ops.glq_cuda.hadamard(xs[i], logs, s_in, None), len(xs))
            except RuntimeError as e:
                t = float("nan")
                print(f"hadamard failed: {e}", flush=True)
            fw.append(f"| {n_f} {tuple(blocks)} | {batch} | {t * 1e6:.1f} |")
            print(fw[-1], flush=True)

    goals = goal_rows(speedups, linear_speedups)
    print("\n".join(goals), flush=True)
    if linear_only:
        return [*lines, "", *goals, "", *lin, "", *fw]

    # split-K of the small-batch kernel (v4, the batch-1 default), rate 2 and 4, batch 1: the auto
    # plan (ksplit 0) against forced splits, to tune the planner's cost model. The small SmolLM2
    # shapes (where launch and reduction latency dominate) in --smoke too.
    small = [(576, 1536), (1536, 576), (576, 576)]
    var = split_rows(2, small if smoke else [*SHAPES[:3], *small], (2, 4), (0, 1, 2, 4, 8, 16), replays=10)
    # variant 4 (row-tile steps, rates 2-4; ops.small_batch_variant picks it for short inputs and batches 3-8)
    # against v4 at batch 1 and 4, each with its auto split
    rts = ["| out x in | batch | rate | v4 us | row-tile steps us | its err/ref | its plan (ksplit, grid) |",
           "|---|---|---|---|---|---|---|"]
    for out_f, in_f in [*SHAPES[:3], *small]:
        for rate in (2, 3, 4):
            n, layers, tables = make_sets(rate, out_f, in_f, 1, tiled=True)
            lb = layout_bit(out_f, in_f)
            w = dequantize(layers[0][0], tables, layers[0][2], tiled=bool(lb))
            for batch in (1, 4):
                x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
                tab = tables.table(x.dtype, x.device)

                def call(i, v):
                    return torch.ops.glq_cuda.matmul(
                        x, layers[i][0], tab, layers[i][2], rate, tables.gain, 0, 0, v | lb
                    )

                try:
                    exact = exact_matmul(x, w)
                    e4 = rel_error(call(0, 4), exact) / lowp_reference_error(x, w, exact)
                    t2 = time_graph(lambda i: call(i, 2), n, replays=20)
                    t4 = time_graph(lambda i: call(i, 4), n, replays=20)
                    plan = torch.ops.glq_cuda.matmul_plan(batch, out_f, in_f, rate, 0, 0, 0, 0, 4)
                    rts.append(f"| {out_f}x{in_f} | {batch} | {rate} | {t2 * 1e6:.1f} | {t4 * 1e6:.1f} | {e4:.2f} "
                               f"| {plan[2]}, {plan[3]} |")
                except RuntimeError as e:
                    rts.append(f"| {out_f}x{in_f} | {batch} | {rate} | failed: {e} | | | |")
                print(rts[-1], flush=True)
            layers = w = None
    return [*lines, "", *goals, "", *rows, "", *pre, "", *lin, "", *fw, "", *var, "", *rts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write the Markdown tables here")
    ap.add_argument("--quick", action="store_true", help="rates 2, 3, 4, 8 only")
    ap.add_argument("--smoke", action="store_true", help="a few shapes, no variant sweep")
    ap.add_argument("--linear", action="store_true", help="only the full-linear and FWHT tables")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    out = run(args.quick, args.smoke, args.linear)
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
