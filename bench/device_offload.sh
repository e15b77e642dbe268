#!/usr/bin/env bash
# GPU machine: the offload benchmark (issue 5) on the synthetic GLM-5.2-shaped GGUF model (1 dense +
# 4 MoE layers, Q4_K experts; written first if missing). The GPU budget is capped (--gpu-mem) so
# the planner must put routed experts in host memory; each layout runs as the planner places it
# on machines/h100-test.json, and bench_model prints the measured decode speed beside the
# planner's prediction. Binaries built here and carried in .devbuild/ (bench/device_check.sh).
# Usage: bash bench/device_offload.sh [MODEL] [GPU_MEM_GIB]
set -u
export LD_LIBRARY_PATH=$PWD/.devbuild/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/bigmoe-out}
mkdir -p "$OUT"
M=${1:-/tmp/synth-glm.gguf}
GM=${2:-12}
B=.devbuild/bin/bench_model
COMMON="--synth gguf --prefill 64 --prompt 64 --batch 1,4 --steps 8 --machine machines/h100-test.json --gpu-mem $GM --cpu-threads ${CPU_THREADS:-16}"
for run in "experts-cpu" "experts-streamed" "experts-streamed --cache-slots 64 --prefetch off" \
    "experts-streamed --cache-slots 64" "mixed" "hot-cache" "hot-cache-mixed"; do
  name=$(echo "$run" | tr ' ' '_')
  echo "== $run"
  timeout ${RUN_TIMEOUT:-150} $B "$M" $COMMON --layout $run > "$OUT/offload-$name.txt" 2> "$OUT/offload-$name.err"
  echo "rc=$?"
  grep -E "^placement|^host bytes|^\| [14] \| .*\| .*\| .*\| .*\| .*\| .*\|" "$OUT/offload-$name.txt" | tail -6
  grep -E "^\| (all-gpu|experts-cpu|experts-streamed|mixed|hot-cache)" "$OUT/offload-$name.txt" | head -0
  tail -2 "$OUT/offload-$name.err"
done
