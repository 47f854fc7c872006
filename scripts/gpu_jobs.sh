#!/usr/bin/env bash
# Detached jobs on the GPU machine: several quality runs share one GPU (each is launch-bound, so
# together they finish far sooner than one after another) and outlive a single device call.
#   scripts/gpu_jobs.sh start NAME "quality.py args" [NAME "args" ...]
#   scripts/gpu_jobs.sh wait SECONDS     # until every job has ended or SECONDS pass; copies logs to $OUT
# Jobs live under $GLQ_JOBS (default $HOME/glq/jobs), which survives while the machine stays warm.
# Needs GLQ_SMOLLM2_GGUF (see BENCHMARKS.md); wheels from .whl are installed once, before any job.
set -uo pipefail
jobs_dir=${GLQ_JOBS:-$HOME/glq/jobs}; mkdir -p "$jobs_dir"
out="${OUT:-out}"; mkdir -p "$out"
mode=$1; shift
if [ "$mode" = start ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  PYTHONPATH="$(ls -d "$PWD"/packages/*/src | paste -sd:):/tmp/site"; export PYTHONPATH PYTHONUNBUFFERED=1
  # Convert the test model once, before the jobs would race on its cache.
  python3 -c "from glq.quant.models import resolve_model; print(resolve_model('smollm2-135m'))" || exit 1
  while [ $# -ge 2 ]; do
    name=$1 args=$2; shift 2
    # shellcheck disable=SC2086  # args is a word list on purpose
    OMP_NUM_THREADS=3 setsid nohup bash -c "python3 packages/glq-quant/benchmarks/quality.py --device cuda $args \
      --out '$jobs_dir/$name.json'; echo \"exit \$?\" > '$jobs_dir/$name.done'" \
      > "$jobs_dir/$name.log" 2>&1 < /dev/null &
    echo "started $name: $args"
  done
elif [ "$mode" = wait ]; then
  limit=$1
  while [ $SECONDS -lt "$limit" ]; do
    running=0
    for log in "$jobs_dir"/*.log; do [ -e "${log%.log}.done" ] || running=$((running + 1)); done
    [ $running -eq 0 ] && break
    sleep 5
  done
  for log in "$jobs_dir"/*.log; do
    name=$(basename "${log%.log}")
    echo "$name: $(cat "$jobs_dir/$name.done" 2>/dev/null || echo running) $(tail -c 300 "$log" | tail -n 1)"
  done
  cp "$jobs_dir"/*.log "$jobs_dir"/*.json "$out"/ 2>/dev/null || true
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
else
  echo "usage: $0 start NAME ARGS [NAME ARGS ...] | wait SECONDS" >&2; exit 2
fi
