#!/usr/bin/env bash
# Reruns every CPU benchmark with its default arguments, one after another (they share the
# machine: nothing else should run meanwhile), and keeps each one's output in
# benchmarks/logs/NAME.txt. Copy the figures into benchmarks/RESULTS.md with the date.
#
#   bash benchmarks/run_all.sh            # all CPU benchmarks (about 40 minutes on 2 cores)
#   bash benchmarks/run_all.sh --gpu      # also the accelerator train step (needs a GPU/TPU)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
logs=benchmarks/logs
mkdir -p "$logs"

run() {
  local name=$1
  shift
  echo "== $name: $*"
  "$python" "$@" 2>&1 | tee "$logs/$name.txt"
}

run input_pipeline benchmarks/input_pipeline.py
run train_step benchmarks/train_step.py
run packing benchmarks/packing.py
run generate benchmarks/generate.py
run eval_throughput benchmarks/eval_throughput.py
run ask_throughput benchmarks/ask_throughput.py
run tiny_train_step benchmarks/tiny_train_step.py
run demo_step benchmarks/demo_step.py
if [[ "${1:-}" == "--gpu" ]]; then
  run accelerator_train_step benchmarks/accelerator_train_step.py
fi
echo "logs in $logs/"
