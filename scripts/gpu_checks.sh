#!/usr/bin/env bash
# One GPU call that runs every CUDA test suite and the inference benchmarks, each step under its own
# time limit so one hang cannot eat the others, logs under $OUT (or ./out). Usage (device machine):
#   scripts/gpu_run.sh bash scripts/gpu_checks.sh [step ...]
# Steps: hf mem kvbench decode fused compile kernels triton kbench ncu block quality quant lattice cli (default: hf mem
# kvbench decode kernels). kernels leaves out the Triton cases (they compile per configuration, minutes); triton runs
# only those. block (8B-shaped block quantization time) and quality need GLQ_SMOLLM2_GGUF (see BENCHMARKS.md for getting the
# GGUF onto the machine). GLQ_GPU_BUDGET (seconds, default 580) caps the whole call: each step gets at
# most what is left, so the device's per-call limit never cuts a step off without its log.
set -uo pipefail
budget=${GLQ_GPU_BUDGET:-580}
out="${OUT:-out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$out/device.txt" 2>&1
step() {  # name seconds command...
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name skipped: out of budget" | tee -a "$out/summary.txt"; return 1; fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/summary.txt"
  return $rc
}
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(hf mem kvbench decode kernels)
for s in "${steps[@]}"; do case $s in
  hf) step hf 150 python3 -m pytest -q -p no:cacheprovider tests/hf -m cuda ;;
  kernels) step kernels 330 python3 -m pytest -q -p no:cacheprovider tests/kernels -m cuda -k "not triton" ;;
  triton) step triton 300 python3 -m pytest -q -p no:cacheprovider tests/kernels -m cuda -k triton ;;
  quant) step quant 120 python3 -m pytest -q -p no:cacheprovider tests/quant -m cuda ;;
  lattice) step lattice 150 python3 -m pytest -q -p no:cacheprovider tests/lattice -m cuda ;;
  cli) step cli 150 python3 -m pytest -q -p no:cacheprovider tests/cli -m cuda ;;
  mem) step mem 90 python3 packages/glq-hf/benchmarks/bench_memory.py --json "$out/mem.json" ;;
  decode) step decode 240 python3 packages/glq-hf/benchmarks/bench_decode.py --no-compile --unshared --json "$out/decode.json" ;;
  fused) step fused 150 env GLQ_HF_FUSE=0 python3 packages/glq-hf/benchmarks/bench_decode.py --no-bf16 --no-compile \
        --rates 2 4 --json "$out/decode_unfused.json" ;;  # fusion is the default: this step times it off
  compile) step compile 400 python3 packages/glq-hf/benchmarks/bench_decode.py --compile-only --rates 2 \
        --json "$out/compile.json" ;;
  kvbench) step kvbench 150 python3 packages/glq-kvcache/benchmarks/bench_decode.py ;;
  kbench) step kbench 330 python3 -m glq.kernels.benchmark ${GLQ_KBENCH_ARGS:---quick} --out "$out/kbench.md" ;;
  ncu) step ncu 120 ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis -k regex:glq --launch-skip 1 --launch-count 4 \
        python3 scripts/ncu_matmul.py ;;
  block) step block 450 python3 packages/glq-quant/benchmarks/block_time.py --bpw 2 ;;
  quality) step quality 590 python3 packages/glq-quant/benchmarks/quality.py --device cuda \
        ${GLQ_QUALITY_ARGS:---rates 2 4 --finetune-model-epochs 2} --out "$out/quality.json" ;;
  *) echo "unknown step $s" | tee -a "$out/summary.txt" ;;
esac; done
