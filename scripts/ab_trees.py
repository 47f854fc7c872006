"""Before/after timing of glq-kernels source trees in one call: builds every tree's extension in parallel
(each source hash names its own build), then runs `scripts/ab_probe.py` once per tree per round, the trees
alternating, and prints a markdown table: per (shape, batch) and rate, each tree's times over the rounds,
the first tree's first. Usage on a GPU machine, from the repository root:

    mkdir -p exp/old && git archive HEAD packages/glq-kernels/src | tar -x -C exp/old
    python3 scripts/ab_trees.py --tree old=exp/old --tree new=. --shapes 4096x14336 4096x4096 \\
        --rates 2 3 4 --batches 1 --rounds 2    # --linear: the full GLQ linear, both transforms

A tree is a folder holding packages/glq-kernels/src (`.` is the working tree); every other workspace member
comes from the working tree."""

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = "from glq.kernels._build import load_extension; ok, why = load_extension(); print(why); print(ok)"


def tree_env(path: str) -> dict[str, str]:
    """The environment that imports glq.kernels from tree `path` and the other members from the working tree."""
    kernels = (ROOT / path / "packages" / "glq-kernels" / "src").resolve()
    if not (kernels / "glq" / "kernels").is_dir():
        raise SystemExit(f"--tree path {path!r}: no packages/glq-kernels/src/glq/kernels under it")
    members = sorted(str(p) for p in (ROOT / "packages").glob("*/src"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(kernels), *members])
    return env


def parse_line(line: str) -> tuple[str, str, dict[int, float]] | None:
    """'tag OUTxIN bB r2=13.8 r4=22.5' -> (shape, batch, {rate: us}); None for any other line."""
    parts = line.split()
    if len(parts) < 4 or not parts[2].startswith("b") or "x" not in parts[1]:
        return None
    try:
        cells = {int(k[1:]): float(v) for k, v in (c.split("=") for c in parts[3:])}
    except ValueError:
        return None
    return parts[1], parts[2], cells


def table(names: list[str], rates: list[int], times: dict) -> list[str]:
    """times[(shape, batch)][rate][tree] = [us per round] -> markdown rows, trees joined by ' -> '."""
    rows = [f"| out x in, batch | {' | '.join(f'{r} bpw' for r in rates)} |", "|---|" + "---|" * len(rates)]
    for (shape, batch), by_rate in times.items():
        cells = []
        for r in rates:
            per_tree = by_rate.get(r, {})
            cells.append(" -> ".join(" / ".join(f"{t:.1f}" for t in per_tree.get(n, [])) or "-" for n in names))
        rows.append(f"| {shape}, {batch} | " + " | ".join(cells) + " |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH (the first is the baseline)")
    ap.add_argument("--shapes", nargs="+", default=["4096x14336", "14336x4096", "4096x4096"])
    ap.add_argument("--rates", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--linear", action="store_true", help="time the full GLQ linear (ab_probe.py --linear)")
    ap.add_argument("--tiled", action="store_true", help="codes in the tiled layout (ab_probe.py --tiled)")
    args = ap.parse_args()
    trees = []
    for spec in args.tree:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--tree {spec!r}: expected NAME=PATH")
        trees.append((name, tree_env(path)))
    names = [n for n, _ in trees]
    if len(set(names)) != len(names):
        raise SystemExit(f"--tree names must differ: {names}")

    def build(tree):
        name, env = tree
        out = subprocess.run([sys.executable, "-c", BUILD], env=env, capture_output=True, text=True, cwd=ROOT)
        ok = out.stdout.strip().endswith("True")
        return name, ok, (out.stdout if ok else out.stdout + out.stderr).strip()

    with ThreadPoolExecutor(len(trees)) as pool:
        for name, ok, text in pool.map(build, trees):
            print(f"build {name}: {text if not ok else 'ok'}", flush=True)
            if not ok:
                return 1
    probe = [str(ROOT / "scripts" / "ab_probe.py")]
    spec = [",".join(args.shapes), ",".join(map(str, args.rates)), ",".join(map(str, args.batches))]
    spec += ["--linear"] if args.linear else []
    spec += ["--tiled"] if args.tiled else []
    times: dict = {}
    for _ in range(args.rounds):
        for name, env in trees:
            cmd = [sys.executable, *probe, name, *spec]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            print(out.stdout, end="", flush=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            for line in out.stdout.splitlines():
                parsed = parse_line(line)
                if parsed:
                    shape, batch, cells = parsed
                    for rate, us in cells.items():
                        times.setdefault((shape, batch), {}).setdefault(rate, {}).setdefault(name, []).append(us)
    print("\n".join(table(names, args.rates, times)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
