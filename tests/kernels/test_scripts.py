"""The GPU probe scripts' CPU-side parts: parsing and tables (their timings need a GPU)."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_trees_reads_probe_lines_and_tabulates_every_tree_in_order():
    ab = _script("ab_trees")
    assert ab.parse_line("new 4096x14336 b1 r2=13.8 r4=22.5") == ("4096x14336", "b1", {2: 13.8, 4: 22.5})
    for noise in ("build new: True", "new 4096x14336 b1 r2=oops", "(True, '')", ""):
        assert ab.parse_line(noise) is None, noise
    times = {("4096x4096", "b1"): {2: {"old": [7.1, 7.2], "new": [6.9, 7.0]}, 3: {"new": [9.0]}}}
    rows = ab.table(["old", "new"], [2, 3], times)
    assert rows[0] == "| out x in, batch | 2 bpw | 3 bpw |"
    assert rows[2] == "| 4096x4096, b1 | 7.1 / 7.2 -> 6.9 / 7.0 | - -> 9.0 |"


def test_ncu_hotspots_ranks_instructions_by_stall_samples(tmp_path):
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_long_sb", "stall_barrier", "stall_long_sb (Not Issued)"]
    lines = [["0x100", "LDG.E R2, [R4]", "10", "64", "0", "0", "0"],
             ["0x110", "LOP3.LUT R3, R2, 0xff80, R1, 0xf8, !PT", "70", "64", "68", "0", "60"],
             ["0x120", "BAR.SYNC 0x0", "20", "64", "0", "20", "0"]]
    path = tmp_path / "src.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "void k()"])
        w.writerow(header)
        w.writerows(lines)
    out = subprocess.run([sys.executable, str(SCRIPTS / "ncu_hotspots.py"), str(path), "--top", "2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "void k(): 3 instructions, 100 samples"
    assert out[1].startswith("by reason: long_sb 68.0%, barrier 20.0%")
    assert "LOP3.LUT" in out[3] and "70.0%" in out[3] and "(long_sb 68)" in out[3]
    assert "BAR.SYNC" in out[4] and len(out) == 5
