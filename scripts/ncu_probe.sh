#!/usr/bin/env bash
# Nsight Compute on the GLQ matmul cases named below (one launch each, after one warm-up launch): speed of
# light, warp stalls, memory, occupancy. Usage on a GPU machine: scripts/gpu_run.sh bash scripts/ncu_probe.sh
# ["label;ncu_matmul.py arguments" ...] (default: the cases below)
set -o pipefail
run() {  # label, ncu_matmul.py arguments
  local label=$1; shift
  echo "=== $label"
  ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed.sum" \
      -k regex:glq_ --launch-skip 1 --launch-count 1 python3 scripts/ncu_matmul.py --calls 2 "$@" 2>&1 |
    grep -E "^\s+(Duration|Memory Throughput|DRAM Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Warp Cycles Per Issued Instruction|Mem Busy|Max Bandwidth|Mem Pipes Busy|Theoretical Occupancy|Block Limit Shared Mem)|glq_|smsp__average_warps_issue_stalled|l1tex__data|smsp__inst_executed" |
    grep -v " 0$\| 0\.0[0-9]$" | head -60
}
python3 -c "from glq.kernels._build import load_extension; print(load_extension())"
if [ $# -gt 0 ]; then
  for case in "$@"; do
    # shellcheck disable=SC2086 # the arguments part is split on purpose
    run "${case%%;*}" ${case#*;}
  done
  exit 0
fi
run "v4 4096x14336 b1 2 bpw, tiled" --rates 2 --variant 2 --tiled
run "v4 4096x4096 b1 2 bpw, tiled" --shape 4096x4096 --rates 2 --variant 2 --tiled
run "v4 4096x14336 b1 4 bpw, tiled" --rates 4 --variant 2 --tiled
run "v4 4096x14336 b1 4 bpw, 4 copies" --rates 4 --variant 2 --rep 4
run "v4 4096x14336 b1 4 bpw, 8 copies" --rates 4 --variant 2 --rep 8
run "v4 4096x14336 b1 2 bpw" --rates 2 --variant 2
run "v5 4096x14336 b64 4 bpw" --rates 4 --batch 64
run "v5 4096x14336 b16 2 bpw" --rates 2 --batch 16
run "MMA kernel 576x576 b1 6 bpw" --shape 576x576 --rates 6
run "row-tile 576x576 b1 4 bpw" --shape 576x576 --rates 4
