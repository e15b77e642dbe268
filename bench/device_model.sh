#!/usr/bin/env bash
# GPU machine: the model-level GPU tests, then bench_model on a synthesized GLM-5.2-shaped model
# (1 dense + 4 MoE layers; written first if missing). Binaries built here and carried in
# .devbuild/ (see bench/device_check.sh). Usage: bash bench/device_model.sh [tests|bench|all]
set -u
export LD_LIBRARY_PATH=$PWD/.devbuild/lib:${LD_LIBRARY_PATH:-}
export BIGMOE_FIXTURES=$PWD/tests/fixtures
OUT=${OUT:-/tmp/bigmoe-out}
mkdir -p "$OUT"
B=.devbuild/bin
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$what" != bench ]; then
  for t in test_cuda_glm_dsa test_cuda_decode_ops test_cuda_model_ops test_cuda_attention; do
    echo "== $t"
    timeout 150 "$B/$t" --gtest_brief=1 > "$OUT/$t.log" 2>&1
    echo "rc=$?"
    grep -E "FAILED|Failure|PASSED|error|Expected|Which is|actual" "$OUT/$t.log" | head -30
  done
fi
if [ "$what" != tests ]; then
  timeout ${BENCH_TIMEOUT:-330} "$B/bench_model" ${SYNTH_PATH:-/tmp/synth-glm.gguf} --synth gguf ${BENCH_ARGS:---prefill 512,4096 --batch 1,4 --steps 16} 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
  echo "bench rc=${PIPESTATUS[0]}"; tail -3 "$OUT/bench.err"
fi
