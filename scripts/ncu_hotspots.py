"""Where a kernel's warps wait, instruction by instruction: the SASS lines holding the most warp-stall
samples in an Nsight Compute source-page export, with each line's main stall reasons, and the share of
all samples per reason. Usage on a GPU machine (one v4 launch at 4096x14336, 2 bpw, after one warm-up):

    scripts/gpu_run.sh ncu --section SourceCounters --section WarpStateStats --warp-sampling-interval 0 \\
        --import-source no -k regex:glq_gemv_kernel --launch-skip 1 --launch-count 1 -f -o r2 \\
        python3 scripts/ncu_matmul.py --rates 2 --calls 2 --variant 2
    ncu -i r2.ncu-rep --page source --csv --print-source sass > r2.csv
    python3 scripts/ncu_hotspots.py r2.csv [--top 20]

(the report itself is ~25 MB; the CSV ~1 MB travels back and is read anywhere, no ncu needed.)"""

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    # row 0 names the kernel, row 1 is the header; every later row is one SASS instruction
    header = rows[1]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and not h.endswith("(Not Issued)")]
    lines = [r for r in rows[2:] if len(r) == len(header)]
    if not lines:
        raise SystemExit(f"{args.csv}: no instruction rows (is it an ncu source-page CSV with --print-source sass?)")

    def count(row, name):
        return int(float(row[col[name]] or 0))

    base = int(lines[0][col["Address"]], 16)
    total = sum(count(r, SAMPLES) for r in lines)
    print(f"{rows[0][1] if len(rows[0]) > 1 else rows[0][0]}: {len(lines)} instructions, {total} samples")
    by_reason = collections.Counter()
    for r in lines:
        for name in reasons:
            by_reason[name] += count(r, name)
    print("by reason: " + ", ".join(f"{k[6:]} {100 * v / total:.1f}%" for k, v in by_reason.most_common(8)))
    print(f"{'offset':>7} {'samples':>8} {'share':>6} {'executed':>9}  instruction  (main reasons)")
    for r in sorted(lines, key=lambda r: -count(r, SAMPLES))[: args.top]:
        s = count(r, SAMPLES)
        top = sorted(((count(r, n), n[6:]) for n in reasons), reverse=True)[:2]
        why = ", ".join(f"{n} {v}" for v, n in top if v)
        print(f"{int(r[col['Address']], 16) - base:07x} {s:8d} {100 * s / total:5.1f}% {r[col[EXECUTED]]:>9}  "
              f"{r[col['Source']].strip()[:64]}  ({why})")


if __name__ == "__main__":
    main()
